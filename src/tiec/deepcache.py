"""DeepCache (Ma et al. 2023): at most steps only the shallow branch of the UNet runs, on cached deep features.

The UNet's *skip branches* are the features its down path hands to the up path, numbered in the order they are
made: branch 0 is ``conv_in``'s output, then one per layer of each down block (a resnet with its attention, then
the downsampler). The up path consumes them in reverse, one per up-block resnet. ``cache_branch_id = b`` splits
the UNet at branch ``b``, as DeepCache's reference does (layer granularity, not whole blocks):
- the shallow path: ``conv_in``, the down layers that make branches ``1..b``, then the up path from the layer
  (resnet + attention) that consumes branch ``b`` to the end, and ``conv_norm_out``/``conv_out``;
- the deep path: everything in between (the rest of the down path, ``mid_block``, the up layers before that one).
At a full step the whole UNet runs and each deep part's output is kept; at the other (shallow) steps the deep parts
return those outputs without computing anything. What they return only feeds other skipped parts, except the
output of the last deep part before the entry layer: the cached deep feature, handed out as a copy, or with
``estimator="extrapolate"`` (TIEC applied to DeepCache's cache) estimated from the last two full steps' deep features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import estimators
from ._part import Part
from ._timeline import StepCursor, Timeline, bare_timestep

SCHEDULES = ("uniform", "non-uniform")
ESTIMATORS = ("reuse", "extrapolate")
# The non-uniform rule: full steps cluster around this share of the loop, by this power (see full_steps).
NON_UNIFORM_CENTRE = 0.3
NON_UNIFORM_POWER = 1.4


@dataclass(frozen=True, repr=False)
class DeepCacheConfig:
    """DeepCache: reuse the deep UNet features of the last full step; run only the shallow branch between.

    Args:
        cache_interval: one full step every this many steps (on average for ``"non-uniform"``). Higher:
            faster, further from the plain sampler. ``1`` is the plain sampler. Default 3.
        cache_branch_id: the skip branch where the shallow path turns back (see the module docstring): a
            shallow step runs ``conv_in``, the down layers up to the one making this branch, and the up path
            from the layer consuming it. ``0``: ``conv_in`` and the last layer (resnet + attention) of the last
            up block only. With ``layers_per_block=2`` (SD1.5, SD2, SDXL: 3 layers per down block, 2 in the
            last), ``b = 3k + l`` runs the first ``l`` layers of down block ``k`` (``l = 2``: both resnets with
            their attentions, not the downsampler), the last ``l + 1`` layers and the upsampler of the up block
            mirroring it, and every earlier down and later up block; the numbering of DeepCache's reference
            (``DeepCacheSDHelper``). SD1.5 has 12 branches; ``11`` skips only the mid block. Lower: cheaper
            shallow steps, less computed. Default 0; must be below the UNet's number of skip branches
            (1 + its down blocks' layers; :func:`skip_branches`).
        schedule: where the full steps go: ``"uniform"`` (every ``cache_interval``-th step) or
            ``"non-uniform"`` (as many full steps, clustered by a power law around 30% of the loop;
            see :func:`full_steps`). Step 0 is always full. Default ``"uniform"``.
        estimator: the deep feature a shallow step decodes from. ``"reuse"`` (DeepCache as published): the last
            full step's. ``"extrapolate"`` (TIEC on DeepCache's cache): the line in the timestep through the deep
            features of the last two full steps, evaluated at this step's timestep (``tiec.estimators.extrapolate``,
            blended in float32 for half precision); the last full step's until two have run, and a full step at the
            timestep of the previous one (Heun, KDPM2) replaces it. Costs no UNet FLOPs, one more cached feature
            per call position. With ``schedule="non-uniform"`` the gaps between full steps vary, so a forecast
            can reach a few short intervals beyond the last full step. Default ``"reuse"``.

    Example:
        >>> cfg = DeepCacheConfig(cache_interval=5, cache_branch_id=0, schedule="non-uniform")
        >>> full_steps(20, cfg.cache_interval, cfg.schedule)  # the steps of a 20-step loop that run the whole UNet
        (0, 4, 9, 19)
    """

    cache_interval: int = 3
    cache_branch_id: int = 0
    schedule: str = "uniform"
    estimator: str = "reuse"

    def __post_init__(self):
        if isinstance(self.cache_interval, bool) or not isinstance(self.cache_interval, int) \
                or self.cache_interval < 1:
            raise ValueError(f"cache_interval={self.cache_interval!r} must be a positive integer (1: no caching)")
        if isinstance(self.cache_branch_id, bool) or not isinstance(self.cache_branch_id, int) \
                or self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id={self.cache_branch_id!r} must be an integer >= 0 (a skip branch index)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not known; use one of {list(SCHEDULES)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not known for DeepCache; use one of {list(ESTIMATORS)}")

    def __repr__(self) -> str:
        # The estimator shows only when it is not the default: a plain DeepCache config keeps the repr it had before
        # the field existed, which is what `tiec bench`'s stored row keys were made from.
        extra = "" if self.estimator == "reuse" else f", estimator={self.estimator!r}"
        return (f"DeepCacheConfig(cache_interval={self.cache_interval!r}, cache_branch_id={self.cache_branch_id!r}, "
                f"schedule={self.schedule!r}{extra})")


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
    """One sampling loop: its length, its full steps and its step cursor.

    A pipeline's loop has a ``timeline``: each call's step is read from its timestep (``tiec._timeline``), so
    pipelines that call the UNet twice per step (split guidance) give each call position its own cache. A bare
    UNet's calls are its steps, one after the other.
    """

    def __init__(self, config: DeepCacheConfig, num_steps: int, timeline: Timeline | None = None):
        self.num_steps = num_steps
        self.full = frozenset(full_steps(num_steps, config.cache_interval, config.schedule))
        self.cursor = StepCursor(timeline)


class DeepCache(Part):
    """DeepCache applied to one UNet (and its pipeline). Made by ``tiec.apply``."""

    config: DeepCacheConfig

    def install(self) -> None:
        unet, branch = self.unet, self.config.cache_branch_id
        parts = deep_parts(unet, branch)  # validates first: a bad branch leaves the UNet untouched
        super().install()
        self.reset()
        for index, module in enumerate(parts):
            self.patch(module, "forward", self._deep_forward(index, feeds_entry=index == len(parts) - 1))
        self.patch(unet, "forward", self._unet_forward)
        self.stats = self.new_stats()

    def new_stats(self) -> dict[str, int]:
        return {"unet_calls": 0, "full_steps": 0, "shallow_steps": 0}

    def reset(self) -> None:
        self._run: _Run | None = None
        self._pending = False
        self._mode: str | None = None              # "full" or "shallow" while a UNet call runs
        self._position = 0                         # the call position within the step of the running call
        # per call position: what each deep part returned at the last full step, and that call's input shape
        # and device
        self._outputs: dict[int, dict[int, Any]] = {}
        self._inputs: dict[int, tuple[tuple[int, ...], torch.device]] = {}
        # per call position: (timestep, deep feature) of the last two full steps, for estimator="extrapolate"
        self._history: dict[int, list[tuple[float, Any]]] = {}
        self._t = 0.0                              # the timestep of the running call

    def begin_call(self, pipe: Any, call_kwargs: dict | None = None) -> None:
        super().begin_call(pipe, call_kwargs)
        self._pending = True

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling loop of ``num_steps`` UNet calls (only needed for a bare UNet)."""
        self.reset()
        self.stats = self.new_stats()
        self._run = _Run(self.config, num_steps)

    def _current_run(self, timestep: Any) -> _Run | None:
        if self._pending:
            self._pending = False
            timeline = Timeline(self.pipe.scheduler, timestep)
            self._run = _Run(self.config, len(timeline), timeline)
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
        located = run.cursor.locate(args[1] if len(args) > 1 else kwargs.get("timestep"))
        if located is None:  # not a step of this loop: the plain UNet, nothing cached
            return inner(*args, **kwargs)
        step, self._position = located
        if self.config.estimator != "reuse":
            self._t = _time(run, step, args[1] if len(args) > 1 else kwargs.get("timestep"))
        sample = args[0] if args else kwargs["sample"]
        self._mode = "full" if self._needs_full(run, step, sample) else "shallow"
        if self._mode == "full":
            self._inputs[self._position] = (tuple(sample.shape), sample.device)
            self._outputs[self._position] = {}
        try:
            out = inner(*args, **kwargs)
        finally:
            mode, self._mode = self._mode, None
        self.stats[f"{mode}_steps"] += 1
        return out

    def _needs_full(self, run: _Run, step: int, sample: torch.Tensor) -> bool:
        """Whether this call runs the whole UNet: a scheduled full step, or no usable cache in its position."""
        if step in run.full or step >= run.num_steps or not self._outputs.get(self._position):
            return True
        return self._inputs[self._position] != (tuple(sample.shape), sample.device)

    def _deep_forward(self, index: int, feeds_entry: bool) -> Callable:
        def forward(inner, *args, **kwargs):
            if self._mode == "shallow":
                # Only the part feeding the entry layer hands out a value that is used (the deep feature): a copy
                # or a new estimate, since the up block may change it in place (FreeU does). The others only give
                # shapes to parts that are skipped too.
                out = self._outputs[self._position][index]
                return self._estimate(out) if feeds_entry else out
            out = inner(*args, **kwargs)
            if self._mode == "full":
                self._outputs[self._position][index] = _copy(out) if feeds_entry else out
                if feeds_entry and self.config.estimator != "reuse":
                    self._remember(self._outputs[self._position][index])
            return out
        return forward

    def _remember(self, stored: Any) -> None:
        """Keep a full step's deep feature for the estimator: the last two, at distinct timesteps and of one shape."""
        shape = _first(stored).shape
        history = [(t, feature) for t, feature in self._history.get(self._position, [])
                   if t != self._t and _first(feature).shape == shape]
        self._history[self._position] = [*history, (self._t, stored)][-2:]

    def _estimate(self, cached: Any) -> Any:
        """The deep feature of a shallow step: a copy of the cached one, or the estimator's forecast (same structure:
        a tensor, or a tuple or list whose first item is the feature)."""
        history = self._history.get(self._position, [])
        if self.config.estimator == "reuse" or len(history) < 2:
            return _copy(cached)
        (t0, old), (t1, new) = history
        (estimate,) = estimators.extrapolate((_first(old),), (_first(new),), t0, t1, self._t)
        return estimate if isinstance(cached, torch.Tensor) else type(cached)((estimate, *map(_copy, cached[1:])))


def _time(run: _Run, step: int, timestep: Any) -> float:
    """A step's position on the estimator's axis: its timestep, from the loop's timeline (read once per pipeline
    call, no device sync per step) or a bare UNet's own (``bare_timestep``: the step index on the meta device)."""
    if run.cursor.timeline is not None:
        return run.cursor.timeline.values[step]
    return bare_timestep(timestep, step)


def _first(out: Any) -> torch.Tensor:
    """The feature of a part's output: the tensor itself, or the first item of a tuple or list."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _copy(out: Any) -> Any:
    """A copy of a part's output: a tensor, or a tuple or list of them (an attention's ``(hidden_states,)``)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy(item) for item in out)
    return out


def _layers(block: torch.nn.Module) -> list[tuple[bool, tuple[torch.nn.Module, ...]]]:
    """A down or up block's layers in the order it runs them: ``(is_resnet_layer, modules)``.

    A resnet layer is one resnet with its attention (if the block has attentions); the down/upsamplers make the
    last layer, if there are any.
    """
    resnets = list(getattr(block, "resnets", None) or ())
    attentions = list(getattr(block, "attentions", None) or ())
    if attentions and len(attentions) != len(resnets):
        raise ValueError(f"DeepCache cannot split {type(block).__name__}: it has {len(resnets)} resnets but "
                         f"{len(attentions)} attentions")
    layers = [(True, (resnet, attentions[j]) if attentions else (resnet,)) for j, resnet in enumerate(resnets)]
    samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
    if samplers:
        layers.append((False, tuple(samplers)))
    return layers


def _block_parts(block: torch.nn.Module, layers: list, deep: list[bool]) -> list[torch.nn.Module]:
    """What to skip of one block: the whole block if all its layers are deep, else the deep layers' modules."""
    if layers and all(deep):
        return [block]
    return [module for (_, modules), is_deep in zip(layers, deep) if is_deep for module in modules]


def skip_branches(unet: torch.nn.Module) -> int:
    """The number of skip branches of a UNet: ``conv_in``'s output plus one per down-block layer.

    Example:
        >>> from tiec.flops import build_sd15_unet
        >>> skip_branches(build_sd15_unet())
        12
    """
    return 1 + sum(len(_layers(block)) for block in unet.down_blocks)


def deep_parts(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """The modules a shallow step of ``cache_branch_id=branch`` skips, in the order a UNet call runs them.

    Whole blocks where a block lies entirely on the deep path (``mid_block`` always), a layer's modules (resnet,
    attention, down/upsampler) where the branch cuts through a block. The last one feeds the up layer where the
    shallow path resumes. Raises ``ValueError`` if ``branch`` does not fit the UNet.

    Example:
        >>> from tiec.flops import build_sd15_unet
        >>> unet = build_sd15_unet()
        >>> parts = deep_parts(unet, 0)
        >>> parts[0] is unet.down_blocks[0] and parts[-1] is unet.up_blocks[-1].attentions[1]
        True
    """
    down, up = unet.down_blocks, unet.up_blocks
    count = skip_branches(unet)
    consumers = sum(is_resnet for block in up for is_resnet, _ in _layers(block))
    if len(up) != len(down) or consumers != count:
        raise ValueError(f"DeepCache needs an up path that mirrors the down path; this UNet makes {count} skip "
                         f"features in {len(down)} down blocks and its {len(up)} up blocks consume {consumers}")
    if branch >= count:
        raise ValueError(f"cache_branch_id={branch} does not fit this UNet: it has {count} skip branches (conv_in "
                         f"and one per down-block layer), so use 0..{count - 1}")
    parts: list[torch.nn.Module] = []
    made = 0  # skip branches made so far, conv_in's (branch 0) not counted
    for block in down:
        layers = _layers(block)
        parts += _block_parts(block, layers, [made + j + 1 > branch for j in range(len(layers))])
        made += len(layers)
    if unet.mid_block is not None:
        parts.append(unet.mid_block)
    pending, entered = count, False  # up resnets consume the skip branches from the last one down
    for block in up:
        layers, deep = _layers(block), []
        for is_resnet, _ in layers:
            if is_resnet:
                pending -= 1
                entered = entered or pending == branch
            deep.append(not entered)
        parts += _block_parts(block, layers, deep)
    return parts
