"""Exact UNet FLOP counts of a sampling loop with ``torch.utils.flop_counter``, plain or accelerated.

torch's counter has no formula for the CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so on CPU it would count attention as free;
:func:`flop_counter` registers one (two batched matmuls, ``4 * B * H * L * S * E``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, dim = query_shape
    kv_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * kv_len * dim + 2 * batch * heads * q_len * kv_len * v_dim


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU scaled-dot-product attention kernel."""
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_attention_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def build_sd15_unet(device: str = "meta"):
    """The Stable Diffusion 1.5 UNet architecture with random weights (``meta``: shapes only, no memory)."""
    from diffusers import UNet2DConditionModel
    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def decoder_share(unet, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs) -> float:
    """The share of one full UNet call's FLOPs that is not encoder (``conv_in``, down blocks, mid block)."""
    with torch.no_grad(), flop_counter() as counter:
        unet(sample, 999, encoder_hidden_states, **kwargs)
    total, encoder = counter.get_total_flops(), 0
    for name, by_op in counter.get_flop_counts().items():
        path = name.split(".")  # e.g. UNet2DConditionModel.down_blocks.0 (the ModuleList itself is never called)
        if (len(path) == 2 and path[1] in ("conv_in", "mid_block")) or (len(path) == 3 and path[1] == "down_blocks"):
            encoder += sum(by_op.values())
    return (total - encoder) / total


def loop_flops(unet, configs: Sequence[Any] = (), num_steps: int = 50, batch: int = 2,
               sample_size: int | None = None, encoder_hidden_states: torch.Tensor | None = None,
               scheduler=None) -> dict[str, Any]:
    """UNet FLOPs of a ``num_steps`` loop (``batch`` = 2 for one guided image), with ``configs`` applied.

    ``sample_size`` is the UNet's input size (default: its config's, 64 latents = 512 px for SD1.5).

    Example:
        >>> unet = build_sd15_unet()  # on the meta device: exact counts without memory or arithmetic
        >>> accelerated = loop_flops(unet, [tiec.EncoderPropagationConfig(key_steps="every:2")], num_steps=6)
        >>> accelerated["encoder_runs"], accelerated["total"] / loop_flops(unet, num_steps=6)["total"]
        (3, 0.8...)
    """
    from diffusers import DDIMScheduler

    from .api import apply

    device = next(unet.parameters()).device
    size = sample_size or unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    if encoder_hidden_states is None:
        encoder_hidden_states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    scheduler = scheduler or DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(num_steps)
    handle = apply(unet, *configs) if configs else None
    per_step = []
    try:
        if handle is not None:
            handle.start_run(num_steps)
        with torch.no_grad():
            for t in scheduler.timesteps:
                with flop_counter() as counter:
                    unet(sample, t, encoder_hidden_states)
                per_step.append(counter.get_total_flops())
        stats = dict(handle.stats) if handle is not None else {"encoder_runs": num_steps, "decoder_runs": num_steps}
    finally:
        if handle is not None:
            handle.remove()
    return {"total": sum(per_step), "per_step": per_step, **stats}
