"""Calibrated key steps: the exact optimiser, the measured tables, the store, ``auto:K`` and ``tiec calibrate``."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_demo_pipe, make_pipe, pipe_inputs

import tiec
from tiec import calibrate as C
from tiec import schedules
from tiec.cli import main
from tiec.demo.model import DEFAULT_GUIDANCE

STEPS = 6


# -- the optimiser against brute force ---------------------------------------------------------------------

def _random_tables(n, seed):
    rng = np.random.default_rng(seed)
    reuse = np.triu(rng.random((n, n)) * rng.random(n)[None, :], 1)
    reuse[np.tril_indices(n)] = np.nan
    pairs = rng.random((n, n, n))
    triples = rng.random((n, n, n, n))
    return reuse, pairs, triples


def _brute_force(n, num_keys, reuse, pairs=None, triples=None):
    """The least objective over every key set, each summed step by step from the tables (no shared code with the
    optimiser: the last keys before each step are looked up here)."""
    best = math.inf
    for rest in itertools.combinations(range(1, n), num_keys - 1):
        keys, total = (0, *rest), 0.0
        for s in range(n):
            before = [k for k in keys if k <= s]
            if before[-1] == s:
                continue
            if pairs is None or len(before) == 1:
                total += reuse[before[-1], s]
            elif triples is None or len(before) == 2:
                total += pairs[before[-2], before[-1], s]
            else:
                total += triples[before[-3], before[-2], before[-1], s]
        best = min(best, total)
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 10])
@pytest.mark.parametrize("tables", ["reuse", "pairs", "triples"])
def test_dynamic_programming_matches_brute_force(n, tables):
    for seed in range(3):
        reuse, pairs, triples = _random_tables(n, seed)
        pairs = pairs if tables != "reuse" else None
        triples = triples if tables == "triples" else None
        for num_keys in range(1, n + 1):
            keys, cost = C.optimal_key_steps(num_keys, reuse, pairs, triples)
            assert len(keys) == num_keys and keys[0] == 0 and list(keys) == sorted(set(keys)) and keys[-1] < n
            assert cost == pytest.approx(C.schedule_cost(keys, reuse, pairs, triples), rel=1e-12, abs=1e-12)
            assert cost == pytest.approx(_brute_force(n, num_keys, reuse, pairs, triples), rel=1e-12, abs=1e-12)


def test_triple_objective_prefers_keys_where_the_parabola_is_cheap():
    """A table where only one triple forecasts well: the optimum must put those three keys last."""
    n = 7
    reuse = np.triu(np.full((n, n), 5.0), 1)
    pairs = np.full((n, n, n), 3.0)
    triples = np.full((n, n, n, n), 2.0)
    triples[1, 2, 3] = 0.0  # the quadratic through keys 1, 2, 3 is exact
    keys, cost = C.optimal_key_steps(4, reuse, pairs, triples)
    assert keys == (0, 1, 2, 3) and cost == 0.0
    keys, cost = C.optimal_key_steps(4, reuse, pairs)  # order 1 ignores it: its cost only depends on the spacing
    assert cost == pytest.approx(3.0 * 3)
    with pytest.raises(ValueError, match="needs the pairs table"):
        C.optimal_key_steps(4, reuse, None, triples)


def test_pair_objective_uses_reuse_after_the_first_key_only():
    n = 5
    reuse = np.triu(np.full((n, n), 10.0), 1)
    pairs = np.zeros((n, n, n))  # extrapolating is free: the best set keeps the reuse stretch after key 0 short
    keys, cost = C.optimal_key_steps(2, reuse, pairs)
    assert keys == (0, 1) and cost == 0.0
    with pytest.raises(ValueError, match="num_keys=6"):
        C.optimal_key_steps(6, reuse)


def test_a_loop_with_repeated_timesteps_is_complete_without_the_triples_table():
    """Heun-like loops repeat timesteps: measure() skips the second-order table there, so a stored calibration
    without it must count as complete (else order 2 would measure again on every use)."""
    n = 5
    calibration = C.Calibration({}, [999.0, 800.0, 800.0, 600.0, 600.0], np.ones(n), np.zeros((n, n)),
                                np.zeros((n, n, n)))
    assert C._complete(calibration, (True, True)) and calibration.objective("extrapolate", 2) == "extrapolate"
    calibration.timesteps = [999.0, 800.0, 700.0, 600.0, 500.0]
    assert not C._complete(calibration, (True, True)) and C._complete(calibration, (True, False))


def test_last_step_weight_is_the_sampler_coefficient(tmp_path):
    """After the last step nothing corrects a displacement: G(n-1) is DDIM's coefficient of eps in x_n, squared."""
    pipe = make_pipe("sd")
    inputs = pipe_inputs("sd", steps=4)
    extra = {k: inputs[k] for k in ("prompt_embeds", "negative_prompt_embeds", "height", "width")}
    calibration = C.calibration_for(pipe, 4, num_samples=2, guidance_scale=5.0, pipeline_kwargs=extra,
                                    cache_dir=tmp_path, progress=False)
    scheduler = pipe.scheduler
    a_t = float(scheduler.alphas_cumprod[int(calibration.timesteps[-1])])
    a_final = float(scheduler.final_alpha_cumprod)
    coefficient = math.sqrt(1 - a_final) - math.sqrt(a_final) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    assert calibration.weights[-1] == pytest.approx(coefficient ** 2, rel=1e-4)
    assert calibration.weights[0] == 0 and np.all(calibration.weights[1:] > 0)
    assert calibration.key["guidance_scale"] == 5.0 and calibration.meta["prompts"] is None


# -- the measured tables -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    return make_demo_pipe()


@pytest.fixture(scope="module")
def demo_calibration(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    calibration = C.calibration_for(demo, STEPS, "extrapolate", num_samples=2, cache_dir=folder, progress=False,
                                    extrapolation_order=2)
    return calibration, folder


def _plain_trace(pipe, num_samples):
    """The UNet calls of a plain run of the calibration samples, recorded with torch hooks (no tiec)."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append(([a.clone() if isinstance(a, torch.Tensor) else a for a in args], dict(kwargs),
                      out[0].clone()))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        prompts = C.calibration_prompts(pipe, None, num_samples)
        generators = [torch.Generator().manual_seed(C.CALIBRATION_SEED + i) for i in range(num_samples)]
        with torch.no_grad():
            pipe(prompts, num_inference_steps=STEPS, generator=generators, output_type="pt")
    finally:
        handle.remove()
    return calls


def _guided(out, scale):
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("keys, step", [((0, 2), 4), ((0, 1, 3), 5), ((0, 1, 2, 4), 5), ((0, 1, 3, 4), 5)])
def test_table_entry_matches_a_decode_by_hand(demo, demo_calibration, keys, step):
    """One entry, recomputed through tiec's own bare-UNet path on the plain run's recorded inputs (the last one,
    two or three of ``keys`` are the keys the estimate uses; the keys before them are every step)."""
    calibration, _ = demo_calibration
    calls = _plain_trace(demo, 2)
    used = len(keys) - 1  # reuse: 1 key, extrapolate: 2, order 2: 3
    estimator = "reuse" if used == 1 else "extrapolate"
    key_steps = list(range(keys[-used] + 1)) + list(keys[len(keys) - used + 1:])
    config = tiec.EncoderPropagationConfig(key_steps=key_steps, estimator=estimator,
                                           extrapolation_order=2 if used == 3 else 1)
    handle = tiec.apply(demo.unet, config)
    try:
        handle.start_run(STEPS)
        with torch.no_grad():
            for s in range(step + 1):
                args, kwargs, _ = calls[s]
                out = demo.unet(*args, **kwargs)[0]
    finally:
        handle.remove()
    g = DEFAULT_GUIDANCE
    expected = float((_guided(out, g).double() - _guided(calls[step][2], g).double()).pow(2).mean())
    table = {1: calibration.reuse_mse, 2: calibration.pairs_mse, 3: calibration.triples_mse}[used]
    assert table[(*keys[-used:], step)] == pytest.approx(expected, rel=1e-4)


def test_store_round_trip_and_reuse_of_matching_inputs(demo, demo_calibration, monkeypatch):
    calibration, folder = demo_calibration
    assert calibration.path.parent == folder and calibration.path.is_file()
    data = json.loads(calibration.path.read_text())
    assert data["meta"]["seeds"] == [C.CALIBRATION_SEED, C.CALIBRATION_SEED + 1]
    assert data["key"]["guidance_scale"] == DEFAULT_GUIDANCE and data["key"]["scheduler"]["class"] == "DDIMScheduler"
    loaded = C.Calibration.from_json(data)
    np.testing.assert_allclose(loaded.reuse_mse, calibration.reuse_mse)
    np.testing.assert_allclose(loaded.pairs_mse, calibration.pairs_mse)
    np.testing.assert_allclose(loaded.triples_mse, calibration.triples_mse)
    assert np.isnan(loaded.triples_mse[1, 1, 2, 3]) and not np.isnan(loaded.triples_mse[0, 1, 2, 3])
    monkeypatch.setattr(C, "measure", lambda *a, **k: pytest.fail("a matching stored calibration was measured again"))
    keys = C.calibrate(demo, STEPS, 3, "extrapolate", num_samples=2, cache_dir=folder)
    assert tuple(keys) == calibration.solve(3, "extrapolate")
    keys = C.calibrate(demo, STEPS, 4, "extrapolate", num_samples=2, cache_dir=folder, extrapolation_order=2)
    assert tuple(keys) == calibration.solve(4, "extrapolate", 2)
    assert calibration.objective("extrapolate", 2) == "extrapolate2" and calibration.objective("interpolate", 2) \
        == "reuse"
    # a calibration stored without the second-order table (order 1, or before it existed) falls back to order 1
    older = C.Calibration.from_json({k: v for k, v in data.items() if k != "extrapolate2_mse"})
    assert older.triples_mse is None and older.objective("extrapolate", 2) == "extrapolate"
    assert older.solve(4, "extrapolate", 2) == calibration.solve(4, "extrapolate")
    assert schedules.calibrate(demo, STEPS, 3, num_samples=2, cache_dir=folder) == list(calibration.solve(3))


def test_weights_fingerprint_follows_the_weights(demo):
    first = C.weights_fingerprint(demo.unet)
    assert C.weights_fingerprint(demo.unet) == first
    other = make_demo_pipe(seed=1)
    assert C.weights_fingerprint(other.unet) != first


# -- auto:K ---------------------------------------------------------------------------------------------------

def _demo_images(pipe, config):
    with tiec.apply(pipe, config) as handle:
        with torch.no_grad():
            images = pipe(["sneaker", "bag"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
        return images, dict(handle.stats)


def test_auto_measures_on_first_use_then_reads_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path))
    pipe = make_demo_pipe()
    measured = []
    real = C.measure

    def counting(*args, **kwargs):
        measured.append(args[1])
        return real(*args, **dict(kwargs, num_samples=2, progress=False))

    monkeypatch.setattr(C, "measure", counting)
    config = tiec.EncoderPropagationConfig(key_steps="auto:3")
    first, stats = _demo_images(pipe, config)
    assert measured == [STEPS] and stats["encoder_runs"] == 3
    assert len(list((tmp_path / "calibration").glob("calibration-*.json"))) == 1
    second, _ = _demo_images(pipe, config)
    assert measured == [STEPS]  # read from the store
    np.testing.assert_array_equal(first, second)  # measuring inside the first call did not disturb it
    keys = C.load(C.calibration_key(pipe.unet, pipe.scheduler, STEPS, DEFAULT_GUIDANCE)).solve(3)
    explicit, _ = _demo_images(pipe, tiec.EncoderPropagationConfig(key_steps=list(keys)))
    np.testing.assert_array_equal(first, explicit)
    assert type(pipe).__name__ == "FashionPipeline" and "__tiec_observers__" not in type(pipe).__dict__


def test_auto_on_a_bare_unet(tmp_path, monkeypatch):
    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path))
    pipe = make_demo_pipe()
    handle = tiec.apply(pipe.unet, tiec.EncoderPropagationConfig(key_steps="auto:3"))
    try:
        with pytest.raises(ValueError, match="no stored calibration for this UNet at 6 steps.*bare UNet"):
            handle.start_run(STEPS)
        keys = C.calibrate(pipe, STEPS, 3, num_samples=1, progress=False)
        handle.start_run(STEPS)
        assert handle.parts[0]._run.key_steps == tuple(keys)
    finally:
        handle.remove()


def test_auto_needs_a_stored_calibration_outside_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path))
    pipe = make_pipe("sd")
    config = tiec.EncoderPropagationConfig(key_steps="auto:2")
    with tiec.apply(pipe, config):
        with pytest.raises(ValueError, match="no stored calibration for this model, DDIMScheduler and 5 steps"):
            pipe(**pipe_inputs("sd", steps=5))
    inputs = pipe_inputs("sd", steps=5)
    extra = {k: inputs[k] for k in ("prompt_embeds", "negative_prompt_embeds", "height", "width")}
    keys = C.calibrate(pipe, 5, 2, num_samples=2, guidance_scale=5.0, pipeline_kwargs=extra, progress=False)
    with tiec.apply(pipe, config) as handle:
        with torch.no_grad():
            pipe(**pipe_inputs("sd", steps=5))
        assert handle.stats["encoder_runs"] == 2
    assert len(keys) == 2 and keys[0] == 0


def test_auto_with_order_two_measures_the_second_order_table(tmp_path, monkeypatch):
    """A stored order-1 calibration lacks the table order 2 is optimised on: the demo measures it once, and
    ``auto:K`` with ``extrapolation_order=2`` then runs the keys of the second-order objective."""
    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path))
    pipe = make_demo_pipe()
    real, measured = C.measure, []

    def counting(*args, **kwargs):
        measured.append(kwargs.get("extrapolation_order", 1))
        return real(*args, **dict(kwargs, num_samples=1, progress=False))

    monkeypatch.setattr(C, "measure", counting)
    first = tiec.EncoderPropagationConfig(key_steps="auto:4", estimator="extrapolate")
    second = tiec.EncoderPropagationConfig(key_steps="auto:4", estimator="extrapolate", extrapolation_order=2)
    _demo_images(pipe, first)
    assert measured == [1]
    with tiec.apply(pipe, second) as handle:
        with torch.no_grad():
            pipe(["bag"], num_inference_steps=STEPS, output_type="np")
        used = handle.parts[0].last_key_steps
    assert measured == [1, 2]
    stored = C.load(C.calibration_key(pipe.unet, pipe.scheduler, STEPS, DEFAULT_GUIDANCE))
    assert stored.triples_mse is not None and used == stored.solve(4, "extrapolate", 2)
    _demo_images(pipe, first)
    _demo_images(pipe, second)
    assert measured == [1, 2]  # both read the store now


def test_calibration_refuses_other_methods_on_the_unet(tmp_path):
    pipe = make_demo_pipe()
    with tiec.apply(pipe, tiec.TokenMergingConfig(ratio=0.5)):
        with pytest.raises(ValueError, match="TokenMerging is applied"):
            C.calibrate(pipe, 4, 2, num_samples=1, cache_dir=tmp_path, progress=False)
    assert "forward" not in pipe.unet.__dict__


@pytest.mark.parametrize("spec, fragment", [("auto:0", "must be >= 1"), ("auto:x", "not an integer")])
def test_auto_spec_validation(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiec.EncoderPropagationConfig(key_steps=spec)
    assert schedules.validate("auto:4") == "auto:4"
    with pytest.raises(ValueError, match="at most auto:4"):
        schedules.resolve("auto:5", 4)
    with pytest.raises(ValueError, match="needs the pipeline"):
        schedules.resolve("auto:2", 4)


def test_calibration_seeds_never_meet_evaluation_seeds():
    from tiec.eval.bench import BenchSettings

    for settings in (BenchSettings.create(), BenchSettings.create(quick=True)):
        evaluation = range(settings.seed, settings.seed + settings.num_images)
        assert evaluation[-1] < C.CALIBRATION_SEED
    # the seed-to-seed spread uses a few disjoint sets of 1,000: still far below
    assert 10 * 1000 < C.CALIBRATION_SEED


# -- the command line ------------------------------------------------------------------------------------------

def test_cli_calibrate(tmp_path, capsys, monkeypatch):
    import tiec.demo

    monkeypatch.setattr(tiec.demo, "load_pipeline", lambda device=None: make_demo_pipe())
    code = main(["calibrate", "--steps", "5", "--keys", "2", "--num-samples", "1", "--cache-dir", str(tmp_path),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "key steps (2 of 5, DDIMScheduler, reuse objective): 0," in out
    assert "uniform:2" in out and str(tmp_path) in out
    code = main(["calibrate", "--steps", "5", "--keys", "3", "--num-samples", "1", "--cache-dir", str(tmp_path),
                 "--estimator", "extrapolate", "--order", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "key steps (3 of 5, DDIMScheduler, extrapolate2 objective): 0," in out


@pytest.mark.parametrize("argv, fragment", [
    (["--keys", "0"], "--keys 0: must be an integer >= 1"),
    (["--steps", "4", "--keys", "5"], "--keys 5: at most --steps 4"),
    (["--prompts", "spaceship"], "names no known class"),
    (["--max-triple-steps", "0"], "--max-triple-steps 0: must be an integer >= 1"),
])
def test_cli_calibrate_errors(argv, fragment, capsys):
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_check_validates_auto_without_a_model():
    schedules.check("auto:9", 50)
    schedules.check("uniform:5", 20)
    with pytest.raises(ValueError, match="at most auto:4"):
        schedules.check("auto:5", 4)
    with pytest.raises(ValueError, match="out of range"):
        schedules.check([0, 10], 10)


def test_cli_generate_with_auto(tmp_path, capsys, monkeypatch):
    import tiec.demo

    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiec.demo, "load_pipeline", lambda device=None: make_demo_pipe())
    out = tmp_path / "bag.png"
    assert main(["generate", "--prompt", "bag", "--steps", "4", "--key-steps", "auto:2", "--method", "reuse",
                 "--out", str(out)]) == 0
    assert "encoder runs 2/4" in capsys.readouterr().out and out.is_file()
    assert len(list((tmp_path / "calibration").glob("calibration-*.json"))) == 1
