"""The TIEC estimators as pure functions, and in the pipeline."""

import numpy as np
import pytest
import torch

import tiec
from conftest import make_pipe, run
from tiec import estimators as E


def linear_features(t, a, b):
    return tuple(x + y * t for x, y in zip(a, b))


@pytest.fixture
def ab():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    return ([torch.randn(s, generator=g, dtype=torch.float64) for s in shapes],
            [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes])


@pytest.mark.parametrize("t_s", [700.0, 650.5, 420.0, 1.0])
def test_extrapolate_reproduces_features_linear_in_t(ab, t_s):
    a, b = ab
    f1, f2 = linear_features(900.0, a, b), linear_features(780.0, a, b)
    for got, want in zip(E.extrapolate(f1, f2, 900.0, 780.0, t_s), linear_features(t_s, a, b)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("t_s", [799.0, 700.0, 601.0])
def test_interpolate_reproduces_features_linear_in_t(ab, t_s):
    a, b = ab
    fc, fn = linear_features(800.0, a, b), linear_features(600.0, a, b)
    for got, want in zip(E.interpolate(fc, fn, 800.0, 600.0, t_s), linear_features(t_s, a, b)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_exactly_representable_case_is_exact():
    f1, f2 = (torch.tensor([1.0, -2.0]),), (torch.tensor([3.0, 2.0]),)
    assert torch.equal(E.extrapolate(f1, f2, 800.0, 600.0, 400.0)[0], torch.tensor([5.0, 6.0]))
    assert torch.equal(E.interpolate(f1, f2, 800.0, 600.0, 700.0)[0], torch.tensor([2.0, 0.0]))


def test_constant_features_make_every_estimator_reuse(ab):
    a, _ = ab
    a32 = tuple(x.float() for x in a)
    for out in (E.extrapolate(a32, a32, 900.0, 700.0, 512.0), E.interpolate(a32, a32, 700.0, 300.0, 512.0)):
        for got, want in zip(out, E.reuse(a32)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_weights_at_key_steps_give_key_features_back(ab):
    a, b = ab
    assert E.line_weight(900.0, 700.0, 900.0) == 1.0 and E.line_weight(900.0, 700.0, 700.0) == 0.0
    for got, want in zip(E.extrapolate(a, b, 900.0, 700.0, 700.0), b):
        assert torch.equal(got, want)
    for got, want in zip(E.extrapolate(a, b, 900.0, 700.0, 900.0), a):
        assert torch.equal(got, want)
    for got, want in zip(E.interpolate(a, b, 900.0, 700.0, 900.0), a):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="distinct"):
        E.line_weight(5.0, 5.0, 1.0)


def test_ddim_jump_is_exact_for_consistent_inputs():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    a_t, a_n = 0.3, 0.7
    x_t = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps
    want = a_n ** 0.5 * x0 + (1 - a_n) ** 0.5 * eps
    torch.testing.assert_close(E.ddim_jump(x_t, eps, a_t, a_n), want)
    v = a_t ** 0.5 * eps - (1 - a_t) ** 0.5 * x0
    torch.testing.assert_close(E.ddim_jump(x_t, v, a_t, a_n, "v_prediction"), want)
    torch.testing.assert_close(E.ddim_jump(x_t, x0, a_t, a_n, "sample"), want)
    with pytest.raises(ValueError, match="prediction_type"):
        E.ddim_jump(x_t, eps, a_t, a_n, "flow")


@pytest.fixture(scope="module")
def sd_results():
    pipe = make_pipe("sd")
    out = {"plain": run(pipe, "sd", steps=50)}
    for estimator in E.ESTIMATORS:
        for parallel in (False, True):
            with tiec.apply(pipe, tiec.EncoderPropagationConfig(estimator=estimator, parallel=parallel)) as h:
                out[estimator, parallel] = run(pipe, "sd", steps=50)
            out[estimator, parallel, "stats"] = dict(h.stats)
    return out


def test_estimators_differ_from_reuse_and_parallel_matches_serial(sd_results):
    reuse = sd_results["reuse", True]
    for estimator in ("extrapolate", "interpolate"):
        assert np.abs(sd_results[estimator, True] - reuse).max() > 1e-3
    for estimator in E.ESTIMATORS:
        assert np.abs(sd_results[estimator, True] - sd_results[estimator, False]).max() < 1e-4


def test_interpolate_counts_its_look_ahead_encoders(sd_results):
    stats = sd_results["interpolate", True, "stats"]
    # FD key steps 0,1,2,3,5,10,15,25,35: a look-ahead for each interval with steps inside and a next key step
    assert stats["lookahead_runs"] == 5
    assert stats["encoder_runs"] == 9 + 5 and 10 <= stats["encoder_runs"] <= 18
    assert sd_results["extrapolate", True, "stats"]["encoder_runs"] == 9


def test_max_extrapolation_bounds_the_negative_weight():
    f1, f2 = (torch.tensor([0.0]),), (torch.tensor([1.0]),)
    assert torch.equal(E.extrapolate(f1, f2, 900.0, 800.0, 500.0)[0], torch.tensor([4.0]))  # w = -3
    assert torch.equal(E.extrapolate(f1, f2, 900.0, 800.0, 500.0, max_extrapolation=1.0)[0], torch.tensor([2.0]))
    assert torch.equal(E.extrapolate(f1, f2, 900.0, 800.0, 500.0, max_extrapolation=0.0)[0], torch.tensor([1.0]))


@pytest.mark.parametrize("field, value", [("blend_space", "sigma"), ("max_extrapolation", -1.0),
                                          ("max_extrapolation", "big")])
def test_blend_options_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        tiec.EncoderPropagationConfig(**{field: value})


def test_blend_spaces_run_and_differ():
    pipe = make_pipe("sd")
    out = {}
    for space in ("t", "log-snr", "step"):
        with tiec.apply(pipe, tiec.EncoderPropagationConfig(key_steps="uniform:4", estimator="extrapolate",
                                                            blend_space=space)):
            out[space] = run(pipe, "sd", steps=12)
    with tiec.apply(pipe, tiec.EncoderPropagationConfig(key_steps="uniform:4", estimator="extrapolate",
                                                        max_extrapolation=0.0)):
        clamped = run(pipe, "sd", steps=12)
    with tiec.apply(pipe, tiec.EncoderPropagationConfig(key_steps="uniform:4")):
        reuse = run(pipe, "sd", steps=12)
    assert np.array_equal(clamped, reuse)  # a zero bound turns extrapolation into reuse exactly
    assert not np.array_equal(out["t"], out["log-snr"])
    # DDIM's timesteps are evenly spaced, so t is an affine function of the step index and the weights agree
    # (IEEE division rounds both ratios of integers to the same float)
    assert np.array_equal(out["t"], out["step"])
    with pytest.raises(ValueError, match="log-snr"):
        tiec.apply(pipe.unet, tiec.EncoderPropagationConfig(blend_space="log-snr"))


def test_second_order_forecast_is_exact_on_quadratic_features():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    f = lambda t: (a + b * (t / 1000) + c * (t / 1000) ** 2,)
    keys = (900.0, 800.0, 700.0)
    for t_s in (650.0, 500.0, 100.0):
        got = E.extrapolate_quadratic(*(f(t) for t in keys), *keys, t_s)[0]
        assert torch.allclose(got, f(t_s)[0], rtol=0, atol=1e-12)
        line = E.extrapolate(f(800.0), f(700.0), 800.0, 700.0, t_s)[0]
        assert (line - f(t_s)[0]).abs().max() > 1e-3  # the line through the last two misses the curvature
    with pytest.raises(ValueError, match="three distinct"):
        E.extrapolate_quadratic(f(1.0), f(1.0), f(2.0), 1.0, 1.0, 2.0, 0.0)


def test_second_order_forecast_in_fp16_is_blended_in_float32():
    g = torch.Generator().manual_seed(1)
    base = 100 + torch.randn(4096, generator=g, dtype=torch.float64)
    fs = [base + k * 0.01 * torch.randn(4096, generator=g, dtype=torch.float64) for k in range(3)]
    ts = (1000.0, 950.0, 900.0)
    got = E.extrapolate_quadratic(*[(f.half(),) for f in fs], *ts, 0.0)[0]
    exact = E.extrapolate_quadratic(*[(f.half().double(),) for f in fs], *ts, 0.0)[0]
    assert got.dtype == torch.float16 and (got.double() - exact).abs().max() <= 0.07  # fp16 rounding of ~100


def test_second_order_in_a_pipeline(sd_pipe):
    outs = {}
    for order in (1, 2):
        for parallel in (False, True):
            config = tiec.EncoderPropagationConfig(key_steps=[0, 2, 4, 6], estimator="extrapolate",
                                                   extrapolation_order=order, parallel=parallel)
            with tiec.apply(sd_pipe, config) as handle:
                outs[order, parallel] = run(sd_pipe, "sd", steps=10)
            assert handle.stats["encoder_runs"] == 4 and handle.stats["decoder_runs"] == 10
    assert np.abs(outs[2, True] - outs[2, False]).max() < 1e-4
    assert not np.allclose(outs[1, False], outs[2, False])  # steps 7-9 use the quadratic through keys 2, 4, 6
    with pytest.raises(ValueError, match="extrapolation_order=3"):
        tiec.EncoderPropagationConfig(extrapolation_order=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blend_written_into_a_buffer_equals_blend(dtype):
    # batched decoders write each step's blend straight into their input buffer with torch.lerp(out=); the
    # values must be blend()'s bit for bit (serial and batched decoders see the same features)
    g = torch.Generator().manual_seed(2)
    a, b = ((100 * torch.randn(2, 8, 16, 16, generator=g)).to(dtype) for _ in range(2))
    end_a, end_b = E.blend_ends(a, b)
    assert end_b.dtype == torch.float32 and (end_b is b) == (dtype == torch.float32)
    for w in (-19.0, -2.5, -0.2, 0.3, 0.5, 0.75, 1.0):
        buffer = torch.empty(4, 8, 16, 16, dtype=dtype)
        torch.lerp(end_b, end_a, w, out=buffer[2:])
        want = E.blend((a,), (b,), w)[0]
        assert want.dtype == dtype and torch.equal(buffer[2:], want)
        exact = w * a.double() + (1 - w) * b.double()  # independent: the line in float64
        assert (want.double() - exact).abs().max() <= 2 * (exact.abs().max() * torch.finfo(dtype).eps)
