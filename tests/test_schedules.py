import numpy as np
import pytest

import tiec
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


def test_adaptive_rule_is_bounded_and_deterministic():
    import random

    from tiec.schedules import adaptive_max_gap, next_adaptive_key, resolve, validate

    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(2, 60)
        previous = rng.randint(0, n - 2)
        key = rng.randint(previous + 1, n - 1)
        change, threshold = rng.choice([0.0, rng.random() * 2]), rng.random() * 0.5 + 1e-3
        nxt = next_adaptive_key(key, previous, change, threshold, n)
        assert nxt == next_adaptive_key(key, previous, change, threshold, n)
        if nxt is None:
            assert key + adaptive_max_gap(n) >= n  # None only when even the longest gap leaves the loop
        else:
            assert 1 <= nxt - key <= adaptive_max_gap(n) and nxt < n
    # faster change, earlier key: 10% between keys 2 apart is 5% a step, so T = 0.1 gives a gap of 2
    assert next_adaptive_key(4, 2, 0.10, 0.1, 50) == 6 and next_adaptive_key(4, 2, 0.01, 0.1, 50) == 4 + 12
    assert resolve("adaptive:0.1", 20) == (0, 1) and validate("adaptive:0.1") == "adaptive:0.1"
    for bad in ("adaptive:0", "adaptive:-1", "adaptive:nan", "adaptive:x"):
        with pytest.raises(ValueError, match="adaptive"):
            validate(bad)


def test_adaptive_key_steps_in_a_pipeline(sd_pipe):
    from conftest import run

    from tiec.schedules import adaptive_max_gap

    results = {}
    for threshold in (0.05, 0.5):
        for parallel in (False, True):
            for repeat in range(2 if parallel else 1):
                config = tiec.EncoderPropagationConfig(key_steps=f"adaptive:{threshold}", parallel=parallel)
                with tiec.apply(sd_pipe, config) as handle:
                    out = run(sd_pipe, "sd", steps=20)
                results.setdefault((threshold, parallel), []).append((out, handle.stats["encoder_runs"]))
        outs = results[threshold, True]
        assert np.array_equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]  # deterministic
        assert np.abs(outs[0][0] - results[threshold, False][0][0]).max() < 1e-4
        assert outs[0][1] == results[threshold, False][0][1]
        assert 2 + (20 - 2) // adaptive_max_gap(20) <= outs[0][1] <= 20
    assert results[0.5, True][0][1] < results[0.05, True][0][1]  # a larger threshold spends fewer encoders
