"""Tiny random-weight model configs for tests and CPU smoke runs.

Stable Diffusion 1.5 and SDXL shaped, with the same block types and code paths as the full-size models
(cross-attention levels, SDXL's ``text_time`` conditioning and linear projections), small enough that a
whole pipeline call runs on a CPU in well under a second. ``tests/conftest.py`` and
``benchmarks/gpu_speed.py --tiny`` build their models from these dicts, so both exercise the same shapes.

Example:
    >>> from diffusers import UNet2DConditionModel
    >>> from tiec.testing import TINY_SD_UNET_CONFIG
    >>> UNet2DConditionModel(**TINY_SD_UNET_CONFIG).config.block_out_channels
    (32, 64)
"""

from __future__ import annotations

__all__ = ["TINY_SDXL_UNET_CONFIG", "TINY_SD_UNET_CONFIG", "TINY_VAE_CONFIG"]

# A 16x16 latent UNet: cross-attention on the 32-channel level, 32-dim prompt embeddings.
TINY_SD_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)

# SDXL's layout in small: no attention on the first level, linear projections, 64-dim prompt embeddings and
# a 32-dim pooled embedding plus six 8-dim time ids (``text_time`` conditioning).
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=64, attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)

# A VAE with one 2x downsampling: 32 px images for the 16x16 latents above.
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
    sample_size=32)
