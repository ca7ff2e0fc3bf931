"""TIEC feature estimators: what a non-key step decodes from. Pure functions on tuples of tensors.

``F`` is the tuple of encoder features of one step (every skip feature and the mid-block output).
Timesteps decrease along the loop (``t1 > t2 > t_s`` for the last two key steps and the step being
estimated). Each estimator is a function of the same shape: features and timesteps in, features out.
"""

from __future__ import annotations

from typing import Sequence

import torch

Features = tuple[torch.Tensor, ...]
ESTIMATORS = ("reuse", "extrapolate", "interpolate")


def line_weight(t_a: float, t_b: float, t: float) -> float:
    """The weight ``w`` of ``F(t_a)`` in ``w*F(t_a) + (1-w)*F(t_b)``, linear in ``t``: 1 at ``t_a``, 0 at ``t_b``.

    Example:
        >>> line_weight(900.0, 800.0, 700.0)   # one interval beyond t_b: extrapolation
        -1.0
    """
    if t_a == t_b:
        raise ValueError(f"line_weight needs two distinct timesteps, got t_a = t_b = {t_a}")
    return (t_b - t) / (t_b - t_a)


def blend(f_a: Sequence[torch.Tensor], f_b: Sequence[torch.Tensor], w: float) -> Features:
    """``w*f_a + (1-w)*f_b`` for every tensor, as ``f_b + w*(f_a - f_b)``; ``w`` = 0 or 1 gives one side back exactly.

    Half-precision features are blended in float32: with a large extrapolation weight (keys 0, 1, 20 give
    ``w = -19``) the two terms of the blend nearly cancel, and fp16 arithmetic would lose the difference.

    Example:
        >>> blend((torch.tensor(1.0),), (torch.tensor(2.0),), -1.0)
        (tensor(3.),)
    """
    def one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b32 = blend_ends(a, b)
        return torch.lerp(b32, a, w).to(b.dtype)  # no copy where no conversion was made
    return tuple(one(a, b) for a, b in zip(f_a, f_b))


def blend_ends(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors ``blend`` interpolates between, in the precision it computes in (float32 for half-precision
    features, else the tensors themselves), so that ``torch.lerp(b, a, w, out=...)`` gives ``blend``'s values.

    Example:
        >>> a, b = blend_ends(torch.ones(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16))
        >>> a.dtype, b.dtype
        (torch.float32, torch.float32)
    """
    if b.dtype in (torch.float16, torch.bfloat16):
        return a.float(), b.float()
    return a, b


def reuse(f_last: Sequence[torch.Tensor]) -> Features:
    """FasterDiffusion encoder propagation (Li et al., 2023): the last key step's features, unchanged."""
    return tuple(f_last)


def extrapolate(f1: Sequence[torch.Tensor], f2: Sequence[torch.Tensor], t1: float, t2: float, t_s: float,
                max_extrapolation: float | None = None) -> Features:
    """TIEC extrapolation: the line in ``t`` through the last two key steps ``(t1, f1)``, ``(t2, f2)`` at ``t_s``.

    ``w = (t2 - t_s) / (t2 - t1)``, negative beyond ``t2``. Causal: uses only steps already run.
    ``max_extrapolation`` (optional) bounds the weight from below: ``w >= -max_extrapolation``.

    Example:
        >>> extrapolate((torch.tensor(1.0),), (torch.tensor(2.0),), 900.0, 800.0, 700.0)
        (tensor(3.),)
    """
    w = line_weight(t1, t2, t_s)
    if max_extrapolation is not None:
        w = max(w, -max_extrapolation)
    return blend(f1, f2, w)


def extrapolate_quadratic(f0: Sequence[torch.Tensor], f1: Sequence[torch.Tensor], f2: Sequence[torch.Tensor],
                          t0: float, t1: float, t2: float, t_s: float) -> Features:
    """Second-order TIEC forecast: the quadratic in ``t`` through the last three key steps, evaluated at ``t_s``.

    The Lagrange form of the parabola through ``(t0, f0), (t1, f1), (t2, f2)`` (the same polynomial as the finite
    differences of TaylorSeer, Liu et al., 2025, applied here to encoder features). Computed in float32 for half
    precision features: the weights grow quickly beyond the last key step and the terms nearly cancel.

    Example:
        >>> f = lambda t: (torch.tensor(t * t, dtype=torch.float64),)   # features quadratic in t
        >>> extrapolate_quadratic(f(3.0), f(2.0), f(1.0), 3.0, 2.0, 1.0, 0.5)
        (tensor(0.2500, dtype=torch.float64),)
    """
    if len({t0, t1, t2}) != 3:
        raise ValueError(f"extrapolate_quadratic needs three distinct timesteps, got {t0}, {t1}, {t2}")
    w0 = (t_s - t1) * (t_s - t2) / ((t0 - t1) * (t0 - t2))
    w1 = (t_s - t0) * (t_s - t2) / ((t1 - t0) * (t1 - t2))

    def one(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        low = c.dtype in (torch.float16, torch.bfloat16)
        a, b, c32 = (a.float(), b.float(), c.float()) if low else (a, b, c)
        # the newest key as the base term: beside it the forecast is a small correction
        out = c32 + w0 * (a - c32) + w1 * (b - c32)
        return out.to(c.dtype) if low else out
    return tuple(one(a, b, c) for a, b, c in zip(f0, f1, f2))


def interpolate(f_cur: Sequence[torch.Tensor], f_next: Sequence[torch.Tensor], t_cur: float, t_next: float,
                t_s: float) -> Features:
    """TIEC interpolation: the line in ``t`` between the current key step and the (predicted) next one.

    Example:
        >>> interpolate((torch.tensor(0.0),), (torch.tensor(4.0),), 800.0, 400.0, 700.0)
        (tensor(1.),)
    """
    return blend(f_cur, f_next, line_weight(t_cur, t_next, t_s))


def ddim_jump(sample: torch.Tensor, model_output: torch.Tensor, alpha_prod_t: float, alpha_prod_next: float,
              prediction_type: str = "epsilon") -> torch.Tensor:
    """One deterministic DDIM step (Song et al., 2021) from a variance-preserving ``x_t`` to ``x_next``.

    Example:
        >>> x0, eps = torch.ones(3), torch.randn(3)
        >>> x_t = 0.5 ** 0.5 * x0 + 0.5 ** 0.5 * eps  # alpha_prod_t = 0.5
        >>> x_next = ddim_jump(x_t, eps, 0.5, 0.8)
        >>> torch.allclose(x_next, 0.8 ** 0.5 * x0 + 0.2 ** 0.5 * eps)  # the same x0 and noise at alpha_prod 0.8
        True
    """
    a_t, a_n = torch.tensor(alpha_prod_t, dtype=torch.float64), torch.tensor(alpha_prod_next, dtype=torch.float64)
    sqrt_a, sqrt_1ma = a_t.sqrt().item(), (1 - a_t).sqrt().item()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(f"prediction_type={prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")
    return a_n.sqrt().item() * x0 + (1 - a_n).sqrt().item() * eps
