"""Encoder propagation on every model family beyond Stable Diffusion: IF, video UNets, DiT, PixArt, SD3, Flux and a
model named with ``tiec.BlockModel`` (tiny random-weight pipelines from ``tiec.tiny``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiec
from tiec import tiny
from tiec.families import family_of

FD = tiec.EncoderPropagationConfig
STEPS = 8
KEYS = "every:3"  # steps 0, 3, 6 of 8


def _run(pipe, name, **kwargs):
    return np.asarray(tiny.run(pipe, name, steps=STEPS, **kwargs))


class _Calls:
    """Counts the forward calls of ``module``'s last layer with weights: it runs only when the module computes.

    (The last: DiT's forward borrows the first block's timestep embedding at every step.)
    """

    def __init__(self, module: torch.nn.Module):
        inner = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None][-1]
        self.count = 0
        self._hook = inner.register_forward_hook(self._seen)

    def _seen(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._hook.remove()


def _encoder_and_decoder(model: torch.nn.Module, k: int | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The first encoder part and the first decoder part of ``model``."""
    if hasattr(model, "down_blocks"):
        return model.down_blocks[0], model.up_blocks[0]
    blocks = family_of(model).blocks
    return blocks[0], blocks[k if k is not None else family_of(model).default_blocks()]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request):
    name = request.param
    pipe = tiny.build(name)
    return name, pipe, _run(pipe, name)


def test_all_key_steps_is_bitwise_plain_and_remove_restores(family):
    name, pipe, plain = family
    model = tiny.denoiser(pipe)
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    with tiec.apply(pipe, FD(key_steps="all", estimator="extrapolate")) as handle:
        accelerated = _run(pipe, name)
    assert np.array_equal(accelerated, plain)
    assert handle.stats["decoder_runs"] == handle.stats["unet_calls"] > 0
    assert {n: dict(m.__dict__) for n, m in model.named_modules()} == before
    assert "__tiec_observers__" not in type(pipe).__dict__
    assert np.array_equal(_run(pipe, name), plain)


# Parallel against serial decoders, largest difference measured on the tiny models (images in [0, 1]): IF 1.2e-5
# (pixel space, thresholded), all others below 2e-6; Text2Video-Zero decodes serially (0 by construction).
TOLERANCE = 5e-5


@pytest.mark.parametrize("estimator", ["reuse", "extrapolate", "interpolate"])
def test_estimators_skip_the_encoder_and_parallel_matches_serial(family, estimator):
    name, pipe, plain = family
    model = tiny.denoiser(pipe)
    outs, stats = {}, {}
    for parallel in (True, False):
        encoder, decoder = _encoder_and_decoder(model, None)
        with tiec.apply(pipe, FD(key_steps=KEYS, estimator=estimator, parallel=parallel)) as handle, \
                _Calls(encoder) as encoder_calls, _Calls(decoder) as decoder_calls:
            outs[parallel] = _run(pipe, name)
        stats[parallel] = dict(handle.stats, encoder_calls=encoder_calls.count, decoder_calls=decoder_calls.count)
    serial = stats[False]
    calls = serial["unet_calls"]
    # the encoder really ran only at the key steps (and the look-ahead passes), the decoder at every call
    assert serial["encoder_calls"] == serial["encoder_runs"] < calls
    assert serial["decoder_calls"] == serial["decoder_runs"] == calls
    assert (serial["lookahead_runs"] > 0) == (estimator == "interpolate")
    assert serial["plain_calls"] == serial["recomputed_steps"] == serial["regrouped_steps"] == 0
    if name != "t2v-zero":
        assert stats[True]["batched_decoder_calls"] > 0 and stats[True]["decoder_calls"] < calls
    assert np.isfinite(outs[True]).all()
    assert np.abs(outs[True] - outs[False]).max() < TOLERANCE
    assert not np.array_equal(outs[False], plain)  # non-key steps decoded from estimated features


@pytest.mark.parametrize("name,scheduler", [("sd3", "flow_heun"), ("pixart", "euler"), ("t2v", "unipc"),
                                            ("if", "dpm"), ("animatediff", "euler_a")])
def test_other_schedulers(name, scheduler):
    """Repeated timesteps (flow Heun), sigma-scaled (Euler), multistep and ancestral schedulers on other families."""
    pipe = tiny.build(name, scheduler=scheduler)
    plain = _run(pipe, name)
    with tiec.apply(pipe, FD(key_steps="all")):
        assert np.array_equal(_run(pipe, name), plain)
    outs = {}
    for parallel in (True, False):
        with tiec.apply(pipe, FD(key_steps=KEYS, estimator="interpolate", parallel=parallel)) as handle:
            outs[parallel] = _run(pipe, name)
        assert handle.stats["plain_calls"] == handle.stats["recomputed_steps"] == 0
        assert handle.stats["encoder_runs"] - handle.stats["lookahead_runs"] < handle.stats["unet_calls"]
    assert np.abs(outs[True] - outs[False]).max() < TOLERANCE


def test_text2video_zero_each_backward_loop_is_a_run():
    pipe = tiny.build("t2v-zero")
    with tiec.apply(pipe, FD(key_steps="all")) as handle:
        _run(pipe, "t2v-zero")
    # 8 steps: the first frame's two loops (steps 0-7 minus the overlap), then all frames again from step t1
    assert handle.stats["plain_calls"] == handle.stats["recomputed_steps"] == 0
    assert handle.stats["unet_calls"] == handle.stats["encoder_runs"] > STEPS


def test_noise_injection_on_every_family(family):
    """Prior noise injection patches each family's scheduler (flow matching and EDM included) and is undone."""
    name, pipe, plain = family
    if name == "t2v-zero":
        with pytest.raises(ValueError, match="swaps its scheduler"):
            tiec.apply(pipe, FD(noise_injection=0.05))
        return
    tau = 1e9  # every step (SVD's continuous timesteps are not in [0, 1000))
    with tiec.apply(pipe, FD(key_steps="all", noise_injection=0.05, noise_injection_tau=tau)):
        injected = _run(pipe, name)
    assert np.isfinite(injected).all() and not np.array_equal(injected, plain)
    assert "step" not in pipe.scheduler.__dict__
    assert np.array_equal(_run(pipe, name), plain)


def test_transformer_encoder_blocks_config():
    pipe = tiny.build("dit")
    blocks = tiny.denoiser(pipe).transformer_blocks
    assert family_of(tiny.denoiser(pipe)).default_blocks() == round(18 / 28 * len(blocks))
    plain = _run(pipe, "dit")
    outs = []
    for k in (1, len(blocks) - 1):
        with tiec.apply(pipe, FD(key_steps=KEYS, encoder_blocks=k, parallel=False)), \
                _Calls(blocks[k - 1]) as encoder_calls, _Calls(blocks[k]) as decoder_calls:
            outs.append(_run(pipe, "dit"))
        assert (encoder_calls.count, decoder_calls.count) == (3, STEPS)  # the encoder's last block at key steps only
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], plain)
    with pytest.raises(ValueError, match="between 1 and"):
        tiec.apply(pipe, FD(encoder_blocks=len(blocks)))
    with pytest.raises(ValueError, match="transformers and BlockModel only"):
        tiec.apply(tiny.build("if"), FD(encoder_blocks=2))
    with pytest.raises(ValueError, match="positive integer"):
        FD(encoder_blocks=0)


def test_refusals_on_transformers():
    pipe = tiny.build("sd3")
    with pytest.raises(TypeError, match="supports UNet2DConditionModel pipelines only"):
        tiec.apply(pipe, tiec.DeepCacheConfig())
    with pytest.raises(TypeError, match="supports UNet2DConditionModel pipelines only"):
        tiec.apply(pipe, tiec.TokenMergingConfig())
    with pytest.raises(ValueError, match="log-snr"):
        tiec.apply(pipe, FD(blend_space="log-snr"))
    pipe.controlnet = torch.nn.Linear(1, 1)  # what SD3's ControlNet pipeline holds
    with pytest.raises(ValueError, match="ControlNet"):
        tiec.apply(pipe, FD())
    assert "forward" not in tiny.denoiser(pipe).__dict__


def test_flux_timestep_scale_and_untiled_ids():
    """Flux's pipeline passes ``t / 1000`` and ids without a batch dimension; every step must be located."""
    pipe = tiny.build("flux")
    with tiec.apply(pipe, FD(key_steps=[0, 4], estimator="interpolate")) as handle:
        _run(pipe, "flux", batch=2)
    assert handle.stats["plain_calls"] == handle.stats["recomputed_steps"] == 0
    assert handle.stats["encoder_runs"] == 2 + handle.stats["lookahead_runs"] == 3
    assert handle.stats["batched_decoder_calls"] == 2  # steps 1-3, then 5-7
    assert handle.stats["lookahead_unguided"] == 0  # guidance_scale is embedded: the prediction is the one stepped
    with tiec.apply(pipe, FD(key_steps=[0, 4], estimator="interpolate")) as handle:  # true CFG: two calls a step
        _run(pipe, "flux", true_cfg_scale=2.0, negative_prompt_embeds=torch.randn(1, tiny.TEXT_LEN, tiny.TEXT_DIM),
             negative_pooled_prompt_embeds=torch.randn(1, tiny.TEXT_DIM))
    assert handle.stats["unet_calls"] == 2 * STEPS and handle.stats["plain_calls"] == 0
    assert handle.stats["encoder_runs"] == 2 * 3 and handle.stats["lookahead_unguided"] == 2


def test_flux_in_bfloat16_locates_every_step():
    """In bf16, ``t / 1000`` rounds to a value no timestep matches: the step is read from the pipeline's own ``t``."""
    pipe = tiny.build("flux").to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in tiny.inputs("flux", steps=STEPS).items()}
    with tiec.apply(pipe, FD(key_steps=[0, 4])) as handle, torch.no_grad():
        pipe(**kwargs)
    assert handle.stats["plain_calls"] == 0 and handle.stats["encoder_runs"] == 2
    assert handle.stats["decoder_runs"] == STEPS and handle.stats["batched_decoder_calls"] == 2


class Mixer(torch.nn.Module):
    """A score model outside diffusers: a stack of residual MLP blocks over a flat input."""

    def __init__(self, width: int = 16, depth: int = 6):
        super().__init__()
        self.embed, self.out = torch.nn.Linear(3, width), torch.nn.Linear(width, 3)
        self.stack = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
                                         for _ in range(depth))

    def forward(self, x, t):
        h = self.embed(x) + torch.cos(t.float()[:, None] / 300)
        for block in self.stack:
            h = h + block(h)
        return self.out(h)


def _mixer_loop(model, steps: int = 10, seed: int = 0):
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(4)), t, x).prev_sample
    return x


def _mixer_reference(model, k: int, keys: set[int], steps: int = 10, seed: int = 0):
    """An independent loop: the first k blocks run at key steps only, their output reused elsewhere."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
    cached = None
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            h = model.embed(x) + torch.cos(t.expand(4).float()[:, None] / 300)
            if i in keys:
                for block in model.stack[:k]:
                    h = h + block(h)
                cached = h
            h = cached
            for block in model.stack[k:]:
                h = h + block(h)
            x = scheduler.step(model.out(h), t, x).prev_sample
    return x


def test_block_model_reuse_matches_an_independent_loop():
    torch.manual_seed(0)
    model = Mixer()
    wrapped = Residuals(model)  # the same weights, the residual adds inside the blocks
    plain = _mixer_loop(wrapped)
    assert torch.allclose(plain, _mixer_loop(model), atol=1e-6)
    named = tiec.BlockModel(wrapped, wrapped.blocks, sample_arg="x", timestep_arg="t")
    with tiec.apply(named, FD(key_steps="all", encoder_blocks=3)) as handle:
        handle.start_run(10)
        assert torch.equal(_mixer_loop(wrapped), plain)
    with tiec.apply(named, FD(key_steps=[0, 4, 7], encoder_blocks=3)) as handle:
        handle.start_run(10)
        accelerated = _mixer_loop(wrapped)
    reference = _mixer_reference(model, 3, {0, 4, 7})
    assert torch.allclose(accelerated, reference, atol=1e-6) and not torch.allclose(accelerated, plain)
    assert handle.stats["encoder_runs"] == 3 and handle.stats["decoder_runs"] == 10
    assert "forward" not in wrapped.__dict__ and all("forward" not in b.__dict__ for b in wrapped.blocks)


class Residual(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h):
        return h + self.block(h)


class Residuals(torch.nn.Module):
    """``Mixer`` with its residual adds inside the blocks, so that one block's output is the next one's input."""

    def __init__(self, mixer: Mixer):
        super().__init__()
        self.embed, self.out = mixer.embed, mixer.out
        self.blocks = torch.nn.ModuleList(Residual(b) for b in mixer.stack)

    def forward(self, x, t):
        h = self.embed(x) + torch.cos(t.float()[:, None] / 300)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_block_model_errors():
    model = Mixer()
    with pytest.raises(ValueError, match="submodule"):
        tiec.BlockModel(model, [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least two"):
        tiec.BlockModel(model, model.stack[:1])
    with pytest.raises(TypeError, match="nn.Module"):
        tiec.BlockModel("model", model.stack)
    with pytest.raises(TypeError, match="BlockModel"):
        tiec.apply(model, FD())


def test_bare_transformer_on_the_meta_device():
    """FLOP counting runs models on the meta device, where a timestep has no value to read."""
    from diffusers import DiTTransformer2DModel
    with torch.device("meta"):
        model = DiTTransformer2DModel(num_layers=4, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                      out_channels=8, sample_size=8, num_embeds_ada_norm=1000)
    with tiec.apply(model, FD(key_steps="every:2", estimator="extrapolate")) as handle, torch.no_grad():
        handle.start_run(4)
        for _ in range(4):
            out = model(torch.empty(2, 4, 8, 8, device="meta"), timestep=torch.empty(2, device="meta"),
                        class_labels=torch.zeros(2, dtype=torch.long, device="meta")).sample
    assert out.shape == (2, 8, 8, 8) and out.device.type == "meta"
    assert (handle.stats["encoder_runs"], handle.stats["decoder_runs"]) == (2, 4)
