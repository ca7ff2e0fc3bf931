"""Key-step schedules: which steps of the sampling loop run the full UNet (encoder included).

A *step* is one UNet call of the denoising loop, indexed over the timesteps the pipeline actually
iterates. Step 0 is always a key step. Specs:

- a list of step indices, strictly increasing, starting at 0;
- ``"all"``: every step is a key step (encoder propagation off; outputs are exactly the plain ones);
- ``"faster-diffusion"``: the FasterDiffusion paper's non-uniform set, exactly
  ``(0, 1, 2, 3, 5, 10, 15, 25, 35)`` at 50 steps. At ``n`` steps each index ``k`` becomes
  ``floor(k * n / 50 + 1/2)`` (clipped to ``n - 1``, duplicates dropped): the same fractions of
  the loop, dense at the start where features change fastest;
- ``"uniform:K"``: K key steps spread evenly, step ``floor(i * n / K)`` for ``i < K`` (``K <= n``);
- ``"every:N"``: every N-th step, ``0, N, 2N, ...``;
- ``"adaptive:T"``: steps 0 and 1, then each next key step chosen at run time, at the key step, from how fast
  the encoder features changed between the last two key steps (see :func:`next_adaptive_key`);
- ``"auto:K"``: the K key steps that minimise a calibration objective for this model, scheduler and step count
  (``tiec.calibrate``: the error of each non-key step's prediction against the full UNet, weighted by how much
  it moves the final sample, minimised exactly). Resolving it needs the pipeline; the calibration is stored on
  disk, made on first use for the demo model, and made by :func:`calibrate` (or ``tiec calibrate``) for others.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

KeyStepSpec = Union[str, Sequence[int]]

FASTER_DIFFUSION_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)
SPEC_HELP = ("a list of step indices starting at 0, 'all', 'faster-diffusion', 'uniform:K' (K >= 1), "
             "'every:N' (N >= 1), 'adaptive:T' (T > 0) or 'auto:K' (K >= 1, calibrated)")


def _parse_count(spec: str, prefix: str) -> int:
    text = spec[len(prefix):]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"key_steps={spec!r}: {text!r} is not an integer; expected {SPEC_HELP}") from None
    if value < 1:
        raise ValueError(f"key_steps={spec!r}: the count must be >= 1; expected {SPEC_HELP}")
    return value


def validate(spec: KeyStepSpec) -> KeyStepSpec:
    """Check a spec without knowing the loop length; returns it normalised (lists become tuples).

    Example:
        >>> validate([0, 2, 5])
        (0, 2, 5)
    """
    if isinstance(spec, str):
        if spec in ("all", "faster-diffusion"):
            return spec
        for prefix in ("uniform:", "every:", "auto:"):
            if spec.startswith(prefix):
                _parse_count(spec, prefix)
                return spec
        if spec.startswith("adaptive:"):
            adaptive_threshold(spec)
            return spec
        raise ValueError(f"key_steps={spec!r} is not a known schedule; expected {SPEC_HELP}")
    try:
        steps = tuple(spec)
    except TypeError:
        raise ValueError(f"key_steps={spec!r} is neither a string nor a list; expected {SPEC_HELP}") from None
    if not steps:
        raise ValueError(f"key_steps={list(steps)} is empty; expected {SPEC_HELP}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise ValueError(f"key_steps={list(steps)} holds non-integers; expected {SPEC_HELP}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"key_steps={list(steps)} holds duplicates; expected {SPEC_HELP}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"key_steps={list(steps)} is not sorted in increasing order; expected {SPEC_HELP}")
    if steps[0] != 0:
        raise ValueError(f"key_steps={list(steps)} does not start with step 0 (step 0 is always a key step); "
                         f"expected {SPEC_HELP}")
    return steps


def adaptive_threshold(spec: KeyStepSpec) -> float | None:
    """The threshold T of an ``"adaptive:T"`` spec; None for any other spec.

    Example:
        >>> adaptive_threshold("adaptive:0.1")
        0.1
    """
    if not (isinstance(spec, str) and spec.startswith("adaptive:")):
        return None
    text = spec[len("adaptive:"):]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"key_steps={spec!r}: {text!r} is not a number; expected {SPEC_HELP}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"key_steps={spec!r}: the threshold must be a finite number > 0; expected {SPEC_HELP}")
    return value


def adaptive_max_gap(num_steps: int) -> int:
    """The longest stretch between two adaptive key steps: a quarter of the loop (at least 1)."""
    return max(1, num_steps // 4)


def next_adaptive_key(key: int, previous: int, change: float, threshold: float, num_steps: int) -> int | None:
    """The key step after ``key`` for ``"adaptive:T"``, or None when the loop ends first.

    ``change`` is the relative change of the encoder features between key steps ``previous`` and ``key``
    (mean over the feature tensors of ``||F_key - F_previous|| / ||F_previous||``). Assuming the features keep
    changing at that rate per step, the next key step comes when the accumulated change would reach
    ``threshold``: ``gap = floor(threshold * (key - previous) / change)``, clamped to
    ``1 .. adaptive_max_gap(num_steps)`` (so a loop never has fewer than one key step per quarter).

    Example:
        >>> next_adaptive_key(key=4, previous=2, change=0.05, threshold=0.1, num_steps=50)  # 2.5% a step
        8
    """
    rate = change / max(1, key - previous)
    gap = adaptive_max_gap(num_steps) if rate <= 0 else int(min(adaptive_max_gap(num_steps), threshold / rate))
    step = key + max(1, gap)
    return step if step < num_steps else None


def _auto_count(spec: str, num_steps: int) -> int:
    count = _parse_count(spec, "auto:")
    if count > num_steps:
        raise ValueError(f"key_steps={spec!r} asks for {count} key steps in a loop of {num_steps} steps; "
                         f"use at most auto:{num_steps}")
    return count


def check(spec: KeyStepSpec, num_steps: int) -> None:
    """Raise ``ValueError`` where ``spec`` cannot describe a loop of ``num_steps`` steps, without reading a model
    (``"auto:K"``: only ``K <= num_steps``; its key steps need the pipeline, see :func:`resolve`).

    Example:
        >>> check("auto:9", 50)
    """
    if isinstance(spec, str) and spec.startswith("auto:"):
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be a positive integer")
        _auto_count(validate(spec), num_steps)
    else:
        resolve(spec, num_steps)


def resolve(spec: KeyStepSpec, num_steps: int, *, pipe: Any = None, unet: Any = None,
            estimator: str = "reuse", extrapolation_order: int = 1) -> tuple[int, ...]:
    """The key steps of a loop of ``num_steps`` UNet calls, as a sorted tuple starting with 0.

    ``pipe`` (or, for a bare UNet, ``unet``), ``estimator`` and ``extrapolation_order`` are read by ``"auto:K"``
    only: the calibration of that model and scheduler, for that estimator's objective.

    Example:
        >>> resolve("faster-diffusion", 50)
        (0, 1, 2, 3, 5, 10, 15, 25, 35)
        >>> resolve("uniform:5", 20)
        (0, 4, 8, 12, 16)
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive integer")
    spec = validate(spec)
    if spec == "all":
        return tuple(range(num_steps))
    if spec == "faster-diffusion":
        return tuple(sorted({min(num_steps - 1, math.floor(k * num_steps / 50 + 0.5)) for k in FASTER_DIFFUSION_50}))
    if isinstance(spec, str) and spec.startswith("uniform:"):
        count = _parse_count(spec, "uniform:")
        if count > num_steps:
            raise ValueError(f"key_steps={spec!r} asks for {count} key steps in a loop of {num_steps} steps; "
                             f"use at most uniform:{num_steps}")
        return tuple(i * num_steps // count for i in range(count))
    if adaptive_threshold(spec) is not None:  # the first two; the others are chosen during the run
        return (0, 1) if num_steps > 1 else (0,)
    if isinstance(spec, str) and spec.startswith("auto:"):
        from .calibrate import resolve_auto

        return resolve_auto(_auto_count(spec, num_steps), num_steps, pipe=pipe, unet=unet, estimator=estimator,
                            extrapolation_order=extrapolation_order)
    if isinstance(spec, str):
        return tuple(range(0, num_steps, _parse_count(spec, "every:")))
    if spec[-1] >= num_steps:
        raise ValueError(f"key_steps={list(spec)} has step {spec[-1]}, out of range for a loop of {num_steps} "
                         f"steps (valid: 0..{num_steps - 1})")
    return spec


def calibrate(pipe: Any, num_steps: int, num_keys: int, estimator: str = "reuse", prompts: Sequence[str] | None = None,
              num_samples: int = 8, **options: Any) -> list[int]:
    """The ``num_keys`` key steps of a ``num_steps`` loop chosen by calibration (what ``"auto:K"`` uses).

    Measured once on the plain sampler with calibration seeds (1,000,000 + i, never evaluation seeds), stored on
    disk and reused; the objective and its exact optimisation are described in ``tiec.calibrate``, which also
    documents ``options`` (``cache_dir``, ``recompute``, ``guidance_scale``, ``pipeline_kwargs``, ...).

    Example:
        >>> keys = calibrate(pipe, num_steps=8, num_keys=4, num_samples=2, progress=False)
        >>> cfg = tiec.EncoderPropagationConfig(key_steps=keys)   # or key_steps="auto:5"
    """
    from .calibrate import calibrate as run

    return run(pipe, num_steps, num_keys, estimator, prompts, num_samples, **options)
