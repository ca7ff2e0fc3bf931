"""Token merging kernels: bipartite soft matching over a 2D grid of tokens (ToMe for SD).

Pure tensor functions, no model code. :func:`bipartite_soft_matching` splits the ``h x w`` tokens of a
feature map into destinations (one per ``sy x sx`` cell) and sources (all the others), matches every
source to its most similar destination by cosine similarity, and returns two functions: ``merge``
averages the ``r`` best-matched sources into their destinations (``N`` tokens in, ``N - r`` out), and
``unmerge`` gives every token back its value by copying each merged destination to its sources.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

MergeFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def grid_partition(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the destination and source tokens of an ``h x w`` row-major grid, built on ``device``.

    The destinations are one token per whole ``sy x sx`` cell: a random one drawn from ``generator``,
    or the first of the cell when ``generator`` is None. Rows and columns left over when ``h`` or ``w``
    is not a multiple of the cell size hold sources only. Nothing is copied between devices and nothing
    waits for the device: the draw happens on ``device`` (pass a generator of that device).

    Args:
        h, w: height and width of the token grid.
        sx, sy: cell width and height.
        generator: the generator of the random choice, or None for a fixed one.
        device: where the indices live; default: the generator's device, else the CPU.

    Returns:
        ``(dst, src)``: the destinations in cell order (row-major cells), the sources in increasing order.

    Example:
        >>> grid_partition(4, 4, 2, 2)[0].tolist()
        [0, 2, 8, 10]
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    cells_y, cells_x = h // sy, w // sx
    if generator is not None:
        choice = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device)
        if choice.device != device:  # a generator of another device still works, at the price of a copy
            choice = choice.to(device)
    else:
        choice = torch.zeros(cells_y, cells_x, dtype=torch.long, device=device)
    rows = torch.arange(cells_y, device=device).view(-1, 1) * sy + choice // sx
    cols = torch.arange(cells_x, device=device).view(1, -1) * sx + choice % sx
    dst = (rows * w + cols).reshape(-1)
    is_dst = torch.zeros(h * w, dtype=torch.uint8, device=device).index_fill_(0, dst, 1)
    # the sources in increasing order, without nonzero() (whose output size would need a device sync)
    src = torch.sort(is_dst, stable=True).indices[:h * w - dst.numel()]
    return dst, src


def bipartite_soft_matching(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                            generator: torch.Generator | None = None) -> tuple[MergeFn, MergeFn]:
    """Bipartite soft matching of the tokens of a ``h x w`` feature map (Bolya & Hoffman, ToMe for SD).

    Args:
        metric: ``(B, N, C)`` tokens, ``N = h * w`` in row-major order, whose cosine similarity decides
            the matching (ToMe uses the transformer block's input).
        w, h: width and height of the token grid.
        sx, sy: destination cell size: one destination per ``sy x sx`` cell.
        r: how many tokens to remove; at most the number of sources (capped).
        generator: generator choosing each cell's destination at random, on ``metric``'s device (no copy,
            no sync); None takes the first token of each cell (what must happen when two calls have to
            match exactly).

    Returns:
        ``(merge, unmerge)``: ``merge`` maps ``(B, N, D)`` to ``(B, N - r, D)`` (each merged source is
        averaged into its destination, the sources kept come first); ``unmerge`` maps ``(B, N - r, D')``
        back to ``(B, N, D')``. Both are identities when nothing can be merged.

    Example:
        >>> x = torch.randn(2, 16, 8)
        >>> merge, unmerge = bipartite_soft_matching(x, 4, 4, 2, 2, r=6)
        >>> merge(x).shape, unmerge(merge(x)).shape
        (torch.Size([2, 10, 8]), torch.Size([2, 16, 8]))
    """
    batch, tokens, _ = metric.shape
    if tokens != h * w:
        raise ValueError(f"metric has {tokens} tokens but the grid h={h} x w={w} holds {h * w}")
    if r <= 0 or h // sy == 0 or w // sx == 0:
        return _identity, _identity
    dst_idx, src_idx = grid_partition(h, w, sx, sy, generator, device=metric.device)
    num_src = src_idx.numel()
    r = min(r, num_src)
    if r == 0:
        return _identity, _identity

    normed = F.normalize(metric, dim=-1)
    scores = normed[:, src_idx] @ normed[:, dst_idx].transpose(-1, -2)   # (B, src, dst)
    best, best_dst = scores.max(dim=-1)
    # stable, so that ties (e.g. duplicated tokens) resolve the same on every device and call
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices.unsqueeze(-1)
    kept, moved = order[:, r:], order[:, :r]                              # positions among the sources
    moved_dst = best_dst.unsqueeze(-1).gather(1, moved)                   # (B, r, 1) destination of each
    kept_pos, moved_pos = src_idx[kept], src_idx[moved]                   # positions among all tokens

    def merge(x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        keep = src.gather(1, kept.expand(batch, num_src - r, dim))
        take = src.gather(1, moved.expand(batch, r, dim))
        # include_self: a destination with k sources becomes the mean of k + 1 tokens (all of size 1)
        dst = dst.scatter_reduce(1, moved_dst.expand(batch, r, dim), take, reduce="mean", include_self=True)
        return torch.cat([keep, dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        dim = y.shape[-1]
        keep, dst = y[:, :num_src - r], y[:, num_src - r:]
        out = y.new_empty(batch, tokens, dim)  # every position is written below
        out[:, dst_idx] = dst
        out.scatter_(1, kept_pos.expand(batch, num_src - r, dim), keep)
        out.scatter_(1, moved_pos.expand(batch, r, dim), dst.gather(1, moved_dst.expand(batch, r, dim)))
        return out

    return merge, unmerge
