"""DeepCache (Ma et al. 2023): at most steps only the shallow branch of the UNet runs, on cached deep features.

Branch ``b`` (``cache_branch_id``) of a UNet with ``n`` down and up blocks splits it in two:
- the shallow path: ``conv_in``, ``down_blocks[0..b]``, ``up_blocks[n-1-b..]``, ``conv_norm_out``/``conv_out``;
- the deep path: ``down_blocks[b+1..]``, ``mid_block``, ``up_blocks[..n-2-b]``.
The deep feature is the input of ``up_blocks[n-1-b]`` (the output of the deep path). At a full step the
whole UNet runs and a copy of that feature is kept; at the other (shallow) steps the deep parts return
placeholders without computing anything and ``up_blocks[n-1-b]`` reads the cached feature instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._part import Part, loop_timeline

SCHEDULES = ("uniform", "non-uniform")
# The non-uniform rule: full steps cluster around this share of the loop, by this power (see full_steps).
NON_UNIFORM_CENTRE = 0.3
NON_UNIFORM_POWER = 1.4


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache: reuse the deep UNet features of the last full step; run only the shallow branch between.

    Args:
        cache_interval: one full step every this many steps (on average for ``"non-uniform"``). Higher:
            faster, further from the plain sampler. ``1`` is the plain sampler. Default 3.
        cache_branch_id: the skip branch (down block index) the shallow path ends at. Lower: cheaper
            shallow steps, less computed. Default 0; must be below the UNet's number of down blocks.
        schedule: where the full steps go: ``"uniform"`` (every ``cache_interval``-th step) or
            ``"non-uniform"`` (as many full steps, clustered by a power law around 30% of the loop;
            see :func:`full_steps`). Step 0 is always full. Default ``"uniform"``.

    Example:
        >>> cfg = DeepCacheConfig(cache_interval=5, cache_branch_id=0, schedule="non-uniform")
    """

    cache_interval: int = 3
    cache_branch_id: int = 0
    schedule: str = "uniform"

    def __post_init__(self):
        if isinstance(self.cache_interval, bool) or not isinstance(self.cache_interval, int) \
                or self.cache_interval < 1:
            raise ValueError(f"cache_interval={self.cache_interval!r} must be a positive integer (1: no caching)")
        if isinstance(self.cache_branch_id, bool) or not isinstance(self.cache_branch_id, int) \
                or self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id={self.cache_branch_id!r} must be an integer >= 0 (a down block index)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not known; use one of {list(SCHEDULES)}")


def full_steps(num_steps: int, cache_interval: int, schedule: str = "uniform") -> tuple[int, ...]:
    """The steps of a ``num_steps`` loop where the whole UNet runs, sorted; step 0 is always one.

    ``"uniform"``: every ``cache_interval``-th step from 0. ``"non-uniform"``: the same number of full
    steps, ``K = ceil(num_steps / cache_interval)``, placed at ``c + sign(u) * |u| ** p * span`` for ``K``
    values of ``u`` evenly spaced in [-1, 1], with the centre ``c = 0.3 * (num_steps - 1)``, ``p = 1.4``
    and ``span`` the distance from ``c`` to the first (``u < 0``) or last step: dense around ``c``, where
    the features change fastest, sparse at both ends. Steps that round to the same one are made up by the
    free steps nearest ``c``.

    Args:
        num_steps: steps in the loop.
        cache_interval: the (average) distance between full steps.
        schedule: ``"uniform"`` or ``"non-uniform"``.

    Example:
        >>> full_steps(10, 3)
        (0, 3, 6, 9)
    """
    if num_steps < 1:
        return ()
    if schedule == "uniform" or cache_interval == 1:
        return tuple(range(0, num_steps, cache_interval))
    if schedule != "non-uniform":
        raise ValueError(f"schedule={schedule!r} is not known; use one of {list(SCHEDULES)}")
    count = math.ceil(num_steps / cache_interval)
    last = num_steps - 1
    centre = NON_UNIFORM_CENTRE * last
    chosen = {0}
    for j in range(count):
        u = -1.0 + 2.0 * j / (count - 1) if count > 1 else -1.0
        span = centre if u < 0 else last - centre
        chosen.add(min(last, max(0, round(centre + math.copysign(abs(u) ** NON_UNIFORM_POWER * span, u)))))
    free = sorted((s for s in range(num_steps) if s not in chosen), key=lambda s: (abs(s - centre), s))
    chosen.update(free[:max(0, count - len(chosen))])
    return tuple(sorted(chosen))


class _Run:
    """One sampling loop: its length, its full steps and the step cursor."""

    def __init__(self, config: DeepCacheConfig, num_steps: int):
        self.num_steps = num_steps
        self.full = frozenset(full_steps(num_steps, config.cache_interval, config.schedule))
        self.step = -1


class DeepCache(Part):
    """DeepCache applied to one UNet (and its pipeline). Made by ``tiec.apply``."""

    config: DeepCacheConfig

    def install(self) -> None:
        unet, branch = self.unet, self.config.cache_branch_id
        count = len(unet.down_blocks)
        if len(unet.up_blocks) != count:
            raise ValueError(f"DeepCache needs as many up blocks as down blocks; this UNet has {count} down and "
                             f"{len(unet.up_blocks)} up blocks")
        if branch >= count:
            raise ValueError(f"cache_branch_id={branch} does not fit this UNet: it has {count} down blocks, "
                             f"so use 0..{count - 1}")
        super().install()
        self.reset()
        entry = count - 1 - branch  # the first up block of the shallow path
        for index in range(branch + 1, count):
            self.patch(unet.down_blocks[index], "forward", self._deep_forward(f"down{index}"))
        if unet.mid_block is not None:
            self.patch(unet.mid_block, "forward", self._deep_forward("mid"))
        for index in range(entry):
            self.patch(unet.up_blocks[index], "forward", self._deep_forward(f"up{index}"))
        self.patch(unet.up_blocks[entry], "forward", self._entry_forward)
        self.patch(unet, "forward", self._unet_forward)
        self.stats = self.new_stats()

    def new_stats(self) -> dict[str, int]:
        return {"unet_calls": 0, "full_steps": 0, "shallow_steps": 0}

    def reset(self) -> None:
        self._run: _Run | None = None
        self._pending = False
        self._mode: str | None = None              # "full" or "shallow" while a UNet call runs
        self._deep: torch.Tensor | None = None     # copy of the deep feature of the last full step
        self._sample_shape: tuple[int, ...] = ()   # the UNet input shape of that step
        self._placeholders: dict[str, Any] = {}    # what each deep part returned at that step

    def begin_call(self, pipe: Any) -> None:
        super().begin_call(pipe)
        self._pending = True

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling loop of ``num_steps`` UNet calls (only needed for a bare UNet)."""
        self.reset()
        self.stats = self.new_stats()
        self._run = _Run(self.config, num_steps)

    def _current_run(self, timestep: Any) -> _Run | None:
        if self._pending:
            self._pending = False
            self._run = _Run(self.config, len(loop_timeline(self.pipe.scheduler, timestep)))
        return self._run

    # -- patches --------------------------------------------------------------------------------
    def _unet_forward(self, inner, *args, **kwargs):
        if self._mode is not None:
            return inner(*args, **kwargs)
        run = self._current_run(args[1] if len(args) > 1 else kwargs.get("timestep"))
        if run is None:
            if self.pipe is None:
                raise RuntimeError("tiec: call handle.start_run(num_steps) before each sampling loop of a bare UNet")
            return inner(*args, **kwargs)
        self.stats["unet_calls"] += 1
        run.step += 1
        sample = args[0] if args else kwargs["sample"]
        self._mode = "full" if self._needs_full(run, sample) else "shallow"
        if self._mode == "full":
            self._sample_shape = tuple(sample.shape)
        try:
            out = inner(*args, **kwargs)
        finally:
            mode, self._mode = self._mode, None
        self.stats[f"{mode}_steps"] += 1
        return out

    def _needs_full(self, run: _Run, sample: torch.Tensor) -> bool:
        """Whether this step runs the whole UNet: a scheduled full step, or no usable cache."""
        if run.step in run.full or run.step >= run.num_steps or self._deep is None:
            return True
        return tuple(sample.shape) != self._sample_shape or self._deep.device != sample.device

    def _deep_forward(self, key: str) -> Callable:
        def forward(inner, *args, **kwargs):
            if self._mode == "shallow":
                # Shapes only: whatever reads these feeds other skipped parts, and the shallow path
                # takes the cached deep feature in _entry_forward, so their values are never used.
                return self._placeholders[key]
            out = inner(*args, **kwargs)
            if self._mode == "full":
                self._placeholders[key] = out
            return out
        return forward

    def _entry_forward(self, inner, *args, **kwargs):
        if self._mode is None:
            return inner(*args, **kwargs)
        if self._mode == "full":
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._deep = hidden.clone()
            return inner(*args, **kwargs)
        # a copy again: the block may change its input in place (FreeU does)
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=self._deep.clone())
        else:
            args = (self._deep.clone(),) + args[1:]
        return inner(*args, **kwargs)
