import pytest

from tiec import EncoderPropagationConfig, schedules


def test_faster_diffusion_exact_at_50():
    assert schedules.resolve("faster-diffusion", 50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)


@pytest.mark.parametrize("n", [1, 2, 7, 20, 25, 30, 51, 100])
def test_faster_diffusion_scaling_rule(n):
    keys = schedules.resolve("faster-diffusion", n)
    expected = sorted({min(n - 1, int(k * n / 50 + 0.5)) for k in (0, 1, 2, 3, 5, 10, 15, 25, 35)})
    assert list(keys) == expected and keys[0] == 0 and keys[-1] < n


def test_uniform_every_all_and_lists():
    assert schedules.resolve("uniform:5", 20) == (0, 4, 8, 12, 16)
    assert schedules.resolve("uniform:10", 20) == tuple(range(0, 20, 2))
    assert schedules.resolve("uniform:3", 10) == (0, 3, 6)
    assert schedules.resolve("uniform:1", 10) == (0,)
    assert schedules.resolve("every:4", 10) == (0, 4, 8)
    assert schedules.resolve("all", 4) == (0, 1, 2, 3)
    assert schedules.resolve([0, 3, 7], 8) == (0, 3, 7)


@pytest.mark.parametrize("spec, fragment", [
    ([], "empty"), ([0, 2, 2], "duplicates"), ([0, 5, 3], "not sorted"), ([1, 2], "does not start with step 0"),
    ([0, 1.5], "non-integers"), ("fast", "not a known schedule"), ("uniform:0", "must be >= 1"),
    ("every:x", "not an integer"), ("every:-2", "must be >= 1"), (7, "neither a string nor a list"),
])
def test_bad_specs_raise_value_error_naming_value(spec, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        EncoderPropagationConfig(key_steps=spec)
    assert "key_steps" in str(info.value)


def test_out_of_range_detected_at_resolve():
    with pytest.raises(ValueError, match="out of range"):
        schedules.resolve([0, 10], 10)
    with pytest.raises(ValueError, match="at most uniform:4"):
        schedules.resolve("uniform:5", 4)
    with pytest.raises(ValueError, match="num_steps"):
        schedules.resolve("all", 0)


@pytest.mark.parametrize("field, value, fragment", [
    ("estimator", "cubic", "estimator='cubic'"), ("max_parallel", 0, "max_parallel=0"),
    ("max_parallel", -3, "max_parallel=-3"), ("noise_injection", -0.1, "noise_injection=-0.1"),
    ("noise_injection", float("nan"), "noise_injection=nan"), ("parallel", "yes", "parallel='yes'"),
])
def test_bad_config_fields(field, value, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        EncoderPropagationConfig(**{field: value})


def test_config_is_frozen_and_lists_become_tuples():
    cfg = EncoderPropagationConfig(key_steps=[0, 4, 9])
    assert cfg.key_steps == (0, 4, 9)
    with pytest.raises(Exception):
        cfg.estimator = "extrapolate"
    assert hash(cfg) == hash(EncoderPropagationConfig(key_steps=(0, 4, 9)))
