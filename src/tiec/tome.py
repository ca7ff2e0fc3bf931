"""Token merging (ToMe for SD, Bolya & Hoffman 2023) on the transformer blocks of a diffusers UNet.

Each chosen sub-layer of a ``BasicTransformerBlock`` (self-attention ``attn1``, cross-attention
``attn2``, feed-forward ``ff``) runs on ``N - r`` tokens instead of ``N``: its input is merged by
bipartite soft matching (see ``tiec.merge``) and its output is unmerged back to ``N`` tokens before the
block adds it to the residual stream. The matching is computed once per block evaluation, from the
block's input. The stock block runs unchanged: tiec patches the block's ``forward`` (to compute the
matching) and the sub-layers' ``forward`` (to merge and unmerge around them).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from ._part import Part
from .merge import MergeFn, bipartite_soft_matching

SEED = 0  # tiec's own generator restarts from here at every pipeline call: repeated calls match


@dataclass(frozen=True)
class TokenMergingConfig:
    """Token merging before the attention / MLP of the high-resolution transformer blocks.

    Args:
        ratio: share of the tokens removed (``r = int(ratio * N)``, capped at the number of sources). Higher:
            faster, blurrier. ``0`` changes nothing. Default 0.5; must be in [0, 1).
        max_downsample: merge only in blocks whose feature map is at most this many times smaller (per side)
            than the UNet input: 1 = the highest resolution only, 2 = also the next level, ... A power of
            two. Default 1 (SD1.x: 5 of 16 blocks; SDXL has no attention at that level, use 2).
        sx, sy: size of the cells holding one destination token each. Bigger: fewer destinations, coarser
            merging. Default 2 x 2.
        use_rand: pick each cell's destination at random (tiec's own seeded generator on the device of the
            tokens, restarted at every pipeline call, the same partition for the two halves of a guided batch);
            False takes the first token of each cell. Default True.
        merge_attn: merge before self-attention (the biggest saving). Default True.
        merge_crossattn: merge before cross-attention. Default False.
        merge_mlp: merge before the feed-forward layer (costs quality). Default False.

    Example:
        >>> cfg = TokenMergingConfig(ratio=0.5, max_downsample=2)
        >>> TokenMergingConfig(ratio=0.5, max_downsample=3)
        Traceback (most recent call last):
        ValueError: max_downsample=3 must be a power of two (1, 2, 4, 8, ...): the largest downsampling factor ...
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio={self.ratio!r} must be a number in [0, 1)")
        down = self.max_downsample
        if isinstance(down, bool) or not isinstance(down, int) or down < 1 or down & (down - 1):
            raise ValueError(f"max_downsample={down!r} must be a power of two (1, 2, 4, 8, ...): the largest "
                             f"downsampling factor of the blocks to merge in")
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (cell size in tokens)")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("merge_attn, merge_crossattn and merge_mlp are all False: nothing would be merged; "
                             "set at least one to True")


def first_attention_downsample(unet: torch.nn.Module) -> int | None:
    """The downsampling factor (per side, 1 = the latent's own resolution) of ``unet``'s highest-resolution
    transformer blocks: the ``max_downsample`` that merges there. 1 on SD1.5, 2 on SDXL (its first level has no
    attention); None where the down blocks hold no transformer block.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> from tiec.testing import TINY_SD_UNET_CONFIG, TINY_SDXL_UNET_CONFIG
        >>> [first_attention_downsample(UNet2DConditionModel(**config))
        ...  for config in (TINY_SD_UNET_CONFIG, TINY_SDXL_UNET_CONFIG)]
        [1, 2]
    """
    from diffusers.models.attention import BasicTransformerBlock

    factor = 1
    for block in getattr(unet, "down_blocks", ()):
        if any(isinstance(m, BasicTransformerBlock) for m in block.modules()):
            return factor
        if getattr(block, "downsamplers", None):
            factor *= 2
    return None


class _Matching(NamedTuple):
    merge: MergeFn
    unmerge: MergeFn
    batch: int
    tokens: int


class TokenMerging(Part):
    """Token merging applied to the transformer blocks of one UNet. Made by ``tiec.apply``."""

    config: TokenMergingConfig

    def install(self) -> None:
        from diffusers.models.attention import BasicTransformerBlock

        super().install()
        self._size: tuple[int, int] | None = None   # latent height, width of the UNet call running now
        self._matching: _Matching | None = None       # of the block running now
        self._generators: dict[torch.device, torch.Generator] = {}  # tiec's own, one per device, made on demand
        self._blocks = [0, 0]  # transformer block evaluations, and those at too low a resolution to merge
        self._warned = False
        self.patch(self.unet, "forward", self._unet_forward)
        layers = [("attn1", self.config.merge_attn), ("attn2", self.config.merge_crossattn),
                  ("ff", self.config.merge_mlp)]
        for block in self.unet.modules():
            if not isinstance(block, BasicTransformerBlock):
                continue
            self.patch(block, "forward", self._block_forward)
            for name, wanted in layers:
                layer = getattr(block, name, None)
                if wanted and isinstance(layer, torch.nn.Module):
                    self.patch(layer, "forward", self._layer_forward(self_attention=name == "attn1"))
        self.stats = self.new_stats()

    def new_stats(self) -> dict[str, int]:
        return {"merged_blocks": 0, "merged_layers": 0}

    def begin_call(self, pipe: Any, call_kwargs: dict | None = None) -> None:
        super().begin_call(pipe, call_kwargs)
        self._restart_generators()

    def start_run(self, num_steps: int) -> None:
        """Restart the counters and the generators (a bare UNet's sampling loop)."""
        self.stats = self.new_stats()
        self._restart_generators()

    def _restart_generators(self) -> None:
        for generator in self._generators.values():
            generator.manual_seed(SEED)

    def _generator(self, device: torch.device) -> torch.Generator:
        """tiec's generator on ``device``: the partition is drawn where the tokens are (no copy, no sync).

        Each device draws its own sequence (a CUDA generator's numbers differ from the CPU's), the same at
        every pipeline call; never the user's generator or the global one.
        """
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device).manual_seed(SEED)
        return generator

    def reset(self) -> None:
        self._size, self._matching = None, None

    # -- patches --------------------------------------------------------------------------------
    def _unet_forward(self, inner, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        previous, self._size = self._size, tuple(sample.shape[-2:])
        blocks = list(self._blocks)
        try:
            out = inner(*args, **kwargs)
        finally:
            self._size = previous
        ran, too_small = self._blocks[0] - blocks[0], self._blocks[1] - blocks[1]
        if previous is None and ran and ran == too_small and not self._warned:
            self._warned = True
            level = first_attention_downsample(self.unet)
            hint = f"; this UNet's first attention level is downsampled {level}x: max_downsample={level}" \
                if level else ""
            warnings.warn(f"ToMe merged nothing in this UNet call: none of its {ran} transformer block evaluations "
                          f"runs at a resolution at most max_downsample={self.config.max_downsample} times smaller "
                          f"per side than the latent's{hint}", stacklevel=2)
        return out

    def _block_forward(self, inner, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        matching = self._match(hidden) if self._matching is None else None
        if matching is None:
            return inner(*args, **kwargs)
        self._matching = matching
        try:
            out = inner(*args, **kwargs)
        finally:
            self._matching = None
        self.stats["merged_blocks"] += 1
        return out

    def _layer_forward(self, self_attention: bool) -> Callable:
        def forward(inner, *args, **kwargs):
            matching = self._matching
            x = args[0] if args else kwargs.get("hidden_states")
            if matching is None or not isinstance(x, torch.Tensor) or x.ndim != 3 \
                    or tuple(x.shape[:2]) != (matching.batch, matching.tokens):
                return inner(*args, **kwargs)  # e.g. chunked feed-forward: pieces of the tokens
            if self_attention and kwargs.get("attention_mask") is not None \
                    and kwargs.get("encoder_hidden_states") is None:
                return inner(*args, **kwargs)  # a mask over the N keys cannot follow the merge
            merged = matching.merge(x)
            if args:
                args = (merged,) + args[1:]
            else:
                kwargs = dict(kwargs, hidden_states=merged)
            self.stats["merged_layers"] += 1
            return matching.unmerge(inner(*args, **kwargs))
        return forward

    # -- decisions ------------------------------------------------------------------------------
    def _match(self, hidden: Any) -> _Matching | None:
        """The matching of one block evaluation, or None where this block is not merged."""
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or self._size is None:
            return None
        batch, tokens, _ = hidden.shape
        r = int(self.config.ratio * tokens)
        grid = self._grid(tokens)
        self._blocks[0] += 1
        self._blocks[1] += grid is None
        if r == 0 or grid is None:
            return None
        h, w = grid
        # An odd batch is no guided pair (or one half of a pair run separately): a fixed partition keeps
        # the two evaluations of one step consistent.
        generator = self._generator(hidden.device) if self.config.use_rand and batch % 2 == 0 else None
        merge, unmerge = bipartite_soft_matching(hidden, w, h, self.config.sx, self.config.sy, r, generator)
        return _Matching(merge, unmerge, batch, tokens)

    def _grid(self, tokens: int) -> tuple[int, int] | None:
        """The (h, w) of a block's ``tokens`` if it is downsampled at most ``max_downsample`` times."""
        h, w = self._size
        factor = 1
        while factor <= self.config.max_downsample:
            if h * w == tokens:
                return h, w
            # diffusers' stride-2 convolutions (padding 1) round odd sizes up
            h, w, factor = math.ceil(h / 2), math.ceil(w / 2), factor * 2
        return None
