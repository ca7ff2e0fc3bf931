"""Calibrated key steps (``key_steps="auto:K"``): the K key steps that minimise a stated error, found exactly.

**Objective.** Run the plain sampler on calibration prompts and seeds, and record at every step ``s`` the UNet's
inputs, its encoder features ``F(s)`` and its output ``o(s)``. For a key set ``{0 = k_1 < ... < k_K}`` every
non-key step ``s`` decodes from estimated features; its cost is

    e(s) = G(s) * mean((g(o_hat(s)) - g(o(s)))^2)

where ``o_hat(s)`` is the decoder's output at step ``s`` (the step's own inputs and timestep) on the estimated
features, ``g`` is the prediction the sampler consumes (the guided one, ``u + scale * (c - u)``, with guidance
rescale where the pipeline uses it), and the mean runs over the calibration samples and every element. The
objective of a key set is the sum of ``e(s)`` over its non-key steps (key steps run the full UNet: no error).
With ``reuse`` the estimate depends only on the last key ``k <= s``; with ``extrapolate`` on the last two keys
``(k1, k2)`` (``reuse`` of key 0 while it is the only one), exactly as ``EncoderPropagationConfig`` forms it
(blend in ``t``, no bound on the weight).

**Weight: how much an error at step ``s`` moves the final sample.** ``G(s)`` is measured, not assumed: the plain
run is replayed with step ``s``'s prediction replaced by its one-step ``reuse`` estimate (decoded from
``F(s - 1)``), every later step running the full UNet, and ``G(s)`` is the mean squared change of the final sample
(the pipeline's output: latents, or the demo's images) per unit mean squared error of that prediction. It is the
step's own sampler coefficient times everything the later steps do to the displacement. The analytic first-order
weight (DDIM's coefficient of ``eps`` in ``x_{s+1}`` over ``sqrt(abar_{s+1})``, squared, with the later steps taken
as the identity) ignores that the later steps correct an early displacement: on the demo model at DDIM 20 it put
4,000 times more weight on step 1 than on step 19, chose keys 0,1,2,3,6 and gave PSNR 15.9 dB against the full
sampler where ``uniform:5`` gave 20.7 dB (16 evaluation images). The measured ``G`` costs about n^2/2 full UNet
evaluations per sample (later steps only: earlier ones replay the recorded outputs), as much as the ``reuse``
table. Assumptions: the displacement is linear in the error and independent of its direction beyond the one
measured, errors of different steps add without cross terms, and the trajectory is the plain sampler's (the drift
of the accelerated run is neglected): what makes the cost of an interval depend only on its end points.

**Exact optimum.** Dynamic programming over key sets: with ``reuse``, ``best[j][b]`` (j keys, the last at ``b``) =
``min_a best[j-1][a] + C(a, b)``, ``C(a, b)`` the costs of the steps strictly between, O(K n^2); with
``extrapolate`` the state is the last two keys, O(K n^3). The extrapolate table needs a decoder evaluation for every
triple ``k1 < k2 < s`` (C(n, 3): 19,600 at 50 steps, about 45 minutes on one CPU thread for the demo with 8
samples, seconds on a GPU), so it is measured only up to ``max_pair_steps`` steps (default: 30 where the UNet is
on a CPU, no bound on a GPU); beyond that the ``reuse`` objective chooses the key steps, and this is logged.

**Second order.** With ``extrapolate`` and ``extrapolation_order=2`` a non-key step decodes from the quadratic in
``t`` through the last three keys ``(k1, k2, k3)`` (the line through ``(0, k2)`` while two keys exist, ``reuse`` of
key 0 while it is the only one), so the state of the dynamic programme is the last three keys, O(K n^4), and the
table needs a decoder evaluation for every ``k1 < k2 < k3 < s`` (C(n, 4): 4,845 at 20 steps, about 15 minutes on
one CPU thread for the demo with 8 samples; 27,405 at 30 steps). It is measured up to ``max_triple_steps`` steps
(default 20 on a CPU, 30 on a GPU); beyond that order 2 is calibrated with the order-1 ``extrapolate`` objective
(or ``reuse``'s, without that table), and this is logged. ``interpolate`` is not modelled exactly: it uses the
``reuse`` objective. The estimates are formed in ``t`` (``blend_space="t"``, the default).

**Seeds.** Calibration sample ``i`` uses seed ``CALIBRATION_SEED + i`` (1,000,000 + i); ``tiec bench`` and
``tiec generate`` use small seeds (``seed + i`` from 0), so calibration never sees an evaluation sample.

**Store.** One JSON file per model, scheduler, loop length and guidance scale under ``$TIEC_CACHE_DIR/calibration``
(default ``~/.cache/tiec/calibration``), holding the measured tables and weights (not the key steps: any K is
solved from them in milliseconds). The model is identified by a fingerprint of its weights (every parameter's
name, shape and dtype, and up to 4,096 evenly spaced elements of each), the scheduler by its class and config.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import estimators
from ._part import Part
from ._timeline import timestep_value
from ._tree import tile_batch, tree_clone
from .split import EncoderSplit, Features

logger = logging.getLogger("tiec")

CALIBRATION_SEED = 1_000_000
"""Calibration sample ``i`` uses the seed ``CALIBRATION_SEED + i``: far above every evaluation seed."""
DEFAULT_NUM_SAMPLES = 8
EXACT_PAIR_MAX_STEPS = 30
"""The longest loop whose ``extrapolate`` table (C(n, 3) decodes per sample) is measured by default on a CPU."""
EXACT_TRIPLE_MAX_STEPS = {"cpu": 20, "gpu": 30}
"""The longest loop whose second-order table (C(n, 4) decodes per sample) is measured by default."""
FINGERPRINT_ELEMENTS = 4096
FORMAT = 2  # 2: measured weights


# -- the optimiser: pure functions of the error tables --------------------------------------------------

def _interval_costs(reuse: np.ndarray) -> np.ndarray:
    """``C[a, b]``: the summed errors of the steps strictly between key ``a`` and ``b`` (``b`` up to ``n``)."""
    n = reuse.shape[0]
    above = np.where(np.triu(np.ones((n, n), dtype=bool), 1), np.nan_to_num(reuse), 0.0)
    return np.concatenate([np.zeros((n, 1)), np.cumsum(above, axis=1)], axis=1)


def _pair_costs(pairs: np.ndarray) -> np.ndarray:
    """``D[k1, k2, b]``: the summed errors of the steps strictly between ``k2`` and ``b`` after keys ``k1, k2``."""
    n = pairs.shape[0]
    after = np.arange(n)[None, :, None] < np.arange(n)[None, None, :]  # s > k2
    above = np.where(after, np.nan_to_num(pairs), 0.0)
    return np.concatenate([np.zeros((n, n, 1)), np.cumsum(above, axis=2)], axis=2)


def _triple_costs(triples: np.ndarray) -> np.ndarray:
    """``T[k1, k2, k3, b]``: the summed errors of the steps strictly between ``k3`` and ``b`` after keys
    ``k1 < k2 < k3``."""
    n = triples.shape[0]
    after = np.arange(n)[None, None, :, None] < np.arange(n)[None, None, None, :]  # s > k3
    above = np.where(after, np.nan_to_num(triples), 0.0)
    return np.concatenate([np.zeros((n, n, n, 1)), np.cumsum(above, axis=3)], axis=3)


def optimal_key_steps(num_keys: int, reuse: np.ndarray, pairs: np.ndarray | None = None,
                      triples: np.ndarray | None = None) -> tuple[tuple[int, ...], float]:
    """The key set of ``num_keys`` steps (step 0 included) with the least summed error, and that error.

    Args:
        num_keys: K, 1 <= K <= n.
        reuse: (n, n) array, ``reuse[k, s]`` the error of step ``s > k`` decoded from key ``k``'s features.
        pairs: optional (n, n, n) array, ``pairs[k1, k2, s]`` the error of step ``s > k2`` when ``k1 < k2`` are
            the last two keys (``extrapolate``); steps after key 0 alone take ``reuse[0, s]``.
        triples: optional (n, n, n, n) array (with ``pairs``), ``triples[k1, k2, k3, s]`` the error of step
            ``s > k3`` when ``k1 < k2 < k3`` are the last three keys (second order); two keys take ``pairs``.

    Exact dynamic programming, O(K n^2) (``reuse``), O(K n^3) (``pairs``) or O(K n^4) (``triples``); ties go to the
    earlier key.

    Example:
        >>> reuse = np.triu(np.ones((4, 4)), 1)   # every non-key step costs 1
        >>> optimal_key_steps(2, reuse)
        ((0, 1), 2.0)
    """
    n = reuse.shape[0]
    if not 1 <= num_keys <= n:
        raise ValueError(f"num_keys={num_keys} must be between 1 and the loop's {n} steps")
    costs = _interval_costs(reuse)
    if num_keys == 1:
        return (0,), float(costs[0, n])
    if triples is not None and pairs is None:
        raise ValueError("optimal_key_steps: the triples table needs the pairs table (the stretch after two keys)")
    if triples is not None and num_keys >= 3:
        return _optimal_with_triples(num_keys, costs, _pair_costs(pairs), triples)
    if pairs is None:
        best = np.full(n, np.inf)
        best[0] = 0.0
        choices = []
        upper = np.triu(np.ones((n, n), dtype=bool), 1)  # a < b
        for _ in range(num_keys - 1):
            candidates = np.where(upper, best[:, None] + costs[:, :n], np.inf)
            choices.append(candidates.argmin(axis=0))
            best = candidates.min(axis=0)
        total = best + costs[:, n]
        last = int(total.argmin())
        keys = [last]
        for choice in reversed(choices[1:]):
            keys.append(int(choice[keys[-1]]))
        return (0, *reversed(keys)), float(total[last])
    steps = np.arange(n)
    ordered = steps[:, None] < steps[None, :]  # k1 < k2
    pair_costs = _pair_costs(pairs)
    # state[k1, k2]: least error of the steps before k2 with k1 < k2 the last two keys
    state = np.full((n, n), np.inf)
    state[0, 1:] = costs[0, 1:n]
    choices = []
    triple = ordered[:, :, None] & ordered[None, :, :]  # k1 < k2 < k3
    for _ in range(num_keys - 2):
        candidates = np.where(triple, state[:, :, None] + pair_costs[:, :, :n], np.inf)
        choices.append(candidates.argmin(axis=0))  # best k1 for each (k2, k3)
        state = candidates.min(axis=0)
    total = np.where(ordered, state + pair_costs[:, :, n], np.inf)
    k1, k2 = (int(i) for i in np.unravel_index(total.argmin(), total.shape))
    keys = [k2, k1]
    for choice in reversed(choices):
        keys.append(int(choice[keys[-1], keys[-2]]))
    return tuple(reversed(keys)), float(total[k1, k2])


def _optimal_with_triples(num_keys: int, costs: np.ndarray, pair_costs: np.ndarray,
                          triples: np.ndarray) -> tuple[tuple[int, ...], float]:
    """``optimal_key_steps`` with the last three keys as the state (``num_keys`` >= 3)."""
    n = triples.shape[0]
    steps = np.arange(n)
    k1, k2, k3 = np.meshgrid(steps, steps, steps, indexing="ij")
    triple_costs = _triple_costs(triples)
    # state[k1, k2, k3]: least error of the steps before k3 with 0 = k1 < k2 < k3 the first three keys
    state = np.where((k1 == 0) & (k1 < k2) & (k2 < k3), costs[0][k2] + pair_costs[0][k2, k3], np.inf)
    later = steps[None, None, :, None] < steps[None, None, None, :]  # k3 < b
    choices = []
    for _ in range(num_keys - 3):
        candidates = np.where(later, state[..., None] + triple_costs[..., :n], np.inf)
        choices.append(candidates.argmin(axis=0))  # best k1 for each (k2, k3, b)
        state = candidates.min(axis=0)
    total = state + triple_costs[..., n]
    last = tuple(int(i) for i in np.unravel_index(total.argmin(), total.shape))
    keys = list(reversed(last))  # newest first
    for choice in reversed(choices):
        keys.append(int(choice[keys[-1], keys[-2], keys[-3]]))
    return tuple(reversed(keys)), float(total[last])


def schedule_cost(keys: Sequence[int], reuse: np.ndarray, pairs: np.ndarray | None = None,
                  triples: np.ndarray | None = None) -> float:
    """The objective of one key set, summed step by step (the definition the optimiser must agree with).

    Example:
        >>> schedule_cost((0, 2), np.triu(np.ones((4, 4)), 1))
        2.0
    """
    keys = sorted(keys)
    total = 0.0
    for s in range(reuse.shape[0]):
        if s in keys:
            continue
        before = [k for k in keys if k < s]
        if pairs is None or len(before) < 2:
            total += float(reuse[before[-1], s])
        elif triples is None or len(before) < 3:
            total += float(pairs[before[-2], before[-1], s])
        else:
            total += float(triples[before[-3], before[-2], before[-1], s])
    return total


# -- identity of a calibration, and its store -------------------------------------------------------------

def weights_fingerprint(unet: torch.nn.Module) -> str:
    """A digest of a model's weights: every parameter's name, shape and dtype, and up to 4,096 evenly spaced
    elements of each (one device transfer; milliseconds for Stable Diffusion's UNet).

    Example:
        >>> weights_fingerprint(pipe.unet)   # doctest: +SKIP
        '3f1c0a...'
    """
    digest = hashlib.sha256()
    samples = []
    with torch.no_grad():
        for name, param in unet.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
            flat = param.detach().reshape(-1)
            samples.append(flat[::max(1, flat.numel() // FINGERPRINT_ELEMENTS)][:FINGERPRINT_ELEMENTS].float())
        if samples:
            digest.update(torch.cat([s.to(samples[0].device) for s in samples]).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def scheduler_identity(scheduler: Any) -> dict[str, Any]:
    """The scheduler's class and config (without diffusers' private ``_`` entries)."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str))}


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where calibrations are stored: ``cache_dir``, else ``$TIEC_CACHE_DIR/calibration``, else
    ``~/.cache/tiec/calibration``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("TIEC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "tiec") / "calibration"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def calibration_key(unet: torch.nn.Module, scheduler: Any, num_steps: int, guidance_scale: float | None) -> dict:
    """What a calibration depends on: the weights, the scheduler, the loop's length and the guidance scale."""
    return {"format": FORMAT, "model": weights_fingerprint(unet), "scheduler": scheduler_identity(scheduler),
            "num_steps": int(num_steps), "guidance_scale": None if guidance_scale is None else float(guidance_scale)}


@dataclass
class Calibration:
    """The measured error tables of one model, scheduler, loop length and guidance scale.

    ``reuse_mse[k, s]``, ``pairs_mse[k1, k2, s]`` and ``triples_mse[k1, k2, k3, s]`` (second order) are the
    unweighted mean squared errors of the guided prediction (NaN where undefined), ``weights[s]`` the measured
    ``G(s)`` (module docstring); the objective weighs each step's error by its weight.
    """

    key: dict
    timesteps: list[float]
    weights: np.ndarray
    reuse_mse: np.ndarray
    pairs_mse: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    triples_mse: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def tables(self, estimator: str, order: int = 1) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The weighted tables ``(reuse, pairs, triples)`` the objective of ``estimator`` (with
        ``extrapolation_order=order``) uses; ``pairs`` None: the reuse objective, ``triples`` None: order 1."""
        objective = self.objective(estimator, order)
        reuse = self.reuse_mse * self.weights[None, :]
        pairs = self.pairs_mse * self.weights[None, None, :] if objective != "reuse" else None
        triples = self.triples_mse * self.weights[None, None, None, :] if objective == "extrapolate2" else None
        return reuse, pairs, triples

    def objective(self, estimator: str, order: int = 1) -> str:
        """The objective ``estimator`` (with ``extrapolation_order=order``) is calibrated for with these tables:
        ``"reuse"``, ``"extrapolate"`` (order 1) or ``"extrapolate2"`` (order 2)."""
        if estimator != "extrapolate" or self.pairs_mse is None:
            return "reuse"
        return "extrapolate2" if order == 2 and self.triples_mse is not None else "extrapolate"

    def solve(self, num_keys: int, estimator: str = "reuse", order: int = 1) -> tuple[int, ...]:
        """The optimal ``num_keys`` key steps for the objective of ``estimator`` (``extrapolation_order=order``)."""
        wanted = "reuse" if estimator != "extrapolate" else "extrapolate2" if order == 2 else "extrapolate"
        found = self.objective(estimator, order)
        if found != wanted:
            logger.info("tiec: key_steps for estimator=%r, extrapolation_order=%d calibrated with the %s objective "
                        "(%s)", estimator, order, found, "not modelled exactly" if wanted == "reuse" else
                        f"no {wanted} table for {self.num_steps} steps")
        return optimal_key_steps(num_keys, *self.tables(estimator, order))[0]

    def cost(self, keys: Sequence[int], estimator: str = "reuse", order: int = 1) -> float:
        """The objective of any key set (to compare ``auto:K`` with ``uniform:K`` or ``faster-diffusion``)."""
        return schedule_cost(keys, *self.tables(estimator, order))

    def to_json(self) -> dict:
        n = self.num_steps
        data = {"key": self.key, "timesteps": self.timesteps, "weights": self.weights.tolist(),
                "reuse_mse": [[None if k >= s else float(self.reuse_mse[k, s]) for s in range(n)] for k in range(n)],
                "meta": self.meta}
        if self.pairs_mse is not None:  # k1 < k2 < s in lexicographic order
            data["extrapolate_mse"] = [float(self.pairs_mse[t]) for t in itertools.combinations(range(n), 3)]
        if self.triples_mse is not None:  # k1 < k2 < k3 < s in lexicographic order
            data["extrapolate2_mse"] = [float(self.triples_mse[t]) for t in itertools.combinations(range(n), 4)]
        return data

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "Calibration":
        n = len(data["timesteps"])
        reuse = np.array([[np.nan if v is None else v for v in row] for row in data["reuse_mse"]], dtype=np.float64)
        pairs, triples = (_from_combinations(n, 3, data.get("extrapolate_mse")),
                          _from_combinations(n, 4, data.get("extrapolate2_mse")))
        return cls(data["key"], list(data["timesteps"]), np.asarray(data["weights"], dtype=np.float64), reuse, pairs,
                   data.get("meta", {}), path, triples)


def _from_combinations(n: int, r: int, values: list[float] | None) -> np.ndarray | None:
    """The (n,) * r array with ``values`` at the increasing index tuples in lexicographic order, NaN elsewhere."""
    if values is None:
        return None
    table = np.full((n,) * r, np.nan)
    for t, value in zip(itertools.combinations(range(n), r), values, strict=True):
        table[t] = value
    return table


def load(key: dict, cache_dir: str | os.PathLike | None = None) -> Calibration | None:
    """The stored calibration of ``key``, or None (a missing or unreadable file)."""
    path = cache_folder(cache_dir) / f"calibration-{_digest(key)}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        return Calibration.from_json(data, path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(calibration: Calibration, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write ``calibration`` (atomically) and return its path."""
    from .eval.results import atomic_write

    folder = cache_folder(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"calibration-{_digest(calibration.key)}.json"
    text = json.dumps(calibration.to_json(), default=str).encode()
    atomic_write(path, lambda f: f.write(text))
    calibration.path = path
    return path


def stored_for_unet(unet: torch.nn.Module, num_steps: int,
                    cache_dir: str | os.PathLike | None = None) -> list[Calibration]:
    """Every stored calibration of these weights at ``num_steps`` steps, whatever the scheduler (bare UNets)."""
    folder = cache_folder(cache_dir)
    fingerprint, found = weights_fingerprint(unet), []
    for path in sorted(folder.glob("calibration-*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            key = data["key"]
            if key["format"] == FORMAT and key["model"] == fingerprint and key["num_steps"] == num_steps:
                found.append(Calibration.from_json(data, path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


# -- measuring the tables ----------------------------------------------------------------------------------

@dataclass
class _Step:
    call: dict            # the UNet call's arguments (copies), return_dict=False
    timestep: float
    features: Features
    output: torch.Tensor  # the first min(in, out) channels of the UNet's output, float32
    raw: torch.Tensor     # the whole output, as the UNet returned it (for replays)


class _Recorder(Part):
    """Records every UNet call of a plain run (inputs, encoder features, output), decodes from given features, and
    replays a run with given outputs at chosen calls.

    Where encoder propagation is applied to the UNet, its own encoder split is used: its patches then pass
    through (as they do for its own key steps), so calibration never enters tiec's step logic.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__(None, unet, None)
        self.steps: list[_Step] = []
        self.guidance: tuple[float | None, float] | None = None
        self.pipe_view: Any = None
        self.replay: dict[int, torch.Tensor] | None = None  # call index -> the output to return instead
        self.calls = 0

    def install(self) -> None:
        from .api import applied_parts
        from .families import known_class
        from .propagation import EncoderPropagation

        if known_class(self.unet) != "UNet2DConditionModel":
            raise TypeError(f"calibration (key_steps='auto:K') supports UNet2DConditionModel pipelines only, not "
                            f"{type(self.unet).__name__}; use 'adaptive:T' or a list of key steps")

        others = [type(p).__name__ for p in applied_parts(self.unet) if not isinstance(p, EncoderPropagation)]
        if others:
            raise ValueError(f"calibration measures the plain UNet, but {', '.join(others)} is applied to it; "
                             f"calibrate first (tiec.schedules.calibrate or `tiec calibrate`), then apply")
        propagation = next((p for p in applied_parts(self.unet) if isinstance(p, EncoderPropagation)), None)
        super().install()
        self._signature = inspect.signature(self.unet.forward)
        self.split = propagation.split if propagation is not None else EncoderSplit(self, self.unet)
        self.patch(self.unet, "forward", self._forward)

    def _forward(self, inner, *args, **kwargs):
        if self.split.mode is not None:
            return inner(*args, **kwargs)
        from .propagation import _guidance_scale

        if self.guidance is None and self.pipe_view is not None:
            self.guidance = (_guidance_scale(self.pipe_view), float(getattr(self.pipe_view, "guidance_rescale", 0.0)
                                                                     or 0.0))
        call = dict(self._signature.bind(*args, **kwargs).arguments)
        if self.replay is not None:
            index, self.calls = self.calls, self.calls + 1
            if index in self.replay:
                return _wrap(self.replay[index].clone(), call.get("return_dict", True))
            return self.split.capture(lambda: inner(**call))[0]  # capture: tiec's own patches pass through
        out, features = self.split.capture(lambda: inner(**call))
        sample = out[0] if isinstance(out, tuple) else out.sample
        channels = min(call["sample"].shape[1], sample.shape[1])
        self.steps.append(_Step(dict(tree_clone(call), return_dict=False), timestep_value(call["timestep"]),
                                features, sample[:, :channels].float().clone(), sample.clone()))
        return out

    def guided(self, output: torch.Tensor) -> torch.Tensor:
        """The prediction the sampler consumes (the guided one where the pipeline guides a two-way batch)."""
        from .propagation import _rescale_guidance

        scale, rescale = self.guidance or (None, 0.0)
        if scale is None or output.shape[0] % 2:
            return output
        uncond, cond = output.chunk(2)
        guided = uncond + scale * (cond - uncond)
        return _rescale_guidance(guided, cond, rescale) if rescale > 0 else guided

    def decode_errors(self, step: _Step, candidates: Sequence[Features], decode_batch: int,
                      keep: int | None = None) -> tuple[list[float], torch.Tensor | None]:
        """The mean squared error of the guided prediction decoded from each candidate against the full one, and
        the whole output decoded from candidate ``keep``."""
        batch = step.call["sample"].shape[0]
        per_call = max(1, decode_batch // batch)
        target = self.guided(step.output).double()
        errors, kept = [], None
        for i in range(0, len(candidates), per_call):
            chunk = candidates[i:i + per_call]
            times = len(chunk)
            features = tuple(torch.cat([c[j] for c in chunk]) for j in range(len(chunk[0])))
            call = {k: (v if k == "sample" else tile_batch(v, batch, times)) for k, v in step.call.items()}
            sample = step.call["sample"]
            call["sample"] = sample[:1].expand(times * batch, *sample.shape[1:])  # the decoder reads its shape only
            out = self.split.decode(lambda: self.unet(**call), features)[0]
            if keep is not None and i <= keep < i + times:
                kept = out.chunk(times)[keep - i].clone()
            for part in out[:, :step.output.shape[1]].float().chunk(times):
                errors.append(float((self.guided(part).double() - target).pow(2).mean()))
        return errors, kept


def _plain_view(pipe: Any) -> Any:
    """A second pipeline object sharing ``pipe``'s modules, with its own fresh scheduler and attributes and no tiec
    call observers: a run of it leaves ``pipe`` (mid-call, when ``auto:K`` is resolved) exactly as it was."""
    import copy

    view = copy.copy(pipe)
    cls = type(pipe)
    while "__tiec_observers__" in cls.__dict__:
        cls = cls.__tiec_base__
    view.__class__ = cls
    object.__setattr__(view, "scheduler", type(pipe.scheduler).from_config(pipe.scheduler.config))
    if hasattr(view, "set_progress_bar_config"):
        view.set_progress_bar_config(disable=True)
    return view


def _is_demo(pipe: Any) -> bool:
    from .demo.model import FashionPipeline

    return isinstance(pipe, FashionPipeline)


def default_guidance(pipe: Any) -> float | None:
    """The guidance scale a plain ``pipe(...)`` call uses (its ``__call__``'s default), or None."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else float(parameter.default)


def calibration_prompts(pipe: Any, prompts: Sequence[str] | None, num_samples: int,
                        pipeline_kwargs: dict | None = None) -> list[str] | None:
    """The prompt of each calibration sample: ``prompts`` (spread evenly when there are more than samples, cycled
    when fewer), the demo's class names by default; None where ``pipeline_kwargs`` carries the conditioning."""
    if prompts is None:
        if _is_demo(pipe):
            from .eval.prompts import demo_prompts

            prompts = demo_prompts()
        elif pipeline_kwargs and "prompt_embeds" in pipeline_kwargs:
            return None
        else:
            raise ValueError(f"calibrating {type(pipe).__name__} needs prompts=[...] (only the demo model has "
                             f"built-in calibration prompts), or pipeline_kwargs with prompt_embeds")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts={prompts!r} must be a non-empty list of strings")
    if num_samples <= len(prompts):
        return [prompts[i * len(prompts) // num_samples] for i in range(num_samples)]
    return [prompts[i % len(prompts)] for i in range(num_samples)]


def measure(pipe: Any, num_steps: int, estimator: str = "reuse", prompts: Sequence[str] | None = None,
            num_samples: int = DEFAULT_NUM_SAMPLES, *, guidance_scale: float | None = None,
            pipeline_kwargs: dict | None = None, batch_size: int = 4, decode_batch: int = 64,
            max_pair_steps: int | None = None, progress: bool = True, extrapolation_order: int = 1,
            max_triple_steps: int | None = None) -> Calibration:
    """Run the plain sampler on the calibration samples and measure the error tables and weights (no store).

    ``batch_size`` samples run per pipeline call (the encoder features of every step of one call are held in
    memory); ``decode_batch`` bounds the batch of one decoder evaluation.
    """
    from tqdm.auto import tqdm

    pipeline_kwargs = dict(pipeline_kwargs or {})
    sample_prompts = calibration_prompts(pipe, prompts, num_samples, pipeline_kwargs)
    if guidance_scale is None:
        guidance_scale = default_guidance(pipe)
    view = _plain_view(pipe)
    extra: dict[str, Any] = {"output_type": "latent" if hasattr(pipe, "vae") else "pt"}
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale

    def sample(indices: list[int]) -> torch.Tensor:
        """The final samples (the pipeline's output: latents, or the demo's images) of one plain run."""
        generators = [torch.Generator("cpu").manual_seed(CALIBRATION_SEED + i) for i in indices]
        kwargs = {**extra, **pipeline_kwargs, "num_inference_steps": num_steps, "generator": generators}
        with torch.no_grad():
            if sample_prompts is not None:
                result = view([sample_prompts[i] for i in indices], **kwargs)
            else:
                result = view(num_images_per_prompt=len(indices), **kwargs)
        images = result.images if hasattr(result, "images") else result[0]
        return torch.as_tensor(images).double()

    recorder = _Recorder(pipe.unet)
    recorder.pipe_view = view
    sums: dict[str, Any] = {}
    timesteps: list[float] | None = None
    bar = None
    try:
        recorder.install()
        for start in range(0, num_samples, batch_size):
            indices = list(range(start, min(start + batch_size, num_samples)))
            recorder.steps, recorder.replay = [], None
            final = sample(indices)
            steps = recorder.steps
            n = len(steps)
            if timesteps is None:
                if n < 1:
                    raise RuntimeError("the pipeline never called its UNet")
                timesteps = [s.timestep for s in steps]
                with_pairs, with_triples = _wanted_tables(estimator, extrapolation_order, n, pipe.unet,
                                                          max_pair_steps, max_triple_steps)
                if with_triples and len(set(timesteps)) < n:
                    with_triples = False
                    logger.info("tiec: calibrating order 2 with the order-1 objective: this loop repeats timesteps "
                                "(%s), where the last three key steps do not determine the forecast",
                                type(pipe.scheduler).__name__)
                if estimator == "extrapolate" and not with_pairs:
                    logger.info("tiec: calibrating with the reuse objective: the extrapolate table of %d steps "
                                "(C(n, 3) decodes) is measured up to max_pair_steps=%s", n,
                                _pair_limit(pipe.unet, max_pair_steps))
                elif estimator == "extrapolate" and extrapolation_order == 2 and not with_triples:
                    logger.info("tiec: calibrating order 2 with the order-1 objective: the second-order table of %d "
                                "steps (C(n, 4) decodes) is measured up to max_triple_steps=%s", n,
                                _triple_limit(pipe.unet, max_triple_steps))
                sums = {"reuse": np.zeros((n, n)), "pairs": np.zeros((n, n, n)) if with_pairs else None,
                        "triples": np.zeros((n,) * 4) if with_triples else None, "final": np.zeros(n)}
                batches = -(-num_samples // batch_size)
                total = batches * (n * (n - 1) // 2 + (math.comb(n, 3) if with_pairs else 0)
                                   + (math.comb(n, 4) if with_triples else 0) + (n - 1) * (n - 2) // 2)
                bar = tqdm(total=total, desc="tiec calibrate", unit="eval", disable=not progress, leave=False)
            elif [s.timestep for s in steps] != timesteps:
                raise RuntimeError("the calibration runs iterated different timesteps")
            with torch.no_grad():
                one_step = _accumulate(recorder, steps, sums, len(indices), decode_batch, bar)
            # G(s): replay the run with step s's prediction replaced by its one-step reuse estimate
            for s in range(1, n):
                recorder.replay = {i: steps[i].raw for i in range(s)}
                recorder.replay[s], recorder.calls = one_step[s], 0
                sums["final"][s] += len(indices) * float((sample(indices) - final).pow(2).mean())
                if bar is not None:
                    bar.update(n - 1 - s)
            recorder.replay = None
    finally:
        if bar is not None:
            bar.close()
        recorder.steps, recorder.replay = [], None
        recorder.detach()
    n = len(timesteps)
    reuse_mse = sums["reuse"] / num_samples
    reuse_mse[np.tril_indices(n)] = np.nan
    pairs_mse, triples_mse = None, None
    if sums["pairs"] is not None:
        pairs_mse = sums["pairs"] / num_samples
        k1, k2, s = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
        pairs_mse[~((k1 < k2) & (k2 < s))] = np.nan
    if sums["triples"] is not None:
        triples_mse = sums["triples"] / num_samples
        k1, k2, k3, s = np.meshgrid(*[np.arange(n)] * 4, indexing="ij")
        triples_mse[~((k1 < k2) & (k2 < k3) & (k3 < s))] = np.nan
    one_step_mse = np.array([0.0] + [reuse_mse[s - 1, s] for s in range(1, n)])
    weights = np.divide(sums["final"] / num_samples, one_step_mse, out=np.zeros(n), where=one_step_mse > 0)
    scale = recorder.guidance[0] if recorder.guidance else None
    key = calibration_key(pipe.unet, pipe.scheduler, n, scale)
    meta = {"prompts": sample_prompts, "num_samples": num_samples,
            "seeds": [CALIBRATION_SEED, CALIBRATION_SEED + num_samples - 1], "num_inference_steps": num_steps,
            "inputs": _inputs_digest(sample_prompts, num_samples, pipeline_kwargs, guidance_scale),
            "guidance_rescale": recorder.guidance[1] if recorder.guidance else 0.0,
            "max_pair_steps": _pair_limit(pipe.unet, max_pair_steps),
            "max_triple_steps": _triple_limit(pipe.unet, max_triple_steps),
            "final_mse": (sums["final"] / num_samples).tolist()}
    return Calibration(key, timesteps, weights, reuse_mse, pairs_mse, meta, triples_mse=triples_mse)


def _accumulate(recorder: _Recorder, steps: list[_Step], sums: dict[str, Any], count: int, decode_batch: int,
                bar: Any) -> dict[int, torch.Tensor]:
    """Add ``count`` times this batch's errors of every (key, step), (key, key, step) and (key, key, key, step) to
    ``sums["reuse"]``, ``sums["pairs"]`` and ``sums["triples"]`` (the last two where not None); returns the whole
    output of each step ``s`` decoded from ``F(s - 1)`` (its one-step reuse estimate)."""
    times = [s.timestep for s in steps]
    features = [s.features for s in steps]
    one_step = {}
    for s in range(1, len(steps)):
        errors, one_step[s] = recorder.decode_errors(steps[s], features[:s], decode_batch, keep=s - 1)
        sums["reuse"][:s, s] += count * np.asarray(errors)
        if bar is not None:
            bar.update(s)
        for table, r in ((sums["pairs"], 2), (sums["triples"], 3)):
            if table is None or s < r:
                continue
            keys = list(itertools.combinations(range(s), r))
            per_call = max(1, decode_batch // steps[s].call["sample"].shape[0])
            for i in range(0, len(keys), per_call):  # estimates made per decoder call: few feature sets in memory
                chunk = keys[i:i + per_call]
                candidates = [_forecast(features, times, last, s) for last in chunk]
                for last, error in zip(chunk, recorder.decode_errors(steps[s], candidates, decode_batch)[0]):
                    table[(*last, s)] += count * error
                if bar is not None:
                    bar.update(len(chunk))
    return one_step


def _forecast(features: list[Features], times: list[float], keys: tuple[int, ...], s: int) -> Features:
    """Step ``s``'s features estimated from the last keys ``keys`` as ``EncoderPropagation`` forms them: the line
    through two, the quadratic through three (in ``t``). Where timesteps repeat (Heun, KDPM2) the older of two keys
    at one timestep is dropped; the run then uses a key before ``keys`` instead, which the tables cannot hold: the
    pairs table approximates there, and no triples table is measured (``measure``)."""
    keys = tuple(k for i, k in enumerate(keys) if all(times[k] != times[j] for j in keys[i + 1:]))
    if len(keys) == 3:
        return estimators.extrapolate_quadratic(*(features[k] for k in keys), *(times[k] for k in keys), times[s])
    if len(keys) == 2:
        return estimators.extrapolate(features[keys[0]], features[keys[1]], times[keys[0]], times[keys[1]], times[s])
    return estimators.reuse(features[keys[-1]])


def _pair_limit(unet: torch.nn.Module, max_pair_steps: int | None = None) -> int | None:
    """``max_pair_steps``, or by default 30 where the UNet is on a CPU and no bound (None) on a GPU."""
    if max_pair_steps is not None:
        return max_pair_steps
    return None if _on_gpu(unet) else EXACT_PAIR_MAX_STEPS


def _triple_limit(unet: torch.nn.Module, max_triple_steps: int | None = None) -> int:
    """``max_triple_steps``, or by default 20 where the UNet is on a CPU and 30 on a GPU."""
    if max_triple_steps is not None:
        return max_triple_steps
    return EXACT_TRIPLE_MAX_STEPS["gpu" if _on_gpu(unet) else "cpu"]


def _on_gpu(unet: torch.nn.Module) -> bool:
    """Whether the UNet's weights are on a CUDA device (the default table limits depend on it)."""
    return next((p.device for p in unet.parameters()), torch.device("cpu")).type == "cuda"


def _wanted_tables(estimator: str, order: int, num_steps: int, unet: torch.nn.Module,
                   max_pair_steps: int | None = None, max_triple_steps: int | None = None) -> tuple[bool, bool]:
    """Whether calibrating ``estimator`` (``extrapolation_order=order``) at ``num_steps`` steps measures the pairs
    table and the triples table (the triples need the pairs: the stretch after the first two keys)."""
    limit = _pair_limit(unet, max_pair_steps)
    triples = (estimator == "extrapolate" and order == 2 and num_steps >= 4
               and num_steps <= _triple_limit(unet, max_triple_steps))
    pairs = triples or (estimator == "extrapolate" and num_steps >= 3 and (limit is None or num_steps <= limit))
    return pairs, triples


def _complete(found: Calibration | None, wanted: tuple[bool, bool]) -> bool:
    """Whether ``found`` holds every table ``wanted`` (``_wanted_tables``) asks for."""
    repeats = found is not None and len(set(found.timesteps)) < found.num_steps  # no triples table (measure)
    return found is not None and (found.pairs_mse is not None or not wanted[0]) and \
        (found.triples_mse is not None or not wanted[1] or repeats)


def _inputs_digest(prompts: Any, num_samples: int, pipeline_kwargs: dict, guidance_scale: float | None) -> str:
    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return hashlib.sha256(value.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        return str(value)
    return _digest({"prompts": prompts, "num_samples": num_samples, "guidance_scale": guidance_scale,
                    "kwargs": {k: encode(v) for k, v in sorted(pipeline_kwargs.items())}})


# -- public entries ------------------------------------------------------------------------------------------

def calibration_for(pipe: Any, num_steps: int, estimator: str = "reuse", prompts: Sequence[str] | None = None,
                    num_samples: int = DEFAULT_NUM_SAMPLES, *, guidance_scale: float | None = None,
                    pipeline_kwargs: dict | None = None, cache_dir: str | os.PathLike | None = None,
                    recompute: bool = False, max_pair_steps: int | None = None,
                    batch_size: int = 4, decode_batch: int = 64, progress: bool = True,
                    extrapolation_order: int = 1, max_triple_steps: int | None = None) -> Calibration:
    """The stored calibration made with these very inputs, else a new one, measured and stored.

    ``extrapolation_order=2`` (with ``estimator="extrapolate"``) also measures the second-order table, up to
    ``max_triple_steps`` steps (module docstring).

    Example:
        >>> calibration = calibration_for(pipe, 8, num_samples=2, progress=False)   # small, for the example
        >>> keys = calibration.solve(4)
        >>> keys[0], len(keys), calibration.cost(keys) <= calibration.cost((0, 2, 4, 6))
        (0, 4, True)
    """
    _check_counts(num_steps=num_steps, num_samples=num_samples, batch_size=batch_size, decode_batch=decode_batch)
    if estimator not in estimators.ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not known; use one of {list(estimators.ESTIMATORS)}")
    _check_order(extrapolation_order)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"calibration needs a pipeline with .unet and .scheduler, got {type(pipe).__name__}")
    if guidance_scale is None:
        guidance_scale = default_guidance(pipe)
    if not recompute:
        guided = guidance_scale if guidance_scale is not None and guidance_scale > 1 else None
        found = load(calibration_key(pipe.unet, pipe.scheduler, num_steps, guided), cache_dir)
        inputs = _inputs_digest(calibration_prompts(pipe, prompts, num_samples, pipeline_kwargs), num_samples,
                                dict(pipeline_kwargs or {}), guidance_scale)
        wanted = _wanted_tables(estimator, extrapolation_order, num_steps, pipe.unet, max_pair_steps,
                                max_triple_steps)
        if _complete(found, wanted) and found.meta.get("inputs") == inputs:
            return found
    calibration = measure(pipe, num_steps, estimator, prompts, num_samples, guidance_scale=guidance_scale,
                          pipeline_kwargs=pipeline_kwargs, batch_size=batch_size, decode_batch=decode_batch,
                          max_pair_steps=max_pair_steps, progress=progress, extrapolation_order=extrapolation_order,
                          max_triple_steps=max_triple_steps)
    store(calibration, cache_dir)
    return calibration


def calibrate(pipe: Any, num_steps: int, num_keys: int, estimator: str = "reuse",
              prompts: Sequence[str] | None = None, num_samples: int = DEFAULT_NUM_SAMPLES,
              **options: Any) -> list[int]:
    """The ``num_keys`` key steps of a ``num_steps`` loop that minimise the calibration objective (module docstring).

    Measured once on the plain sampler (seeds ``CALIBRATION_SEED + i``), stored, and reused by ``key_steps="auto:K"``.
    ``options``: ``guidance_scale``, ``pipeline_kwargs`` (extra arguments of every calibration call, e.g.
    ``prompt_embeds`` or ``height``), ``cache_dir``, ``recompute``, ``max_pair_steps``, ``batch_size``,
    ``decode_batch``, ``progress``, ``extrapolation_order`` (2: the second-order objective), ``max_triple_steps``
    (see ``calibration_for``).

    Example:
        >>> keys = calibrate(pipe, 8, 4, num_samples=2, progress=False)   # small, for the example
        >>> len(keys), keys[0], keys == sorted(set(keys))
        (4, 0, True)
    """
    if not isinstance(num_keys, int) or isinstance(num_keys, bool) or not 1 <= num_keys <= num_steps:
        raise ValueError(f"num_keys={num_keys!r} must be an integer between 1 and num_steps={num_steps}")
    calibration = calibration_for(pipe, num_steps, estimator, prompts, num_samples, **options)
    if num_keys > calibration.num_steps:
        raise ValueError(f"num_keys={num_keys} exceeds the loop's {calibration.num_steps} steps")
    return list(calibration.solve(num_keys, estimator, options.get("extrapolation_order", 1)))


def _check_order(order: Any) -> None:
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"extrapolation_order={order!r} must be 1 (linear) or 2 (quadratic)")


def _check_counts(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def resolve_auto(num_keys: int, num_steps: int, pipe: Any = None, unet: torch.nn.Module | None = None,
                 estimator: str = "reuse", cache_dir: str | os.PathLike | None = None,
                 extrapolation_order: int = 1) -> tuple[int, ...]:
    """The key steps of ``key_steps="auto:K"``: from the stored calibration of this model, scheduler, loop length
    and guidance scale, for the objective of ``estimator`` and ``extrapolation_order``; measured now (with a
    progress bar) and stored for the demo model when none exists (or lacks the table that objective needs).

    A bare UNet (no scheduler) uses the one stored calibration of its weights at this loop length.
    """
    spec = f"key_steps='auto:{num_keys}'"
    if pipe is None:
        if unet is None:
            raise ValueError(f"{spec} needs the pipeline (its model and scheduler pick the calibration); apply tiec "
                             f"to the pipeline, or pass key steps found by tiec.schedules.calibrate(pipe, ...)")
        found = stored_for_unet(unet, num_steps, cache_dir)
        if not found:
            raise ValueError(f"{spec}: no stored calibration for this UNet at {num_steps} steps, and a bare UNet has "
                             f"no scheduler to make one; run tiec.schedules.calibrate(pipe, {num_steps}, {num_keys}) "
                             f"(or `tiec calibrate`) with its pipeline once, or apply tiec to the pipeline")
        if len(found) > 1:
            raise ValueError(f"{spec}: {len(found)} stored calibrations of this UNet at {num_steps} steps (other "
                             f"schedulers or guidance scales: {[c.path.name for c in found]}); a bare UNet cannot "
                             f"tell which applies: pass tiec.schedules.calibrate(pipe, ...)'s key steps instead")
        return found[0].solve(num_keys, estimator, extrapolation_order)
    from .propagation import _guidance_scale

    guidance = _guidance_scale(pipe)
    found = load(calibration_key(pipe.unet, pipe.scheduler, num_steps, guidance), cache_dir)
    wanted = _wanted_tables(estimator, extrapolation_order, num_steps, pipe.unet)
    if found is not None and (_complete(found, wanted) or not _is_demo(pipe)):
        return _check_loop(found, pipe.scheduler, spec).solve(num_keys, estimator, extrapolation_order)
    if not _is_demo(pipe):
        raise ValueError(f"{spec}: no stored calibration for this model, {type(pipe.scheduler).__name__} and "
                         f"{num_steps} steps (guidance {guidance}), and only the demo model has built-in calibration "
                         f"prompts; run tiec.schedules.calibrate(pipe, {num_steps}, {num_keys}, prompts=[...]) or "
                         f"`tiec calibrate --model FOLDER --steps {num_steps} --prompts FILE` once")
    logger.info("tiec: %s: calibrating %s at %d steps (first use; stored for later runs)", spec,
                type(pipe.scheduler).__name__, num_steps)
    calibration = measure(pipe, num_steps, estimator, guidance_scale=guidance if guidance is not None else 1.0,
                          extrapolation_order=extrapolation_order)
    if calibration.num_steps != num_steps:
        raise ValueError(f"{spec}: this pipeline's loop has {num_steps} steps, but a plain call with "
                         f"num_inference_steps={num_steps} runs {calibration.num_steps}; calibrate it with "
                         f"tiec.schedules.calibrate and pass the key steps explicitly")
    store(calibration, cache_dir)
    return _check_loop(calibration, pipe.scheduler, spec).solve(num_keys, estimator, extrapolation_order)


def _check_loop(calibration: Calibration, scheduler: Any, spec: str) -> Calibration:
    """``calibration``, if its timesteps are this loop's (a run of the scheduler's current timesteps); else
    ValueError: img2img's ``strength`` and ``denoising_end`` iterate part of a longer plain loop."""
    current = [float(t) for t in getattr(scheduler, "timesteps", torch.zeros(0)).tolist()]
    stored, n = calibration.timesteps, calibration.num_steps
    if current and not any(all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(current[i:i + n], stored))
                           for i in range(len(current) - n + 1)):
        raise ValueError(f"{spec}: the calibration of a plain {n}-step loop (timesteps {stored[0]:g}..{stored[-1]:g}) "
                         f"does not fit this loop, which runs part of another schedule (img2img's strength, "
                         f"denoising_end); pass key steps explicitly")
    return calibration


def _wrap(sample: torch.Tensor, return_dict: bool) -> Any:
    """A UNet's output structure around ``sample``."""
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    return UNet2DConditionOutput(sample=sample)
