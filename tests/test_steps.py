"""Step identity, early loop ends, repeated timesteps, multi-call pipelines, cache safety and blends (issue 12)."""

import numpy as np
import pytest
import torch
from conftest import MORE_SCHEDULERS, make_pipe, make_scheduler, pipe_inputs, run, tiny_unet

import tiec
from tiec import estimators

FD = tiec.EncoderPropagationConfig


@pytest.fixture(scope="module")
def sd():
    return make_pipe("sd")


def with_scheduler(pipe, name):
    pipe.scheduler = make_scheduler(name)
    return pipe


@pytest.mark.parametrize("scheduler", MORE_SCHEDULERS)
def test_more_schedulers_exact_and_estimators_run(sd, scheduler):
    pipe = with_scheduler(sd, scheduler)
    try:
        plain = run(pipe, "sd", steps=8)
        calls = len(pipe.scheduler.timesteps)  # heun/kdpm2: two evaluations per step, each one a tiec step
        for estimator in ("reuse", "extrapolate", "interpolate"):
            with tiec.apply(pipe, FD(key_steps="all", estimator=estimator)):
                assert np.array_equal(run(pipe, "sd", steps=8), plain)
            outs = {}
            for parallel in (False, True):
                # key steps 0 and 1 share a timestep with Heun and KDPM2 (t1 is evaluated twice)
                with tiec.apply(pipe, FD(key_steps=[0, 1, 2, 6], estimator=estimator, parallel=parallel)) as h:
                    outs[parallel] = run(pipe, "sd", steps=8)
                assert h.stats["unet_calls"] == h.stats["decoder_runs"] == calls
                assert h.stats["encoder_runs"] - h.stats["lookahead_runs"] == 4
                assert h.stats["plain_calls"] == h.stats["recomputed_steps"] == 0
                assert np.isfinite(outs[parallel]).all()
            assert np.abs(outs[True] - outs[False]).max() < 1e-4, estimator
    finally:
        with_scheduler(sd, "ddim")


def test_repeated_timestep_keys_blend_without_error():
    f = lambda v: (torch.full((1, 2), float(v)),)
    slot = tiec.propagation._Slot()
    slot.store(0, 900.0, f(1))
    slot.store(1, 800.0, f(2))
    slot.store(2, 800.0, f(3))  # a second evaluation at t = 800 replaces the first
    assert sorted(slot.key_coords.values()) == [800.0, 900.0] and slot.features[2][0][0, 0] == 3


def test_denoising_end_resolves_keys_on_the_loop_that_runs():
    pipe = make_pipe("sdxl")
    with tiec.apply(pipe, FD(key_steps="uniform:4", parallel=True)) as handle:
        run(pipe, "sdxl", steps=20, denoising_end=0.6, output_type="latent")
    stats = handle.stats
    assert stats["unet_calls"] == 12  # diffusers keeps the timesteps >= 400 of 20
    assert stats["decoder_runs"] == 12 and stats["unused_decodes"] == 0
    assert stats["encoder_runs"] == len(tiec.schedules.resolve("uniform:4", 12)) == 4


def test_interrupt_counts_unused_decodes(sd):
    def stop(pipe, i, t, kwargs):
        if i == 4:
            pipe._interrupt = True
        return kwargs

    with tiec.apply(sd, FD(key_steps=[0, 3], parallel=True, max_parallel=None)) as handle:
        run(sd, "sd", steps=10, callback_on_step_end=stop)
    stats = handle.stats
    assert stats["unet_calls"] == 5
    # the group 4..9 was decoded at step 4 in one call; steps 5..9 were never called
    assert stats["decoder_runs"] == 10 and stats["unused_decodes"] == 5


class SplitGuidance(torch.nn.Module):
    """Calls the UNet once for the unconditional and once for the conditional half, as some pipelines do."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def __getattr__(self, name):  # config, dtype, device, ... of the wrapped UNet
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        outs = [self.unet(s, timestep, e, **kwargs) for s, e in zip(sample.chunk(2), encoder_hidden_states.chunk(2))]
        if kwargs.get("return_dict", True):
            return type(outs[0])(sample=torch.cat([o.sample for o in outs]))
        return (torch.cat([o[0] for o in outs]),)


def split_run(pipe, config, steps=10):
    """Apply ``config`` to the pipeline, then sample with its UNet called once per guidance half."""
    unet = pipe.unet
    handle = tiec.apply(pipe, config) if config is not None else None
    try:
        pipe.unet = SplitGuidance(unet)
        out = run(pipe, "sd", steps=steps)
    finally:
        pipe.unet = unet
        if handle is not None:
            handle.remove()
    return out, dict(handle.stats) if handle is not None else None


def test_two_unet_calls_per_step_keep_their_own_caches(sd):
    plain, _ = split_run(sd, None)
    exact, stats = split_run(sd, FD(key_steps="all"))
    assert np.array_equal(exact, plain) and stats["encoder_runs"] == 20
    outs = {}
    for parallel in (False, True):
        outs[parallel], stats = split_run(sd, FD(key_steps=[0, 3, 6], parallel=parallel))
        assert stats["unet_calls"] == 20 and stats["decoder_runs"] == 20
        assert stats["encoder_runs"] == 6 and stats["plain_calls"] == stats["recomputed_steps"] == 0
    assert np.abs(outs[True] - outs[False]).max() < 1e-4
    # each half decodes from its own key-step features, so the result is that of the joint guided call
    with tiec.apply(sd, FD(key_steps=[0, 3, 6], parallel=False)):
        joint = run(sd, "sd", steps=10)
    assert np.abs(outs[False] - joint).max() < 1e-4


def test_deepcache_two_unet_calls_per_step_keep_their_own_caches(sd):
    """DeepCache reads each call's step from its timestep: split guidance halves are one step, each with its cache."""
    config = tiec.DeepCacheConfig(cache_interval=3)
    split, stats = split_run(sd, config)
    assert stats["unet_calls"] == 20 and stats["full_steps"] == 2 * 4 and stats["shallow_steps"] == 2 * 6
    with tiec.apply(sd, config):
        joint = run(sd, "sd", steps=10)
    assert np.abs(split - joint).max() < 1e-4


def test_decoder_writing_into_its_inputs_cannot_change_the_cache(sd):
    """A mutator in the chain (as FreeU and T2I-Adapter are): it scales the first up block's input in place."""
    def scale_in_place(module, args, kwargs):
        kwargs["hidden_states"].mul_(1.5)

    hook = sd.unet.up_blocks[0].register_forward_pre_hook(scale_in_place, with_kwargs=True)
    try:
        outs = {}
        for parallel in (False, True):
            with tiec.apply(sd, FD(key_steps="every:5", parallel=parallel)):
                outs[parallel] = run(sd, "sd", steps=20)
    finally:
        hook.remove()
    # the cache drifted by a factor 1.5 per non-key step before (serial and batched then differ by ~1e-2)
    assert np.abs(outs[True] - outs[False]).max() < 1e-4


def test_bare_unet_second_loop_without_start_run_raises():
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    handle = tiec.apply(unet, FD(key_steps="every:2"))
    try:
        handle.start_run(3)
        with torch.no_grad():
            for t in (900, 600, 300):
                unet(sample, t, text)
            with pytest.raises(RuntimeError, match="start_run"):
                unet(sample, 900, text)
    finally:
        handle.remove()


def test_fp16_extrapolation_keeps_precision():
    g = torch.Generator().manual_seed(0)
    a64 = 100 + torch.randn(4096, generator=g, dtype=torch.float64)
    b64 = a64 + 0.01 * torch.randn(4096, generator=g, dtype=torch.float64)
    a, b = a64.half(), b64.half()
    w = estimators.line_weight(1000.0, 950.0, 0.0)  # keys 0, 1 of a 20-step loop extrapolated to its end: w = -19
    got = estimators.blend((a,), (b,), w)[0]
    reference = (w * a.double() + (1 - w) * b.double())  # exact blend of the fp16 inputs
    # fp16 arithmetic lost up to ~1 here (two terms of ~2000 cancel); blending in float32 leaves only fp16 rounding
    assert (got.double() - reference).abs().max() <= 0.07
    assert got.dtype == torch.float16
    assert torch.equal(estimators.blend((a,), (b,), 0.0)[0], b) and torch.equal(estimators.blend((a,), (b,), 1.0)[0], a)


def test_noise_injection_has_unit_variance_with_sigma_scaled_schedulers(sd):
    """Euler's latents start at init_noise_sigma (~14.6) times the noise: the injection must not scale with it."""
    injected = {}
    for scheduler in ("ddim", "euler"):
        pipe = with_scheduler(sd, scheduler)
        first = []

        def keep_first(pipe, i, t, kwargs):
            if i == 0:
                first.append(kwargs["latents"].clone())
            return kwargs

        run(pipe, "sd", steps=10, callback_on_step_end=keep_first)
        with tiec.apply(pipe, FD(key_steps="all", noise_injection=0.5, noise_injection_tau=1000)):
            run(pipe, "sd", steps=10, callback_on_step_end=keep_first)
        # the first step's output differs by exactly the injection (its inputs were still equal)
        delta = (first[1] - first[0]) / 0.5
        sigma = float(pipe.scheduler.sigmas[1]) if scheduler == "euler" else 0.0
        injected[scheduler] = float(delta.std()) / (sigma ** 2 + 1) ** 0.5  # back in variance-preserving units
    with_scheduler(sd, "ddim")
    assert 0.8 < injected["ddim"] < 1.2 and 0.8 < injected["euler"] < 1.2, injected


def test_interpolate_refuses_instruct_pix2pix():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = make_pipe("sd")
    ip2p = StableDiffusionInstructPix2PixPipeline(**{k: v for k, v in pipe.components.items()},
                                                  requires_safety_checker=False)
    with pytest.raises(ValueError, match="InstructPix2Pix.*three-way"):
        tiec.apply(ip2p, FD(estimator="interpolate"))
    assert type(ip2p) is StableDiffusionInstructPix2PixPipeline
    tiec.apply(ip2p, FD(estimator="extrapolate")).remove()


def test_interpolate_look_ahead_uses_the_rescaled_guided_prediction(sd):
    """The look-ahead jumps with the prediction the pipeline steps with: guided, then guidance-rescaled."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    inputs, outputs = [], []
    hooks = [sd.unet.conv_in.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone())),
             sd.unet.register_forward_hook(lambda m, args, kwargs, out: outputs.append(out[0].clone()),
                                           with_kwargs=True)]
    try:
        with tiec.apply(sd, FD(key_steps=[0, 5], estimator="interpolate", parallel=False)) as handle:
            run(sd, "sd", steps=10, guidance=5.0, guidance_rescale=0.7)
    finally:
        for hook in hooks:
            hook.remove()
    assert handle.stats["lookahead_runs"] == 1  # after key step 5 there is no next key to look at
    x, x_next, out = inputs[0], inputs[1], outputs[0]  # key step 0, then its look-ahead encoder pass
    uncond, cond = out.chunk(2)
    eps = rescale_noise_cfg(uncond + 5.0 * (cond - uncond), cond, guidance_rescale=0.7).repeat(2, 1, 1, 1)
    timesteps, alphas = sd.scheduler.timesteps, sd.scheduler.alphas_cumprod
    a, a_next = alphas[timesteps[0]].double(), alphas[timesteps[5]].double()
    x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    expected = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps.double()
    assert (x_next.double() - expected).abs().max() < 1e-4


def test_controlnet_replay_honours_the_scale_of_each_step():
    pipe = make_pipe("controlnet")
    seen = []

    def record(module, args, kwargs):
        residual = kwargs.get("mid_block_additional_residual")
        seen.append(None if residual is None else float(residual.abs().max()))

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with tiec.apply(pipe, FD(key_steps=[0, 4], parallel=False)) as handle:
            run(pipe, "controlnet", steps=10, control_guidance_end=0.55)
    finally:
        hook.remove()
    # control is on for the first 5 of 10 steps (diffusers keeps step i while (i + 1)/10 <= 0.55) and off after
    assert all(v > 0 for v in seen[:5]) and all(v == 0 for v in seen[5:]), seen
    assert handle.stats["controlnet_runs"] == 2


@pytest.mark.parametrize("region", ["whole", "repeated"])
def test_torch_compile_graphs_are_bounded_and_not_recompiled(region):
    """tiec's step logic stays out of compiled graphs: nothing new is compiled after the first call."""
    import torch._dynamo as dynamo

    def count(with_tiec):
        dynamo.reset()
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        pipe = make_pipe("sd")
        handle = tiec.apply(pipe, FD(key_steps="every:3", parallel=False)) if with_tiec else None
        if region == "whole":
            pipe.unet.compile(backend=backend)
        else:
            for module in pipe.unet.modules():
                if type(module).__name__ in pipe.unet._repeated_blocks:
                    module.compile(backend=backend)
        run(pipe, "sd", steps=9)
        first = len(graphs)
        out = run(pipe, "sd", steps=9)
        if handle is not None:
            handle.remove()
        return first, len(graphs) - first, out

    plain_graphs, plain_added, _ = count(False)
    graphs, added, out = count(True)
    assert added == plain_added == 0
    # whole-model compile: tiec's forward is a graph break, the UNet runs eagerly; regional: the same graphs as plain
    assert graphs == (0 if region == "whole" else plain_graphs)
    assert np.isfinite(out).all()


def ip2p_pipe():
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    from tiec.testing import TINY_SD_UNET_CONFIG

    torch.manual_seed(0)
    components = dict(make_pipe("sd").components, unet=UNet2DConditionModel(**dict(TINY_SD_UNET_CONFIG, in_channels=8)))
    components.pop("image_encoder", None)
    pipe = StableDiffusionInstructPix2PixPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["pag", "instruct-pix2pix"])
def test_pipelines_with_three_way_guidance(kind):
    """PAG and InstructPix2Pix guide a three-way batch in one UNet call a step (8 input channels for the latter)."""
    from diffusers import StableDiffusionPAGPipeline

    if kind == "pag":
        base = make_pipe("sd")
        components = {k: v for k, v in base.components.items() if k != "image_encoder"}
        pipe = StableDiffusionPAGPipeline(**components, requires_safety_checker=False, pag_applied_layers=["mid"])
        pipe.set_progress_bar_config(disable=True)
        extra, estimators_ = dict(pag_scale=2.0), ("reuse", "extrapolate", "interpolate")
    else:
        pipe = ip2p_pipe()
        g = torch.Generator().manual_seed(3)
        extra, estimators_ = dict(image=torch.rand(1, 3, 32, 32, generator=g)), ("reuse", "extrapolate")

    def inputs():
        args = pipe_inputs("sd", steps=8, **extra)
        if kind != "pag":
            del args["height"], args["width"]
        return args

    with torch.no_grad():
        plain = pipe(**inputs()).images
        for estimator in estimators_:
            with tiec.apply(pipe, FD(key_steps="all", estimator=estimator)):
                assert np.array_equal(pipe(**inputs()).images, plain), estimator
            outs = {}
            for parallel in (False, True):
                with tiec.apply(pipe, FD(key_steps=[0, 3, 5], estimator=estimator, parallel=parallel)) as handle:
                    outs[parallel] = pipe(**inputs()).images
                stats = handle.stats
                assert stats["unet_calls"] == stats["decoder_runs"] == 8
                assert stats["encoder_runs"] - stats["lookahead_runs"] == 3
                assert stats["plain_calls"] == stats["recomputed_steps"] == 0
            assert np.abs(outs[True] - outs[False]).max() < 1e-4, estimator


def test_self_attention_guidance_is_refused():
    """SAG degrades the latent with the mid block's attention map of each step, which a non-key step never computes."""
    from diffusers import StableDiffusionSAGPipeline

    components = {k: v for k, v in make_pipe("sd").components.items() if k != "image_encoder"}
    pipe = StableDiffusionSAGPipeline(**components, requires_safety_checker=False)
    with pytest.raises(ValueError, match="StableDiffusionSAGPipeline"):
        tiec.apply(pipe, FD())
    assert type(pipe) is StableDiffusionSAGPipeline


def test_bare_unet_extrapolates_to_the_calls_own_timestep(monkeypatch):
    unet = tiny_unet()
    seen = []
    original = estimators.line_weight  # the extrapolation's weight, from the two key steps' and this step's t

    def spy(t1, t2, t_s):
        seen.append((t1, t2, t_s))
        return original(t1, t2, t_s)

    monkeypatch.setattr(estimators, "line_weight", spy)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with tiec.apply(unet, FD(key_steps=[0, 1], estimator="extrapolate")) as handle:
        handle.start_run(3)
        with torch.no_grad():
            for t in (900, 600, 300):
                unet(sample, t, text)
    assert seen == [(900.0, 600.0, 300.0)]


def test_batched_controlnet_honours_the_scale_of_each_step():
    pipe = make_pipe("controlnet")
    for window in (dict(control_guidance_end=0.35), dict(control_guidance_start=0.35)):
        outs = {}
        for parallel in (False, True):
            with tiec.apply(pipe, FD(key_steps=[0, 8], parallel=parallel)) as handle:
                outs[parallel] = run(pipe, "controlnet", steps=10, **window)
        # the group 1..7 straddles the window's edge: the queued decodes after it are dropped and redone
        assert handle.stats["regrouped_steps"] >= 1
        assert np.abs(outs[True] - outs[False]).max() < 1e-4, window


def test_conditioning_changed_by_a_callback_inside_a_group(sd):
    def switch_prompt(pipe, i, t, kwargs):
        if i == 2:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].flip(1)
        return kwargs

    outs = {}
    for parallel in (False, True):
        with tiec.apply(sd, FD(key_steps=[0, 1, 8], parallel=parallel)) as handle:
            outs[parallel] = run(sd, "sd", steps=10, callback_on_step_end=switch_prompt,
                                 callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert handle.stats["regrouped_steps"] == 1 and handle.stats["decoder_runs"] == 10 + 5
    assert np.abs(outs[True] - outs[False]).max() < 1e-4


def test_key_step_list_is_read_on_the_loop_that_runs():
    pipe = make_pipe("sdxl")
    with tiec.apply(pipe, FD(key_steps=[0, 5, 10, 15])) as handle:
        run(pipe, "sdxl", steps=20, denoising_end=0.6, output_type="latent")  # 12 steps run
    assert handle.stats["unet_calls"] == 12 and handle.stats["encoder_runs"] == 3


def test_pag_look_ahead_is_counted_as_unguided():
    from diffusers import StableDiffusionPAGPipeline

    components = {k: v for k, v in make_pipe("sd").components.items() if k != "image_encoder"}
    pipe = StableDiffusionPAGPipeline(**components, requires_safety_checker=False, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad(), tiec.apply(pipe, FD(key_steps=[0, 4], estimator="interpolate")) as handle:
        pipe(**pipe_inputs("sd", steps=8, pag_scale=2.0))
    assert handle.stats["lookahead_runs"] == handle.stats["lookahead_unguided"] == 1


def test_batched_decoders_under_inference_mode(sd):
    """Inference-mode tensors keep no version counter: the queue's conditioning check must not need one."""
    outs = {}
    for parallel in (False, True):
        with torch.inference_mode(), tiec.apply(sd, FD(key_steps=[0, 4], parallel=parallel)) as handle:
            outs[parallel] = sd(**pipe_inputs("sd", steps=8)).images
        assert handle.stats["regrouped_steps"] == 0 and handle.stats["decoder_runs"] == 8
    assert np.abs(outs[True] - outs[False]).max() < 1e-4
