"""Tiny random-weight Stable Diffusion shaped pipelines built from configs (``tiec.testing``): every test runs
offline in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from tiec.testing import TINY_SD_UNET_CONFIG, TINY_SDXL_UNET_CONFIG, TINY_VAE_CONFIG

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from threads, and threads oversubscribe a shared 2-core machine badly.
torch.set_num_threads(1)

SCHEDULERS = ("ddim", "dpm", "euler", "pndm")
# Schedulers that repeat timesteps (heun, kdpm2: two evaluations per step), add noise (euler_a, lcm) or correct
# (unipc); tested on the SD pipeline.
MORE_SCHEDULERS = ("heun", "kdpm2", "euler_a", "unipc", "lcm")
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_scheduler(name: str):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler,
                           PNDMScheduler, UniPCMultistepScheduler)
    if name == "ddim":
        return DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**SD_SCHEDULER)
    if name == "euler":
        return EulerDiscreteScheduler(**SD_SCHEDULER)
    if name == "pndm":
        return PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, steps_offset=1)
    other = {"heun": HeunDiscreteScheduler, "kdpm2": KDPM2DiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
             "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler}
    if name in other:
        return other[name](**SD_SCHEDULER)
    raise ValueError(name)


def tiny_unet(xl: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**(TINY_SDXL_UNET_CONFIG if xl else TINY_SD_UNET_CONFIG))


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG)


def tiny_controlnet(unet, seed: int = 0):
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    # from_unet zero-initialises the output convolutions; random ones make the control visible in the images
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                 controlnet.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(conv.weight, std=0.05)
    return controlnet


def make_pipe(kind: str = "sd", scheduler: str = "ddim"):
    """A tiny pipeline of ``kind`` in sd, sdxl, img2img, controlnet (random weights, no text encoder)."""
    from diffusers import (StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)
    common = dict(vae=tiny_vae(), scheduler=make_scheduler(scheduler))
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(unet=tiny_unet(xl=True), text_encoder=None, text_encoder_2=None,
                                         tokenizer=None, tokenizer_2=None, force_zeros_for_empty_prompt=False,
                                         **common)
    else:
        unet = tiny_unet()
        extra = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
        if kind == "sd":
            pipe = StableDiffusionPipeline(unet=unet, **extra, **common)
        elif kind == "img2img":
            pipe = StableDiffusionImg2ImgPipeline(unet=unet, **extra, **common)
        elif kind == "controlnet":
            pipe = StableDiffusionControlNetPipeline(unet=unet, controlnet=tiny_controlnet(unet), **extra, **common)
        else:
            raise ValueError(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_inputs(kind: str, batch: int = 1, steps: int = 10, guidance: float = 5.0, seed: int = 0, **extra):
    """Call arguments for ``make_pipe(kind)``: prompt embeddings given directly, fixed generator."""
    g = torch.Generator().manual_seed(1234)
    dim = 64 if kind == "sdxl" else 32
    args = dict(prompt_embeds=torch.randn(batch, 7, dim, generator=g),
                negative_prompt_embeds=torch.randn(batch, 7, dim, generator=g),
                num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator().manual_seed(seed))
    if kind == "sdxl":
        args.update(pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g), height=32, width=32)
    elif kind == "img2img":
        args.update(image=torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1, strength=0.6)
    elif kind == "controlnet":
        args.update(image=torch.rand(batch, 3, 32, 32, generator=g), height=32, width=32)
    else:
        args.update(height=32, width=32)
    args.update(extra)
    return args


def run(pipe, kind: str, **kwargs):
    with torch.no_grad():
        return pipe(**pipe_inputs(kind, **kwargs)).images


def module_attributes(model: torch.nn.Module) -> dict:
    """Every submodule's instance attributes: equal before apply and after remove when nothing is left behind."""
    return {name: dict(m.__dict__) for name, m in model.named_modules()}


def make_demo_pipe(seed: int = 0):
    """The demo pipeline's architecture with random weights (no trained weights needed)."""
    from tiec.demo.model import build_pipeline
    pipe = build_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_sample(pipe, steps: int, prompts=("sneaker", "bag"), seed: int = 0):
    with torch.no_grad():
        return pipe(list(prompts), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images


@pytest.fixture(scope="session")
def sd_pipe():
    return make_pipe("sd")
