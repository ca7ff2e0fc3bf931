"""The models of benchmarks/gpu_speed.py: SD1.5 and SDXL architectures with random weights in stock pipelines.

Speed does not depend on the weights, so no checkpoint is downloaded: the UNet and VAE are built from their
configs (the full-size ones here and in ``tiec.flops``, the tiny CPU stand-ins from ``tiec.testing``) and
the prompt embeddings are passed directly (no tokenizer, no text encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tiec.flops import SD15_UNET_CONFIG
from tiec.testing import TINY_SD_UNET_CONFIG, TINY_SDXL_UNET_CONFIG, TINY_VAE_CONFIG

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)


@dataclass(frozen=True)
class ModelSpec:
    """One architecture to benchmark: its UNet and VAE configs and the shapes of its pipeline inputs."""

    key: str
    title: str
    xl: bool
    unet_config: dict
    vae_config: dict
    resolution: int
    guidance_scale: float
    text_dim: int
    pooled_dim: int = 0
    text_len: int = 77


def model_spec(key: str, tiny: bool) -> ModelSpec:
    """The SD1.5 (``"sd15"``) or SDXL (``"sdxl"``) architecture; ``tiny``: the small CPU stand-in."""
    if key == "sd15":
        if tiny:
            return ModelSpec(key, "SD1.5-shaped tiny model", False, TINY_SD_UNET_CONFIG, dict(TINY_VAE_CONFIG),
                             32, 7.5, text_dim=32)
        return ModelSpec(key, "SD1.5 architecture", False, SD15_UNET_CONFIG,
                         dict(SD_VAE_CONFIG, sample_size=512), 512, 7.5, text_dim=768)
    if key == "sdxl":
        if tiny:
            return ModelSpec(key, "SDXL-shaped tiny model", True, TINY_SDXL_UNET_CONFIG,
                             dict(TINY_VAE_CONFIG, force_upcast=False), 32, 5.0, text_dim=64, pooled_dim=32)
        # force_upcast=False: the VAE decodes in fp16, as with the fp16-fixed SDXL VAE people deploy.
        return ModelSpec(key, "SDXL architecture", True, SDXL_UNET_CONFIG,
                         dict(SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
                         1024, 5.0, text_dim=2048, pooled_dim=1280)
    raise ValueError(f"--models: unknown model {key!r}; use sd15 and/or sdxl")


def build_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The stock diffusers pipeline of ``spec`` with random weights on ``device``, no text encoder or tokenizer."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds, not minutes, for 2.6 B parameters
        unet = UNet2DConditionModel(**spec.unet_config).eval()
        vae = AutoencoderKL(**spec.vae_config).eval()
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if spec.xl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(spec: ModelSpec, batch: int, steps: int, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> Callable[[], dict]:
    """A function returning the call arguments (fresh seeded generator each time, so every call is the same)."""
    g = torch.Generator().manual_seed(1234)

    def embeds(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    fixed = dict(prompt_embeds=embeds(batch, spec.text_len, spec.text_dim),
                 negative_prompt_embeds=embeds(batch, spec.text_len, spec.text_dim),
                 num_inference_steps=steps, guidance_scale=spec.guidance_scale, height=spec.resolution,
                 width=spec.resolution, output_type="np")
    if spec.xl:
        fixed.update(pooled_prompt_embeds=embeds(batch, spec.pooled_dim),
                     negative_pooled_prompt_embeds=embeds(batch, spec.pooled_dim))

    def make() -> dict:
        return dict(fixed, generator=torch.Generator(device).manual_seed(seed))
    return make
