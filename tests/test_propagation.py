"""Encoder propagation on stock diffusers pipelines: exactness, counts, removal, errors."""

import numpy as np
import pytest
import torch
from conftest import SCHEDULERS, make_pipe, module_attributes, run, tiny_unet

import tiec

KINDS = ("sd", "sdxl", "img2img", "controlnet")
FD = tiec.EncoderPropagationConfig  # FasterDiffusion key steps by default


@pytest.fixture(scope="module")
def pipes():
    return {}


def get_pipe(pipes, kind, scheduler="ddim"):
    if (kind, scheduler) not in pipes:
        pipes[kind, scheduler] = make_pipe(kind, scheduler)
    return pipes[kind, scheduler]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_key_steps_is_bitwise_plain(pipes, kind, scheduler):
    pipe = get_pipe(pipes, kind, scheduler)
    plain = run(pipe, kind, steps=8)
    for parallel in (False, True):
        for estimator in ("reuse", "extrapolate", "interpolate"):
            with tiec.apply(pipe, FD(key_steps="all", parallel=parallel, estimator=estimator)) as handle:
                out = run(pipe, kind, steps=8)
            assert np.array_equal(out, plain), (parallel, estimator)
            assert handle.stats["encoder_runs"] == handle.stats["decoder_runs"] == handle.stats["unet_calls"]
    assert np.array_equal(run(pipe, kind, steps=8), plain)


@pytest.mark.parametrize("kwargs", [dict(guidance=1.0), dict(batch=2), dict(num_images_per_prompt=2)])
def test_all_key_steps_bitwise_without_guidance_and_batched(pipes, kwargs):
    pipe = get_pipe(pipes, "sd")
    plain = run(pipe, "sd", steps=6, **kwargs)
    for parallel in (False, True):
        with tiec.apply(pipe, FD(key_steps="all", parallel=parallel)):
            assert np.array_equal(run(pipe, "sd", steps=6, **kwargs), plain)


@pytest.mark.parametrize("kind", KINDS)
def test_faster_diffusion_counts_and_parallel_equals_serial(pipes, kind):
    pipe = get_pipe(pipes, kind)
    plain = run(pipe, kind, steps=50)
    outs = {}
    for parallel in (False, True):
        with tiec.apply(pipe, FD(parallel=parallel)) as handle:
            outs[parallel] = run(pipe, kind, steps=50)
        stats = handle.stats
        runs = 30 if kind == "img2img" else 50  # strength 0.6 runs 30 of 50 steps
        keys = tiec.schedules.resolve("faster-diffusion", runs)
        assert stats["unet_calls"] == runs and stats["decoder_runs"] == runs
        assert stats["encoder_runs"] == len(keys) == (9 if runs == 50 else len(keys))
        if kind == "controlnet":
            assert stats["controlnet_runs"] == len(keys)
        if parallel:
            cap = tiec.propagation.DEFAULT_MAX_PARALLEL  # a group of n steps is decoded in chunks of at most cap
            chunks = [min(cap, b - s) for a, b in zip(keys, keys[1:] + (runs,)) for s in range(a + 1, b, cap)]
            assert stats["batched_decoder_calls"] == sum(1 for n in chunks if n > 1)
    assert not np.allclose(outs[True], plain, atol=1e-3)
    # Measured on these tiny fp32 models: at most ~7e-7 (batched convolutions sum in another order).
    assert np.abs(outs[True] - outs[False]).max() < 1e-4


def test_controlnet_plain_runs_fifty_times_and_control_reaches_features(pipes):
    pipe = get_pipe(pipes, "controlnet")
    calls = []
    # a hook on a ControlNet part counts real evaluations (the ControlNet itself is still called every step)
    hook = pipe.controlnet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        base = run(pipe, "controlnet", steps=50)
        assert len(calls) == 50
        calls.clear()
        with tiec.apply(pipe, FD()):
            with_control = run(pipe, "controlnet", steps=50)
            other = run(pipe, "controlnet", steps=50, controlnet_conditioning_scale=0.0)
        assert len(calls) == 18
    finally:
        hook.remove()
    assert np.abs(with_control - other).max() > 1e-2  # the control residuals reach the cached features
    assert not np.array_equal(base, with_control)


def test_max_parallel_splits_groups(pipes):
    pipe = get_pipe(pipes, "sd")
    with tiec.apply(pipe, FD(max_parallel=3)) as handle:
        capped = run(pipe, "sd", steps=50)
    with tiec.apply(pipe, FD(parallel=False)):
        serial = run(pipe, "sd", steps=50)
    # groups between FD key steps: 1 (step 4), 4, 4, 9, 9, 14 steps, cut into chunks of at most 3;
    # a chunk of one step decodes serially: 4 -> 3+1, 9 -> 3+3+3, 14 -> 3+3+3+3+2
    assert handle.stats["batched_decoder_calls"] == 0 + 1 + 1 + 3 + 3 + 5
    assert np.abs(capped - serial).max() < 1e-4


def test_remove_and_apply_twice_restore_exactly(pipes):
    pipe = get_pipe(pipes, "sd")
    unet = pipe.unet
    before = module_attributes(unet)
    cls = type(pipe)
    plain = run(pipe, "sd", steps=10)
    first = tiec.apply(pipe, FD(key_steps="every:3"))
    second = tiec.apply(pipe, FD(key_steps="every:2", estimator="extrapolate"))
    with_second = run(pipe, "sd", steps=10)
    assert second.stats["encoder_runs"] == 5
    first.remove()
    assert np.array_equal(run(pipe, "sd", steps=10), with_second)
    second.remove()
    assert np.array_equal(run(pipe, "sd", steps=10), plain)
    assert type(pipe) is cls
    assert module_attributes(unet) == before
    assert "forward" not in unet.__dict__ and not hasattr(unet, "_diffusers_hook")


def test_exception_inside_call_leaves_no_stale_state(pipes):
    pipe = get_pipe(pipes, "sd")
    with tiec.apply(pipe, FD(key_steps="uniform:3")) as handle:
        good = run(pipe, "sd", steps=10)

        def boom(pipe_, i, t, kwargs):
            if i == 4:
                raise RuntimeError("user callback failed")
            return kwargs
        with pytest.raises(RuntimeError, match="user callback failed"):
            run(pipe, "sd", steps=10, callback_on_step_end=boom)
        again = run(pipe, "sd", steps=10)
        assert handle.stats["unet_calls"] == 10 and handle.stats["encoder_runs"] == 3
    assert np.array_equal(good, again)


def test_noise_injection_changes_late_steps_only(pipes):
    pipe = get_pipe(pipes, "sd")
    with tiec.apply(pipe, FD(key_steps="all")):
        plain = run(pipe, "sd", steps=20)
    with tiec.apply(pipe, FD(key_steps="all", noise_injection=0.003)):
        injected = run(pipe, "sd", steps=20)
    with tiec.apply(pipe, FD(key_steps="all", noise_injection=0.003, noise_injection_tau=-1)):
        never = run(pipe, "sd", steps=20)
    assert np.array_equal(never, plain)
    assert not np.array_equal(injected, plain)
    assert np.abs(injected - plain).max() < 0.2


def test_noise_injection_adds_w_times_initial_latent():
    """Before each step with t < tau the latent is the scheduler's output plus w * z_T, else exactly its output."""
    pipe = make_pipe("sd")
    inputs, outputs = [], []
    original_step = pipe.scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):  # sits under tiec's wrapper
        inputs.append(sample.clone())
        out = original_step(model_output, timestep, sample, *args, **kwargs)
        outputs.append(out[0].clone())
        return out
    pipe.scheduler.step = spy
    with tiec.apply(pipe, FD(key_steps="all", noise_injection=0.5, noise_injection_tau=600)):
        run(pipe, "sd", steps=6, output_type="latent")
    timesteps = pipe.scheduler.timesteps.tolist()
    z_T = inputs[0]
    injected = 0
    for i in range(1, len(timesteps)):
        if timesteps[i] < 600:
            torch.testing.assert_close(inputs[i], outputs[i - 1] + 0.5 * z_T, rtol=0, atol=1e-6)
            injected += 1
        else:
            assert torch.equal(inputs[i], outputs[i - 1])
    assert injected == sum(1 for t in timesteps[1:] if t < 600) > 0
    assert pipe.scheduler.__dict__["step"] is spy  # tiec's wrapper is gone after the call


def test_bare_unet_serial():
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    timesteps = torch.arange(999, 0, -100)
    with torch.no_grad():
        plain = [unet(sample, t, text).sample for t in timesteps]
        with tiec.apply(unet, FD(key_steps="all")) as handle:
            handle.start_run(len(timesteps))
            same = [unet(sample, t, text).sample for t in timesteps]
        assert all(torch.equal(a, b) for a, b in zip(plain, same))
        with tiec.apply(unet, FD(key_steps="every:5", estimator="extrapolate")) as handle:
            with pytest.raises(RuntimeError, match="start_run"):
                unet(sample, timesteps[0], text)
            handle.start_run(len(timesteps))
            outs = [unet(sample, t, text).sample for t in timesteps]
            assert handle.stats["encoder_runs"] == 2 and handle.stats["decoder_runs"] == 10
        assert torch.equal(outs[0], plain[0]) and not torch.equal(outs[1], plain[1])
    assert "forward" not in unet.__dict__


def test_bad_targets_and_configs():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        tiec.apply(torch.nn.Linear(2, 2), FD())
    with pytest.raises(TypeError, match="expected one of"):
        tiec.apply(tiny_unet(), "reuse")
    with pytest.raises(ValueError, match="at least one config"):
        tiec.apply(tiny_unet())
    with pytest.raises(ValueError, match="interpolate"):
        tiec.apply(tiny_unet(), FD(estimator="interpolate"))


def test_torch_compile_wrapper_gets_a_helpful_error():
    unet = tiny_unet()
    with pytest.raises(TypeError, match="compile its blocks in place"):
        tiec.apply(torch.compile(unet), FD())
