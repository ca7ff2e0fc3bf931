"""Maps over the nested containers (tuples, lists, dicts, diffusers outputs) that models pass around."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it; containers are rebuilt, never mutated."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: tree_map(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return type(obj)((k, tree_map(fn, v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_map(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v) for v in obj)
    return obj


def tree_clone(obj: Any) -> Any:
    """A copy of every tensor in ``obj`` (cached values must not alias what a caller may change in place)."""
    return tree_map(lambda t: t.clone(), obj)


def tile_batch(obj: Any, batch: int, times: int, folded: int = 1) -> Any:
    """Repeat every tensor whose leading dimension is ``batch`` ``times`` times along it (step-major layout).

    ``folded`` > 1 also tiles tensors with ``batch * folded`` rows (AnimateDiff passes prompt embeddings with the
    frames folded into the batch).
    """
    sizes = {batch, batch * folded}

    def tile(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0 or t.shape[0] not in sizes or times == 1:
            return t
        return t.repeat(times, *([1] * (t.ndim - 1)))
    return tree_map(tile, obj)


def tree_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj``, in the order :func:`tree_map` visits them."""
    leaves: list[torch.Tensor] = []
    tree_map(leaves.append, obj)
    return leaves


def tree_rebuild(template: Any, leaves: Any) -> Any:
    """``template`` with its tensors replaced, in order, by ``leaves`` (as many as it has)."""
    it = iter(leaves)
    return tree_map(lambda _: next(it), template)
