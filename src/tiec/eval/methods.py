"""The benchmark's method table and sampler schedules, parsed from names such as ``reuse+noise`` and ``ddim20:uniform:5``.

Methods (``+`` combines parts):

- ``full``: the plain sampler, nothing applied;
- ``reuse`` / ``extrapolate`` / ``interpolate``: encoder propagation with that estimator
  (``tiec.EncoderPropagationConfig``) on the schedule's key steps;
- ``+noise``: with prior noise injection (weight ``--noise-injection``, FasterDiffusion's 0.003);
- ``+serial``: decode the non-key steps one at a time (``parallel=False``) instead of batching the decoders
  of a key-step group in one call; the same images (the math is the same), a different speed: batching
  pays on GPUs, on a small CPU the plain loop can be faster;
- ``tome``: token merging (``tiec.TokenMergingConfig``), alone or combined (``reuse+tome``);
- ``deepcache``: DeepCache (``tiec.DeepCacheConfig``), alone or with ``+tome``;
- ``deepcache+extrapolate``: TIEC on DeepCache's cache (``DeepCacheConfig(estimator="extrapolate")``): shallow
  steps decode from the deep feature extrapolated from the last two full steps instead of the last one's.

Schedules: sampler ``ddim`` (DDIMScheduler) or ``dpm`` (DPMSolverMultistepScheduler, DPM-Solver++),
the step count, then the key-step spec of ``tiec.schedules``: ``ddim50:faster-diffusion``,
``ddim20:uniform:5``, ``dpm20:every:4``. Methods that do not use key steps (``full``, ``tome``,
``deepcache``) run once per sampler and step count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import schedules
from ..deepcache import DeepCacheConfig
from ..propagation import EncoderPropagationConfig
from ..tome import TokenMergingConfig

ESTIMATORS = ("reuse", "extrapolate", "interpolate")
PARTS = ("full", *ESTIMATORS, "deepcache", "noise", "order2", "serial", "tome")
SAMPLERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}
CORE_METHODS = ("full", "reuse", "extrapolate", "interpolate")
DEFAULT_METHODS = ("full", "reuse", "reuse+noise", "extrapolate", "interpolate", "tome", "deepcache",
                   "reuse+tome", "extrapolate+tome")
DEFAULT_SCHEDULES = ("ddim50:faster-diffusion", "ddim20:uniform:10", "ddim20:uniform:5", "dpm20:uniform:5")
METHOD_HELP = ("'full', or one of reuse/extrapolate/interpolate/deepcache/tome, optionally joined with '+noise' "
               "and '+serial' (estimators only) and '+tome'; 'deepcache+extrapolate' for TIEC on DeepCache's cache")


@dataclass(frozen=True)
class Method:
    """A parsed method name: which configs it applies."""

    name: str
    estimator: str | None = None
    noise: bool = False
    tome: bool = False
    deepcache: bool = False
    serial: bool = False
    order2: bool = False
    deepcache_estimator: str | None = None  # "extrapolate": DeepCache's cached deep feature estimated (TIEC)

    @property
    def uses_key_steps(self) -> bool:
        return self.estimator is not None


def parse_method(name: str) -> Method:
    """Parse a method name; ValueError naming the name and what is allowed.

    Example:
        >>> parse_method("reuse+noise")  # doctest: +NORMALIZE_WHITESPACE
        Method(name='reuse+noise', estimator='reuse', noise=True, tome=False, deepcache=False, serial=False,
               order2=False, deepcache_estimator=None)
        >>> parse_method("extrapolate+deepcache").name  # TIEC on DeepCache's cache: not encoder propagation
        'deepcache+extrapolate'
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method={name!r} is empty; expected {METHOD_HELP}")
    parts = [p.strip() for p in name.strip().split("+")]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"method={name!r}: unknown part(s) {unknown}; expected {METHOD_HELP}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"method={name!r} repeats a part; expected {METHOD_HELP}")
    if "full" in parts:
        if len(parts) > 1:
            raise ValueError(f"method={name!r}: 'full' is the plain sampler and combines with nothing; "
                             f"expected {METHOD_HELP}")
        return Method("full")
    estimators = [p for p in parts if p in ESTIMATORS]
    if len(estimators) > 1:
        raise ValueError(f"method={name!r} names several estimators {estimators}; use one of {list(ESTIMATORS)}")
    estimator = estimators[0] if estimators else None
    deepcache = "deepcache" in parts
    deepcache_estimator = None
    if deepcache and estimator:
        if estimator != "extrapolate":
            raise ValueError(f"method={name!r}: deepcache and encoder propagation ({estimator}) cannot be combined "
                             f"(both cache UNet features); 'deepcache+extrapolate' is TIEC's estimator on "
                             f"DeepCache's cache")
        modifiers = [f"+{p}" for p in parts if p in ("noise", "serial", "order2")]
        if modifiers:
            raise ValueError(f"method={name!r}: 'deepcache+extrapolate' takes no {', '.join(modifiers)} (encoder "
                             f"propagation modifiers); only '+tome'")
        deepcache_estimator, estimator = estimator, None
    for part, what in (("noise", "prior noise injection"), ("serial", "decode non-key steps one by one"),
                       ("order2", "second-order extrapolation")):
        if part in parts and estimator is None:
            raise ValueError(f"method={name!r}: '+{part}' ({what}) needs an estimator, one of {list(ESTIMATORS)}")
    noise, serial, order2 = "noise" in parts, "serial" in parts, "order2" in parts
    if order2 and estimator == "reuse":
        raise ValueError(f"method={name!r}: '+order2' (the quadratic through the last three key steps) needs "
                         f"'extrapolate' or 'interpolate'")
    tome = "tome" in parts
    canonical = "+".join([p for p in (estimator, "deepcache" if deepcache else None, deepcache_estimator) if p]
                         + (["order2"] if order2 else []) + (["noise"] if noise else [])
                         + (["serial"] if serial else []) + (["tome"] if tome else []))
    return Method(canonical, estimator, noise, tome, deepcache, serial, order2, deepcache_estimator)


def parse_methods(text: str | list[str] | tuple[str, ...]) -> list[Method]:
    """A comma-separated list of method names, parsed, duplicates removed, ``full`` first.

    ``full`` is added when missing: it is the reference for PSNR, SSIM, speed-up and the FID gap.

    Example:
        >>> [m.name for m in parse_methods("reuse,extrapolate")]
        ['full', 'reuse', 'extrapolate']
    """
    names = [n for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    methods: list[Method] = []
    for name in names:
        method = parse_method(name)
        if method not in methods:
            methods.append(method)
    methods = [m for m in methods if m.name == "full"] + [m for m in methods if m.name != "full"]
    if not methods or methods[0].name != "full":
        methods.insert(0, Method("full"))
    return methods


def build_configs(method: Method, key_steps: Any, noise_injection: float = 0.003, tome_ratio: float = 0.5,
                  deepcache_interval: int = 3, tome_max_downsample: int = 1) -> list[Any]:
    """The tiec configs of ``method`` (empty for ``full``).

    Example:
        >>> build_configs(parse_method("reuse+noise"), "uniform:5")
        [EncoderPropagationConfig(key_steps='uniform:5', estimator='reuse', ..., noise_injection=0.003, ...)]
    """
    configs: list[Any] = []
    if method.estimator is not None:
        configs.append(EncoderPropagationConfig(key_steps=key_steps, estimator=method.estimator,
                                                noise_injection=noise_injection if method.noise else 0.0,
                                                parallel=not method.serial,
                                                extrapolation_order=2 if method.order2 else 1))
    if method.deepcache:
        configs.append(DeepCacheConfig(cache_interval=deepcache_interval,
                                       estimator=method.deepcache_estimator or "reuse"))
    if method.tome:
        configs.append(TokenMergingConfig(ratio=tome_ratio, max_downsample=tome_max_downsample))
    return configs


def tome_max_downsample(model: str) -> int:
    """ToMe's published setting merges at the highest-resolution attention level: that is ``max_downsample=1``
    on Stable Diffusion, 2 on the demo model (whose 32x32 level has no attention)."""
    return 2 if model.startswith("demo") else 1


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: sampler, step count and key-step spec."""

    sampler: str
    num_steps: int
    key_steps: str

    @property
    def name(self) -> str:
        return f"{self.sampler}{self.num_steps}:{self.key_steps}"

    @property
    def base(self) -> str:
        """The label of the sampler alone (``ddim20``): the rows of methods without key steps."""
        return f"{self.sampler}{self.num_steps}"


_SCHEDULE = re.compile(r"^(?P<sampler>[a-z]+)(?P<steps>\d+):(?P<keys>.+)$")


def parse_schedule(text: str) -> Schedule:
    """Parse ``<sampler><steps>:<key-step spec>``; ValueError naming the value and what is allowed.

    Example:
        >>> parse_schedule("dpm20:uniform:5")
        Schedule(sampler='dpm', num_steps=20, key_steps='uniform:5')
    """
    match = _SCHEDULE.match(text.strip()) if isinstance(text, str) else None
    help_text = (f"expected <sampler><steps>:<key steps> with sampler in {list(SAMPLERS)} and key steps "
                 f"{schedules.SPEC_HELP} (list as 0/1/5), e.g. ddim20:uniform:5")
    if match is None:
        raise ValueError(f"schedule={text!r} is malformed; {help_text}")
    schedule = Schedule(match["sampler"], int(match["steps"]), match["keys"])
    if schedule.sampler not in SAMPLERS:
        raise ValueError(f"schedule={text!r}: sampler {schedule.sampler!r} is not known; {help_text}")
    try:
        spec = key_spec(schedule)
    except ValueError:
        raise ValueError(f"schedule={text!r}: key steps {schedule.key_steps!r} are not integers; {help_text}") from None
    try:
        schedules.check(spec, schedule.num_steps)
    except ValueError as e:
        raise ValueError(f"schedule={text!r}: {e}") from None
    return schedule


def key_steps_of(method: Method, schedule: Schedule, deepcache_interval: int = 3) -> list[int] | None:
    """The steps where the whole UNet runs: the schedule's key steps (estimators), every step (full, tome),
    or every ``deepcache_interval``-th step (DeepCache's full steps); None where they are chosen with the model
    (``auto:K``, ``adaptive:T``: the row's ``key_step_spec`` and ``encoder_runs`` say what ran)."""
    if method.estimator is not None:
        spec = key_spec(schedule)
        if isinstance(spec, str) and spec.startswith(("auto:", "adaptive:")):
            return None
        return list(schedules.resolve(spec, schedule.num_steps))
    if method.deepcache:
        return list(schedules.resolve(f"every:{deepcache_interval}", schedule.num_steps))
    return list(range(schedule.num_steps))


def deepcache_interval_of(schedule: Schedule, default: int) -> int:
    """The DeepCache interval of a row: ``N`` of a schedule written ``<sampler><steps>:every:N``, else ``default``.

    Example:
        >>> deepcache_interval_of(parse_schedule("ddim50:every:5"), 3), deepcache_interval_of(parse_schedule("ddim50:all"), 3)
        (5, 3)
    """
    match = re.fullmatch(r"every:(\d+)", schedule.key_steps)
    return int(match.group(1)) if match else default


def key_spec(schedule: Schedule) -> Any:
    """The schedule's key-step spec in the form ``EncoderPropagationConfig`` takes."""
    spec = schedule.key_steps
    return [int(k) for k in spec.split("/")] if ("/" in spec or spec.isdigit()) else spec


def make_scheduler(sampler: str, base_config: Any):
    """A fresh scheduler of ``sampler`` from the pipeline's own scheduler config.

    Example:
        >>> pipe.scheduler = make_scheduler("dpm", pipe.scheduler.config)
        >>> type(pipe.scheduler).__name__, pipe.scheduler.config.timestep_spacing  # the demo's "trailing" kept
        ('DPMSolverMultistepScheduler', 'trailing')
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; use one of {list(SAMPLERS)}")
    return getattr(diffusers, SAMPLERS[sampler]).from_config(base_config)
