"""The encoder/decoder split of a denoiser, through patches on its parts.

UNets (``UNet2DConditionModel``, IF's pixel UNets, ``UNet3DConditionModel``, ``UNetMotionModel``,
``UNetSpatioTemporalConditionModel``): the encoder is ``conv_in`` (and the temporal ``transformer_in`` where
there is one), the ``down_blocks`` and the ``mid_block``; its features ``F`` are the output of the stem
(``conv_in``, or ``transformer_in`` after it), every skip output of every down block, and the mid-block
output, in that order (exactly what the up blocks read). See :class:`EncoderSplit`.

Block stacks (DiT, PixArt, SD3, Flux, or any model named with ``tiec.BlockModel``): the encoder is the
first ``k`` blocks; ``F`` are the tensors the ``k``-th block returns (the image stream, and the text stream
of two-stream models). See :class:`BlockSplit`.

The model's own ``forward`` is never copied: the patches either pass through, capture copies of what the
parts return, or replace the parts' outputs by given features without computing them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ._part import Part
from ._tree import tree_leaves, tree_map, tree_rebuild

Features = tuple[torch.Tensor, ...]


class EncoderDone(Exception):
    """Raised after the last encoder part in ``encode`` mode: the decoder is not needed."""


class _Split:
    """The three ways to run the model with an encoder split: capture, encode only, decode from given features."""

    num_features: int | None

    def __init__(self):
        self.mode: str | None = None
        self._features: list[torch.Tensor] = []
        self._given: Sequence[torch.Tensor] = ()

    def refresh(self) -> None:
        """Follow parts that other code put in place since ``install`` (nothing to follow by default)."""

    def capture(self, call: Callable[[], Any]) -> tuple[Any, Features]:
        """Run ``call()`` (a full model call) and return its output with the encoder features it computed."""
        self._enter("capture")
        try:
            out = call()
            return out, self._check(tuple(self._features))
        finally:
            self._leave()

    def encode(self, call: Callable[[], Any]) -> Features:
        """Run only the encoder part of ``call()`` and return its features."""
        self._enter("encode")
        try:
            try:
                call()
            except EncoderDone:
                pass
            return self._check(tuple(self._features))
        finally:
            self._leave()

    def decode(self, call: Callable[[], Any], features: Sequence[torch.Tensor]) -> Any:
        """Run ``call()`` with the encoder skipped: its parts return ``features`` instead."""
        if self.num_features is None:
            raise RuntimeError("tiec: no key step has run on this model yet")
        if len(features) != self.num_features:
            raise ValueError(f"expected {self.num_features} feature tensors, got {len(features)}")
        self._enter("skip")
        self._given = features
        try:
            return call()
        finally:
            self._leave()

    def _enter(self, mode: str) -> None:
        if self.mode is not None:
            raise RuntimeError(f"encoder split re-entered in mode {mode!r} while in mode {self.mode!r}")
        self.mode, self._features = mode, []

    def _leave(self) -> None:
        self.mode, self._features, self._given = None, [], ()

    def _check(self, features: Features) -> Features:
        return features


class EncoderSplit(_Split):
    """Patches ``conv_in`` (and ``transformer_in``), ``down_blocks`` and ``mid_block`` of ``unet`` for ``part``.

    Modes: ``None`` (plain), ``"capture"`` (run and record F), ``"encode"`` (run the encoder only,
    record F), ``"skip"`` (return the given F, compute nothing).
    """

    def __init__(self, part: Part, unet: torch.nn.Module):
        super().__init__()
        self.has_mid = unet.mid_block is not None
        self.has_temporal_in = isinstance(getattr(unet, "transformer_in", None), torch.nn.Module)
        offset, self.down_slices = 1, []
        for block in unet.down_blocks:
            count = len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) else 0)
            self.down_slices.append(slice(offset, offset + count))
            offset += count
        self.num_features = offset + (1 if self.has_mid else 0)
        self._part, self._unet = part, unet
        last = len(unet.down_blocks) - 1
        self._forwards = [self._conv_in] + ([self._transformer_in] if self.has_temporal_in else []) + \
            [self._down_block(i, last=i == last) for i in range(last + 1)]
        if self.has_mid:
            self._forwards.append(self._mid_block)
        self._patched: list[tuple[torch.nn.Module, Any]] = [
            (module, part.patch(module, "forward", fn)) for module, fn in zip(self._parts(), self._forwards)]

    def _parts(self) -> list[torch.nn.Module]:
        unet = self._unet
        stem = [unet.conv_in] + ([unet.transformer_in] if self.has_temporal_in else [])
        return stem + [*unet.down_blocks] + ([unet.mid_block] if self.has_mid else [])

    def refresh(self) -> None:
        """Follow parts that other code put in place since (peft wraps ``conv_in`` when a LoRA targets it).

        The features must be what the UNet's forward reads from the module it holds now, not from a wrapped one.
        """
        for index, (module, current) in enumerate(zip([m for m, _ in self._patched], self._parts())):
            if module is not current:
                old = self._patched[index][1]
                old.remove()
                self._part._patches.remove(old)
                self._patched[index] = (current, self._part.patch(current, "forward", self._forwards[index]))

    def _check(self, features: Features) -> Features:
        if len(features) != self.num_features:
            raise RuntimeError(f"the UNet's encoder produced {len(features)} features, expected "
                               f"{self.num_features}; this UNet layout is not supported")
        return features

    def _conv_in(self, inner, *args, **kwargs):
        if self.mode == "skip":  # with a temporal stem after it, this is only a placeholder of the right shape
            return self._given[0]
        out = inner(*args, **kwargs)
        if self.mode is not None and not self.has_temporal_in:
            self._features.append(out.clone())
        return out

    def _transformer_in(self, inner, *args, **kwargs):
        """``UNet3DConditionModel``'s temporal transformer after ``conv_in``: its output is the first feature."""
        if self.mode == "skip":
            if kwargs.get("return_dict", True):
                from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput
                return TransformerTemporalModelOutput(sample=self._given[0])
            return (self._given[0],)
        result = inner(*args, **kwargs)
        if self.mode is not None:
            self._features.append((result[0] if isinstance(result, tuple) else result.sample).clone())
        return result

    def _down_block(self, index: int, last: bool):
        def forward(inner, *args, **kwargs):
            if self.mode == "skip":
                res = tuple(self._given[self.down_slices[index]])
                return res[-1], res
            hidden, res = inner(*args, **kwargs)
            if self.mode is not None:
                self._features.extend(r.clone() for r in res)
                if self.mode == "encode" and last and not self.has_mid:
                    raise EncoderDone
            return hidden, res
        return forward

    def _mid_block(self, inner, *args, **kwargs):
        if self.mode == "skip":
            return self._given[-1]
        out = inner(*args, **kwargs)
        if self.mode is not None:
            self._features.append(out.clone())
            if self.mode == "encode":
                raise EncoderDone
        return out


class BlockSplit(_Split):
    """Patches the first ``k`` blocks of a block stack (a transformer's) on behalf of ``part``.

    ``F`` are the tensors block ``k - 1`` returns, in the order of its output (Flux and SD3 blocks return
    ``(encoder_hidden_states, hidden_states)``: both streams). In skip mode each of the first ``k`` blocks
    returns ``F`` in that block's output structure without computing anything, so block ``k`` starts from them;
    the model's own code between blocks must be an identity there (true of DiT, PixArt, SD3 and Flux without
    a ControlNet, which is refused).
    """

    def __init__(self, part: Part, blocks: Sequence[torch.nn.Module], k: int):
        if not 1 <= k < len(blocks):
            raise ValueError(f"encoder_blocks={k} must be between 1 and {len(blocks) - 1} (the stack has "
                             f"{len(blocks)} blocks; the decoder needs at least one)")
        super().__init__()
        self.k, self._part = k, part
        self._blocks = list(blocks[:k])
        self._template: Any = None  # the output structure of block k - 1 (a tensor, or a tuple of them)
        self.num_features: int | None = None
        self._patched = [(block, part.patch(block, "forward", self._block(i))) for i, block in enumerate(self._blocks)]

    def _block(self, index: int):
        last = index == self.k - 1

        def forward(inner, *args, **kwargs):
            if self.mode == "skip":
                return tree_rebuild(self._template, self._given)
            out = inner(*args, **kwargs)
            if self.mode is not None and last:
                leaves = tree_leaves(out)
                self._template = tree_map(lambda t: t.new_empty(0), out)  # the structure, not the memory
                self.num_features = len(leaves)
                self._features = [t.clone() for t in leaves]
                if self.mode == "encode":
                    raise EncoderDone
            return out
        return forward
