"""Encoder propagation combined with what users load into their pipelines, on tiny random-weight models.

Every combination is held to what the math says:

- exact: with ``key_steps="all"`` the output is bitwise the plain pipeline's (same combination, same seed),
  and again after ``handle.remove()``;
- a real schedule: ``parallel=True`` and ``parallel=False`` decode the same features, so they agree up to
  float summation order (``PARALLEL_TOL``), and ``handle.stats`` counts exactly what the key-step schedule
  of the loop that really runs implies;
- or, where tiec refuses a combination, it raises at ``apply`` time with an error naming it.

A hand-written DDIM + CFG sampling loop that calls the UNet's parts directly, with the estimators written
out here, is the independent reference for ``reuse``, ``extrapolate`` and ``interpolate``.

LoRA adapters are built with peft's ``LoraConfig`` on the tiny UNet and saved to / loaded from ``tmp_path``;
IP-Adapter weights are a state dict built here for the tiny UNet, with a tiny CLIP vision tower; nothing is
downloaded.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import make_pipe, make_scheduler, pipe_inputs, tiny_unet, tiny_vae

import tiec

EP = tiec.EncoderPropagationConfig
STEPS = 10
# parallel vs serial decode the same features, so they differ only by float summation order (batched
# convolutions). Measured max |diff| / max(1, max |output|) on these fp32 models: at most 6e-7 wherever the
# code is right (plain SD, SDXL, img2img at 10 and 20 steps, every schedule tried; LoRA, IP-Adapter,
# inpainting, callbacks), against 5e-3 .. 3e-2 for the cache-mutation bugs (FreeU, T2I-Adapter).
PARALLEL_TOL = 1e-5
# the hand-written reference loop against tiec, on latents, same scale: measured at most 4e-7
REFERENCE_TOL = 1e-5


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output's scale (tiny random UNets with CFG make latents of size ~50)."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


# -- helpers ---------------------------------------------------------------------------------------

SD_EXTRA = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, inputs: dict) -> torch.Tensor:
    """The pipeline's output for ``inputs`` as a tensor (fresh generators each time: same seed every call)."""
    inputs = dict(inputs)
    if isinstance(inputs.get("generator"), torch.Generator):
        inputs["generator"] = torch.Generator().manual_seed(inputs["generator"].initial_seed())
    with torch.no_grad():
        images = pipe(**inputs).images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images.copy())
    if isinstance(images, torch.Tensor):
        return images.clone()
    return torch.from_numpy(np.stack([np.asarray(i) for i in images]))


@contextlib.contextmanager
def count_unet_calls(unet):
    """Count the calls the pipeline makes to ``unet`` (pre-hooks fire once per ``unet(...)``)."""
    calls = []
    hook = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def plain_run(pipe, inputs: dict) -> tuple[torch.Tensor, int]:
    """The plain pipeline's output and the length of the loop it really ran (its UNet calls)."""
    with count_unet_calls(pipe.unet) as calls:
        out = call(pipe, inputs)
    return out, len(calls)


def assert_exact(pipe, inputs: dict, estimators=("reuse",)) -> torch.Tensor:
    """key_steps="all" is bitwise the plain pipeline, serial and parallel; so is the pipeline after remove()."""
    plain, n = plain_run(pipe, inputs)
    for estimator in estimators:
        for parallel in (False, True):
            handle = tiec.apply(pipe, EP(key_steps="all", estimator=estimator, parallel=parallel))
            try:
                out = call(pipe, inputs)
                stats = dict(handle.stats)
            finally:
                handle.remove()
            assert torch.equal(out, plain), (
                f"key_steps='all' ({estimator}, parallel={parallel}) differs from the plain pipeline by "
                f"{(out - plain).abs().max().item():.3g}")
            assert stats["unet_calls"] == stats["encoder_runs"] == stats["decoder_runs"] == n, (stats, n)
            after = call(pipe, inputs)
            assert torch.equal(after, plain), (
                f"after handle.remove() the pipeline differs from the plain one by "
                f"{(after - plain).abs().max().item():.3g}")
    return plain


def expected_encoder_runs(spec, n: int, estimator: str) -> int:
    keys = tiec.schedules.resolve(spec, n)
    lookaheads = 0
    if estimator == "interpolate":  # one look-ahead encoder per interval with steps inside (the last has none)
        lookaheads = sum(1 for a, b in zip(keys, keys[1:]) if b - a > 1)
    return len(keys) + lookaheads


def assert_schedule(pipe, inputs: dict, spec="every:3", estimators=("reuse", "extrapolate"),
                    plain: torch.Tensor | None = None, n: int | None = None) -> dict:
    """With a real schedule: exact stats, serial == parallel up to PARALLEL_TOL, and not the plain output."""
    if plain is None or n is None:
        plain, n = plain_run(pipe, inputs)
    diffs = {}
    for estimator in estimators:
        outs = {}
        for parallel in (False, True):
            with tiec.apply(pipe, EP(key_steps=spec, estimator=estimator, parallel=parallel)) as handle:
                outs[parallel] = call(pipe, inputs)
            stats = dict(handle.stats)
            expected = dict(unet_calls=n, encoder_runs=expected_encoder_runs(spec, n, estimator), decoder_runs=n)
            got = {k: stats[k] for k in expected}
            assert got == expected, (f"{estimator}, parallel={parallel}, key_steps={spec!r}: stats {got}, "
                                     f"expected {expected} for a loop of {n} UNet calls (key steps "
                                     f"{tiec.schedules.resolve(spec, n)})")
        diff = rel_diff(outs[True], outs[False])
        diffs[estimator] = diff
        assert diff <= PARALLEL_TOL, (f"{estimator}, key_steps={spec!r}: parallel and serial differ by {diff:.3g} "
                                      f"(> {PARALLEL_TOL:g}; decoding the same features)")
        assert rel_diff(outs[False], plain) > 100 * PARALLEL_TOL, "the schedule changed nothing"
    return diffs


def sd_inputs(**extra) -> dict:
    return pipe_inputs("sd", steps=STEPS, **extra)


# -- LoRA ------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_in"]


def save_tiny_lora(path, seed: int = 1) -> None:
    """A random (non-zero) LoRA for the tiny SD UNet, saved in diffusers' format under ``path``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=get_peft_model_state_dict(unet))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora")
    save_tiny_lora(path)
    return path


@pytest.mark.parametrize("mode", ["unfused", "fused", "unfused-weight-0.5"])
def test_lora(lora_dir, mode):
    pipe = make_pipe("sd")
    inputs = sd_inputs()
    before, _ = plain_run(pipe, inputs)
    pipe.load_lora_weights(str(lora_dir), adapter_name="tiny")
    if mode == "fused":
        pipe.fuse_lora()
    if mode == "unfused-weight-0.5":
        pipe.set_adapters("tiny", 0.5)
    plain = assert_exact(pipe, inputs)
    assert (plain - before).abs().max().item() > 1e-2, "the LoRA changed nothing"
    assert_schedule(pipe, inputs, "every:3", estimators=("reuse", "extrapolate"))


def test_lora_loaded_after_apply_equals_loaded_before(lora_dir):
    """Loading a LoRA (conv_in included) while tiec is applied gives what applying after loading gives."""
    cfg = EP(key_steps="every:3", estimator="extrapolate", parallel=False)
    first = make_pipe("sd")
    first.load_lora_weights(str(lora_dir))
    with tiec.apply(first, cfg):
        loaded_first = call(first, sd_inputs())
    second = make_pipe("sd")
    with tiec.apply(second, cfg) as handle:
        second.load_lora_weights(str(lora_dir))
        applied_first = call(second, sd_inputs())
        stats = dict(handle.stats)
    assert stats["encoder_runs"] == len(tiec.schedules.resolve("every:3", STEPS)), stats
    diff = rel_diff(applied_first, loaded_first)
    assert diff <= PARALLEL_TOL, f"apply-then-load_lora_weights differs from load-then-apply by {diff:.3g}"
    assert torch.equal(call(second, sd_inputs()), call(first, sd_inputs())), "remove() left something behind"


# -- IP-Adapter ------------------------------------------------------------------------------------

def tiny_ip_adapter_state_dict(unet, image_embed_dim: int, seed: int = 2) -> dict:
    """An IP-Adapter (the plain kind: ``proj`` + layer norm, 4 image tokens) for ``unet``, random weights."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, image_embed_dim, generator=g) * 0.2,
                  "proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:  # the loader numbers cross-attention layers 1, 3, 5, ... in this order
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
        ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
        ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def make_ip_adapter_pipe():
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe = make_pipe("sd")
    torch.manual_seed(3)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=4)).eval()
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    pipe.load_ip_adapter(tiny_ip_adapter_state_dict(pipe.unet, 16), subfolder="", weight_name="")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return pipe, image


def test_ip_adapter():
    pipe, image = make_ip_adapter_pipe()
    inputs = sd_inputs(ip_adapter_image=image)
    plain = assert_exact(pipe, inputs)
    pipe.set_ip_adapter_scale(0.0)
    without = call(pipe, inputs)
    pipe.set_ip_adapter_scale(1.0)
    assert (plain - without).abs().max().item() > 1e-2, "the IP-Adapter image changed nothing"
    assert_schedule(pipe, inputs, "uniform:4", estimators=("reuse", "interpolate"))


def test_ip_adapter_image_embeds():
    """Precomputed embeddings (negative and positive stacked) reach every batched decoder the same way."""
    pipe, _ = make_ip_adapter_pipe()
    embeds = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(5))
    inputs = sd_inputs(ip_adapter_image_embeds=[embeds])
    assert_exact(pipe, inputs)
    assert_schedule(pipe, inputs, "every:3")


# -- T2I-Adapter -----------------------------------------------------------------------------------

# the adapter pipeline decodes through its own deprecated decode_latents (diffusers' warning, not ours)
T2I_WARNING = pytest.mark.filterwarnings("ignore:The decode_latents method is deprecated:FutureWarning")


def make_t2i_adapter_pipe():
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    torch.manual_seed(4)
    # two feature maps, 32 channels at 16x16 and 64 at 8x8: the tiny UNet's two down blocks on 32 px images
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    for p in adapter.parameters():  # make the adapter's residuals as large as the features they are added to
        p.data.mul_(3.0)
    pipe = StableDiffusionAdapterPipeline(unet=tiny_unet(), adapter=adapter, vae=tiny_vae(),
                                          scheduler=make_scheduler("ddim"), **SD_EXTRA)
    return _quiet(pipe)


def t2i_inputs(**extra) -> dict:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    return sd_inputs(image=image, **extra)


@T2I_WARNING
def test_t2i_adapter():
    """The UNet adds T2I-Adapter residuals in place to a down block's output (the cached skip feature)."""
    pipe = make_t2i_adapter_pipe()
    inputs = t2i_inputs()
    plain = assert_exact(pipe, inputs)
    without = call(pipe, t2i_inputs(adapter_conditioning_scale=0.0))
    assert (plain - without).abs().max().item() > 1e-2, "the adapter changed nothing"
    assert_schedule(pipe, inputs, "every:3")


@T2I_WARNING
def test_t2i_adapter_reuse_decodes_the_key_step_features():
    """With key_steps=[0] every later step decodes step 0's features: serial decoding (which hands the
    cached features to the UNet) must give what parallel decoding (which hands it copies) gives."""
    pipe = make_t2i_adapter_pipe()
    outs = {}
    for parallel in (False, True):
        with tiec.apply(pipe, EP(key_steps=[0], estimator="reuse", parallel=parallel)):
            outs[parallel] = call(pipe, t2i_inputs())
    diff = rel_diff(outs[True], outs[False])
    assert diff <= PARALLEL_TOL, f"T2I-Adapter, key_steps=[0]: serial and parallel reuse differ by {diff:.3g}"


# -- FreeU -----------------------------------------------------------------------------------------

def test_freeu():
    """FreeU scales the backbone (mid-block output, a cached feature) in place inside the up blocks."""
    pipe = make_pipe("sd")
    inputs = sd_inputs()
    before, _ = plain_run(pipe, inputs)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    try:
        plain = assert_exact(pipe, inputs)
        assert (plain - before).abs().max().item() > 1e-2, "FreeU changed nothing"
        assert_schedule(pipe, inputs, "every:3", estimators=("reuse", "extrapolate", "interpolate"))
    finally:
        pipe.disable_freeu()
    assert torch.equal(call(pipe, inputs), before)


def test_freeu_twenty_steps_every_five():
    """The reported case: FreeU b1=1.5, key_steps='every:5', 20 steps (serial vs batched ~0.016 apart)."""
    pipe = make_pipe("sd")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    assert_schedule(pipe, pipe_inputs("sd", steps=20), "every:5", estimators=("reuse",))


# -- inpainting (9-channel UNet) ---------------------------------------------------------------------

def make_inpaint_pipe():
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_config({**tiny_unet().config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(unet=unet, vae=tiny_vae(), scheduler=make_scheduler("ddim"), **SD_EXTRA)
    return _quiet(pipe)


def inpaint_inputs(**extra) -> dict:
    g = torch.Generator().manual_seed(8)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    return sd_inputs(image=torch.rand(1, 3, 32, 32, generator=g), mask_image=mask, **extra)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting(strength):
    pipe = make_inpaint_pipe()
    inputs = inpaint_inputs(strength=strength)
    plain, n = plain_run(pipe, inputs)
    assert n == (STEPS if strength == 1.0 else 7)
    assert_exact(pipe, inputs)
    assert_schedule(pipe, inputs, "every:3", plain=plain, n=n)


def test_inpainting_interpolate_works_or_refuses_at_apply():
    """``interpolate`` predicts the next key latent from the UNet input; an inpainting UNet's input has
    9 channels (latent, mask, masked-image latent) against a 4-channel noise prediction."""
    pipe = make_inpaint_pipe()
    inputs = inpaint_inputs()
    plain, n = plain_run(pipe, inputs)
    try:
        handle = tiec.apply(pipe, EP(key_steps="every:3", estimator="interpolate", parallel=False))
    except (ValueError, TypeError) as error:
        message = str(error).lower()
        assert "interpolate" in message and any(w in message for w in ("inpaint", "channel", "in_channels")), (
            f"the refusal does not name the combination: {error}")
        return
    handle.remove()
    assert_exact(pipe, inputs, estimators=("interpolate",))
    # every UNet input, look-ahead passes included, carries the same mask and masked-image latents
    inputs_seen = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: inputs_seen.append(args[0].clone()))
    try:
        assert_schedule(pipe, inputs, "every:3", estimators=("interpolate",), plain=plain, n=n)
    finally:
        hook.remove()
    lookaheads = expected_encoder_runs("every:3", n, "interpolate") - len(tiec.schedules.resolve("every:3", n))
    assert len(inputs_seen) >= n + lookaheads  # the serial run alone
    conditioning = inputs_seen[0][0, 4:]  # the same in the unconditional and the conditional half
    for x in inputs_seen:
        assert x.shape[1] == 9 and all(torch.equal(row[4:], conditioning) for row in x), (
            "a UNet call (a look-ahead?) got other mask / masked-image channels than the pipeline's")


# -- SDXL base + refiner ---------------------------------------------------------------------------

def make_refiner():
    """A tiny SDXL refiner: its UNet's added time ids carry the aesthetic score (5 ids, not 6)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(9)
    unet = UNet2DConditionModel.from_config({**tiny_unet(xl=True).config,
                                             "projection_class_embeddings_input_dim": 5 * 8 + 32})
    pipe = StableDiffusionXLImg2ImgPipeline(vae=tiny_vae(), unet=unet, scheduler=make_scheduler("ddim"),
                                            text_encoder=None, text_encoder_2=None, tokenizer=None,
                                            tokenizer_2=None, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
    return _quiet(pipe)


def base_inputs(steps: int, end: float, output_type: str = "latent") -> dict:
    return pipe_inputs("sdxl", steps=steps, denoising_end=end, output_type=output_type)


def refiner_inputs(latents: torch.Tensor, steps: int, start: float) -> dict:
    args = pipe_inputs("sdxl", steps=steps, denoising_start=start, image=latents)
    for key in ("height", "width"):
        args.pop(key)
    return args


def test_sdxl_denoising_end_counts():
    """``denoising_end=0.6`` at 20 steps: the base's loop is 12 UNet calls; key steps are those of 12 steps."""
    base = make_pipe("sdxl")
    inputs = base_inputs(20, 0.6, output_type="np")
    plain, n = plain_run(base, inputs)
    assert n == 12
    assert_schedule(base, inputs, "uniform:4", estimators=("reuse",), plain=plain, n=n)


def test_sdxl_base_and_refiner():
    base, refiner = make_pipe("sdxl"), make_refiner()
    steps, split = 20, 0.6

    def both() -> torch.Tensor:
        latents = call(base, base_inputs(steps, split))
        return call(refiner, refiner_inputs(latents, steps, split))

    with count_unet_calls(base.unet) as base_calls, count_unet_calls(refiner.unet) as refiner_calls:
        plain = both()
    n_base, n_refiner = len(base_calls), len(refiner_calls)
    assert (n_base, n_refiner) == (12, 8), (n_base, n_refiner)

    for parallel in (False, True):
        handles = [tiec.apply(base, EP(key_steps="all", parallel=parallel)),
                   tiec.apply(refiner, EP(key_steps="all", parallel=parallel))]
        try:
            out = both()
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(out, plain), f"all key steps, parallel={parallel}: {(out - plain).abs().max():.3g}"
    assert torch.equal(both(), plain)

    outs = {}
    for parallel in (False, True):
        handles = [tiec.apply(base, EP(key_steps="uniform:3", parallel=parallel)),   # 0, 4, 8 of 12
                   tiec.apply(refiner, EP(key_steps="uniform:2", parallel=parallel))]  # 0, 4 of 8
        try:
            outs[parallel] = both()
        finally:
            for handle in handles:
                handle.remove()
        for handle, n, spec, name in ((handles[0], n_base, "uniform:3", "base"),
                                      (handles[1], n_refiner, "uniform:2", "refiner")):
            got = {k: handle.stats[k] for k in ("unet_calls", "encoder_runs", "decoder_runs")}
            expected = dict(unet_calls=n, encoder_runs=len(tiec.schedules.resolve(spec, n)), decoder_runs=n)
            assert got == expected, f"{name}, parallel={parallel}: stats {got}, expected {expected}"
    diff = rel_diff(outs[True], outs[False])
    assert diff <= PARALLEL_TOL, f"base + refiner: parallel and serial differ by {diff:.3g}"


# -- callback_on_step_end --------------------------------------------------------------------------

def shift_latents(pipe, step, timestep, kwargs):
    """A user callback that changes the latents (here: pulls them toward zero at two steps)."""
    latents = kwargs["latents"]
    if step in (2, 5):
        latents = latents * 0.8 + 0.05
    return {"latents": latents}


def test_callback_changes_latents():
    pipe = make_pipe("sd")
    inputs = sd_inputs(callback_on_step_end=shift_latents, callback_on_step_end_tensor_inputs=["latents"])
    plain = assert_exact(pipe, inputs)
    without = call(pipe, sd_inputs())
    assert (plain - without).abs().max().item() > 1e-2, "the callback changed nothing"
    assert_schedule(pipe, inputs, "every:3", estimators=("reuse", "interpolate"))


def test_callback_with_noise_injection_keeps_the_user_callback():
    """tiec's prior noise injection chains with the user's callback: with every step a key step, the result is
    bitwise the plain pipeline whose callback adds ``w * z_T`` (before steps with t < tau) and then shifts."""
    pipe = make_pipe("sd")
    w, tau = 0.003, 500
    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    seen = []

    def record(pipe, step, timestep, kwargs):
        seen.append(step)
        return shift_latents(pipe, step, timestep, kwargs)

    def inject_then_shift(pipe, step, timestep, kwargs):
        timesteps = pipe.scheduler.timesteps
        if step + 1 < len(timesteps) and timesteps[step + 1] < tau:
            kwargs["latents"] = kwargs["latents"] + w * z_T
        return shift_latents(pipe, step, timestep, kwargs)

    manual = call(pipe, sd_inputs(latents=z_T, callback_on_step_end=inject_then_shift,
                                  callback_on_step_end_tensor_inputs=["latents"]))
    inputs = sd_inputs(latents=z_T, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
    with tiec.apply(pipe, EP(key_steps="all", noise_injection=w, noise_injection_tau=tau)):
        out = call(pipe, inputs)
    assert seen == list(range(STEPS))
    assert torch.equal(out, manual), (
        f"noise injection + callback differ from the manual one by {rel_diff(out, manual):.3g}")
    outs = {}
    for parallel in (False, True):
        seen.clear()
        cfg = EP(key_steps="every:3", parallel=parallel, noise_injection=w, noise_injection_tau=tau)
        with tiec.apply(pipe, cfg):
            outs[parallel] = call(pipe, inputs)
        assert seen == list(range(STEPS))
    diff = rel_diff(outs[True], outs[False])
    assert diff <= PARALLEL_TOL, f"noise injection + callback: parallel and serial differ by {diff:.3g}"


def dynamic_cfg(pipe, step, timestep, kwargs):
    """diffusers' documented pattern: switch classifier-free guidance off after 40% of the steps.

    The UNet's batch then shrinks from 2 to 1 in the middle of a key-step group (from step 5 of 10 on).
    """
    if step == int(pipe.num_timesteps * 0.4):
        kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return kwargs


def test_callback_switching_guidance_off():
    """Either the cached features follow the batch (the conditional half) or the step where the batch changed
    runs in full, counted in ``stats["recomputed_steps"]``; serial and parallel agree either way."""
    pipe = make_pipe("sd")
    inputs = sd_inputs(callback_on_step_end=dynamic_cfg, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    plain, n = plain_run(pipe, inputs)
    assert_exact(pipe, inputs)
    spec, outs = "every:3", {}
    keys = tiec.schedules.resolve(spec, n)
    for parallel in (False, True):
        with tiec.apply(pipe, EP(key_steps=spec, parallel=parallel)) as handle:
            outs[parallel] = call(pipe, inputs)
        stats = dict(handle.stats)
        recomputed, unused = stats.get("recomputed_steps", 0), stats.get("unused_decodes", 0)
        assert recomputed in (0, 1), stats  # only step 5 (the first with batch 1, in the group of key step 3)
        # a batched decode made before the switch and thrown away is a decoder evaluation, reported as unused
        assert (stats["unet_calls"], stats["encoder_runs"], stats["decoder_runs"]) == (
            n, len(keys) + recomputed, n + unused), f"parallel={parallel}: {stats}; key steps {keys} of {n}"
    diff = rel_diff(outs[True], outs[False])
    assert diff <= PARALLEL_TOL, f"guidance switched off mid-group: parallel and serial differ by {diff:.3g}"
    assert rel_diff(outs[False], plain) > 100 * PARALLEL_TOL


# -- an independent reference: a hand-written DDIM + CFG loop on the UNet's parts -----------------------

def _time_embedding(unet, t: torch.Tensor, batch: int, dtype) -> torch.Tensor:
    return unet.time_embedding(unet.time_proj(t.reshape(1).expand(batch)).to(dtype))


def _encoder(unet, x, t, text) -> tuple[torch.Tensor, ...]:
    """conv_in, the down blocks and the mid block: every skip feature (conv_in's included), then the mid output."""
    emb = _time_embedding(unet, t, x.shape[0], x.dtype)
    h = unet.conv_in(x)
    skips = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    mid = unet.mid_block(h, emb, encoder_hidden_states=text)
    return tuple(skips) + (mid,)


def _decoder(unet, features, t, text) -> torch.Tensor:
    """The up blocks (each takes its skips from the end of the list) and the output layers, at timestep t."""
    emb = _time_embedding(unet, t, features[-1].shape[0], features[-1].dtype)
    h, skips = features[-1], list(features[:-1])
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        kwargs = dict(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=None)
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = text
        h = block(**kwargs)
    assert not skips
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def _line(f_a, f_b, t_a: float, t_b: float, t: float):
    """The line in t through (t_a, f_a) and (t_b, f_b), evaluated at t."""
    w = (t_b - t) / (t_b - t_a)
    return tuple(w * a + (1 - w) * b for a, b in zip(f_a, f_b))


def reference_sample(unet, latents, text, guidance: float, steps: int, key_steps, estimator: str):
    """DDIM (eta 0, "leading" spacing, steps_offset 1, final alpha = alphas_cumprod[0]) with CFG, the encoder
    run only at ``key_steps``; a non-key step decodes from features chosen by ``estimator``:

    - reuse: the last key step's features;
    - extrapolate: w*F(t1) + (1-w)*F(t2), w = (t2 - t_s)/(t2 - t1), from the last two key steps (reuse
      before there are two);
    - interpolate: the line between the current key step's F and the encoder run on a DDIM jump (from the
      key step's guided noise prediction) to the next key step's timestep; extrapolate after the last key.
    """
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    alphas = torch.cumprod(1.0 - betas, dim=0)
    ratio = 1000 // steps
    timesteps = [int(i * ratio) + 1 for i in reversed(range(steps))]

    def alpha(t: int) -> torch.Tensor:
        return alphas[t] if t >= 0 else alphas[0]

    def ddim(x, eps, t: int, t_next: int):
        x0 = (x - (1 - alpha(t)).sqrt() * eps) / alpha(t).sqrt()
        return alpha(t_next).sqrt() * x0 + (1 - alpha(t_next)).sqrt() * eps

    def guided(out):
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    x = latents
    keys: list[tuple[int, tuple]] = []        # (timestep, features) of the key steps so far
    ahead: tuple | None = None                # (t_next, predicted features of the next key step)
    for s, t in enumerate(timesteps):
        t_tensor = torch.tensor(t)
        x_in = torch.cat([x, x])
        if s in key_steps:
            features = _encoder(unet, x_in, t_tensor, text)
            keys.append((t, features))
            ahead = None
        elif estimator == "reuse" or len(keys) < 2 and ahead is None:
            features = keys[-1][1]
        elif estimator == "interpolate" and ahead is not None:
            features = _line(keys[-1][1], ahead[1], keys[-1][0], ahead[0], t)
        else:
            (t1, f1), (t2, f2) = keys[-2:]
            features = _line(f1, f2, t1, t2, t)
        eps = guided(_decoder(unet, features, t_tensor, text))
        if s in key_steps and estimator == "interpolate":
            later = [k for k in key_steps if k > s]
            if later and later[0] > s + 1:
                t_next = timesteps[later[0]]
                x_hat = ddim(x, eps, t, t_next)
                ahead = (t_next, _encoder(unet, torch.cat([x_hat, x_hat]), torch.tensor(t_next), text))
        x = ddim(x, eps, t, t - ratio)
    return x, timesteps, alphas


@pytest.fixture(scope="module")
def reference_setup():
    pipe = make_pipe("sd")
    inputs = sd_inputs(output_type="latent", guidance=5.0)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    inputs["latents"] = latents
    text = torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]])
    return pipe, inputs, latents, text


def test_reference_loop_matches_the_plain_pipeline(reference_setup):
    pipe, inputs, latents, text = reference_setup
    plain = call(pipe, inputs)
    with torch.no_grad():
        ref, timesteps, alphas = reference_sample(pipe.unet, latents, text, 5.0, STEPS, range(STEPS), "reuse")
    assert [int(t) for t in pipe.scheduler.timesteps] == timesteps
    assert torch.allclose(alphas, pipe.scheduler.alphas_cumprod)
    diff = rel_diff(ref, plain)
    assert diff <= REFERENCE_TOL, f"the reference loop with every step a key step differs by {diff:.3g}"


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("estimator", ["reuse", "extrapolate", "interpolate"])
def test_reference_loop_matches_tiec(reference_setup, estimator, parallel):
    pipe, inputs, latents, text = reference_setup
    key_steps = [0, 3, 6]
    with torch.no_grad():
        ref, _, _ = reference_sample(pipe.unet, latents, text, 5.0, STEPS, key_steps, estimator)
        full, _, _ = reference_sample(pipe.unet, latents, text, 5.0, STEPS, range(STEPS), "reuse")
        reuse, _, _ = reference_sample(pipe.unet, latents, text, 5.0, STEPS, key_steps, "reuse")
    with tiec.apply(pipe, EP(key_steps=key_steps, estimator=estimator, parallel=parallel)) as handle:
        out = call(pipe, inputs)
    diff = rel_diff(out, ref)
    assert diff <= REFERENCE_TOL, f"{estimator}, parallel={parallel}: tiec differs from the reference by {diff:.3g}"
    # the comparison has teeth: the schedule moves the result far from the full loop, and the estimators apart
    assert rel_diff(ref, full) > 100 * REFERENCE_TOL
    if estimator != "reuse":
        assert rel_diff(ref, reuse) > 100 * REFERENCE_TOL
    lookaheads = 2 if estimator == "interpolate" else 0   # intervals 0..3 and 3..6 have steps inside
    assert dict((k, handle.stats[k]) for k in ("unet_calls", "encoder_runs", "decoder_runs")) == dict(
        unet_calls=STEPS, encoder_runs=3 + lookaheads, decoder_runs=STEPS)


def test_t2i_adapter_interpolate_look_ahead_keeps_the_adapter_residuals():
    """The UNet pops T2I residuals from the list it is given: the look-ahead must get its own full list."""
    pipe = make_t2i_adapter_pipe()
    blocks = [b for b in pipe.unet.down_blocks if getattr(b, "has_cross_attention", False)]
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("additional_residuals") is not None),
                                         with_kwargs=True) for b in blocks]
    try:
        with tiec.apply(pipe, tiec.EncoderPropagationConfig(key_steps=[0, 4], estimator="interpolate",
                                                            parallel=False)) as handle:
            call(pipe, t2i_inputs())
    finally:
        for hook in hooks:
            hook.remove()
    assert handle.stats["lookahead_runs"] == 1
    # every computed cross-attention down block (key steps and the look-ahead) saw its adapter residual
    assert seen and all(seen), seen
