"""Encoder propagation (FasterDiffusion) with the TIEC estimators: config, step cursor and UNet hook.

At a key step the full UNet runs and its encoder features are recorded. At a non-key step the
encoder is skipped and the decoder runs on features estimated from the recorded ones (see
``estimators``). With ``parallel=True`` the decoders of all the non-key steps up to the next key
step run as one batched call, and the pipeline then consumes their outputs one step at a time.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import estimators, schedules
from ._part import Part, loop_timeline, timestep_value
from ._tree import tile_batch, tree_clone
from .split import EncoderSplit, Features


BLEND_SPACES = ("t", "log-snr", "step")


@dataclass(frozen=True)
class EncoderPropagationConfig:
    """Encoder propagation and TIEC feature estimation.

    Args:
        key_steps: steps where the encoder really runs (see ``tiec.schedules``). Fewer key steps: faster,
            further from the full sampler. Default ``"faster-diffusion"`` (9 of 50 steps).
        estimator: what a non-key step decodes from: ``"reuse"`` (the last key step's features,
            FasterDiffusion), ``"extrapolate"`` (line in ``t`` through the last two key steps; free) or
            ``"interpolate"`` (line between the current key step and an encoder pass on a one-step DDIM
            prediction of the next key latent; one extra encoder pass per interval). Default ``"reuse"``.
        parallel: batch the decoders of each key-step group in one call (meant for GPUs; more memory).
            Default True. With a small UNet on a CPU, False (one decoder call per step, the same images)
            was the faster setting (README, Results). A bare UNet (no pipeline) always runs serially.
        max_parallel: at most this many steps per batched decoder call (bounds memory); None: no cap.
        noise_injection: prior noise injection weight ``w``: from the first step with ``t < tau`` on,
            ``w * z_T`` is added to the latent before each step. FasterDiffusion uses 0.003. Default 0 (off).
        noise_injection_tau: the timestep ``tau`` below which noise is injected. Default 500.
        blend_space: the coordinate in which the estimators are linear: ``"t"`` (the timestep, as the
            seed defines them; default), ``"log-snr"`` (log of alpha_bar / (1 - alpha_bar) of the
            scheduler; needs a pipeline) or ``"step"`` (the step index).
        max_extrapolation: bound on the magnitude of the negative weight of ``extrapolate`` (None: no
            bound). Smaller values stay closer to ``reuse`` far from the last key step.

    Example:
        >>> cfg = EncoderPropagationConfig(key_steps="uniform:5", estimator="extrapolate")
    """

    key_steps: schedules.KeyStepSpec = "faster-diffusion"
    estimator: str = "reuse"
    parallel: bool = True
    max_parallel: int | None = None
    noise_injection: float = 0.0
    noise_injection_tau: float = 500
    blend_space: str = "t"
    max_extrapolation: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "key_steps", schedules.validate(self.key_steps))
        if self.estimator not in estimators.ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not known; use one of {list(estimators.ESTIMATORS)}")
        if not isinstance(self.parallel, bool):
            raise ValueError(f"parallel={self.parallel!r} must be True or False")
        if self.max_parallel is not None and (not isinstance(self.max_parallel, int) or isinstance(
                self.max_parallel, bool) or self.max_parallel < 1):
            raise ValueError(f"max_parallel={self.max_parallel!r} must be None or a positive integer")
        if not isinstance(self.noise_injection, (int, float)) or not math.isfinite(self.noise_injection) \
                or self.noise_injection < 0:
            raise ValueError(f"noise_injection={self.noise_injection!r} must be a finite number >= 0")
        if not isinstance(self.noise_injection_tau, (int, float)) or not math.isfinite(self.noise_injection_tau):
            raise ValueError(f"noise_injection_tau={self.noise_injection_tau!r} must be a finite number")
        if self.blend_space not in BLEND_SPACES:
            raise ValueError(f"blend_space={self.blend_space!r} is not known; use one of {list(BLEND_SPACES)}")
        if self.max_extrapolation is not None and (not isinstance(self.max_extrapolation, (int, float))
                                                   or not self.max_extrapolation >= 0):
            raise ValueError(f"max_extrapolation={self.max_extrapolation!r} must be None or a number >= 0")


class _Run:
    """The state of one sampling loop: its timeline, key steps, cursor and cached features."""

    def __init__(self, config: EncoderPropagationConfig, num_steps: int, timesteps: list[float] | None):
        self.num_steps, self.timesteps = num_steps, timesteps
        self.key_steps = schedules.resolve(config.key_steps, num_steps)
        self.key_set = frozenset(self.key_steps)
        self.step = -1
        self.opened_by_controlnet = False
        self.key_coords: dict[int, float] = {}  # key step -> its coordinate in the blend space
        self.features: dict[int, Features] = {}      # the last two key steps
        self.predicted: dict[int, Features] = {}     # look-ahead features of the next key step, by key step
        self.queue: dict[int, tuple[float, torch.Tensor]] = {}
        self.control: Any = None
        self.z_T: torch.Tensor | None = None

    def advance(self, caller: str) -> int:
        """Move the cursor for a UNet or ControlNet call; whichever comes first in a step opens it."""
        if caller == "unet" and self.opened_by_controlnet:
            self.opened_by_controlnet = False
            return self.step
        self.step += 1
        self.opened_by_controlnet = caller == "controlnet"
        return self.step

    def last_key(self, step: int) -> int:
        return max(k for k in self.key_steps if k <= step)

    def next_key(self, step: int) -> int | None:
        return next((k for k in self.key_steps if k > step), None)

    def time(self, step: int) -> float | None:
        return self.timesteps[step] if self.timesteps is not None else None

    def store(self, step: int, coord: float, features: Features) -> None:
        self.key_coords[step] = coord
        self.features[step] = features
        for old in sorted(self.features)[:-2]:
            del self.features[old]
            self.predicted.pop(old, None)


class EncoderPropagation(Part):
    """Encoder propagation applied to one UNet (and its pipeline). Made by ``tiec.apply``."""

    config: EncoderPropagationConfig

    def install(self) -> None:
        if self.pipe is None and self.config.estimator == "interpolate":
            raise ValueError("estimator='interpolate' needs a pipeline (its scheduler predicts the next key "
                             "latent); apply it to the pipeline rather than to the bare UNet")
        if self.pipe is None and self.config.blend_space == "log-snr":
            raise ValueError("blend_space='log-snr' needs a pipeline (its scheduler's alphas_cumprod); "
                             "apply it to the pipeline rather than to the bare UNet")
        super().install()
        self._run: _Run | None = None
        self._pending = False
        self._signature = inspect.signature(self.unet.forward)
        self.split = EncoderSplit(self, self.unet)
        self.patch(self.unet, "forward", self._unet_forward)
        controlnet = getattr(self.pipe, "controlnet", None) if self.pipe is not None else None
        if isinstance(controlnet, torch.nn.Module):
            self.patch(controlnet, "forward", self._controlnet_forward)
        self.stats = self.new_stats()

    def new_stats(self) -> dict[str, int]:
        return {"unet_calls": 0, "encoder_runs": 0, "decoder_runs": 0, "lookahead_runs": 0,
                "batched_decoder_calls": 0, "controlnet_runs": 0}

    def reset(self) -> None:
        self._run, self._pending = None, False

    # -- runs ------------------------------------------------------------------------------------
    def begin_call(self, pipe: Any) -> None:
        super().begin_call(pipe)
        self._pending = True
        if self.config.noise_injection > 0:
            self._step_signature = inspect.signature(pipe.scheduler.step)
            self._noise_patch = self.patch(pipe.scheduler, "step", self._scheduler_step)

    def end_call(self, pipe: Any) -> None:
        patch = getattr(self, "_noise_patch", None)
        if patch is not None:
            patch.remove()
            self._patches.remove(patch)
            self._noise_patch = None
        super().end_call(pipe)

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling loop of ``num_steps`` UNet calls (only needed for a bare UNet)."""
        self.stats = self.new_stats()
        self._run = _Run(self.config, num_steps, None)

    def _current_run(self, timestep: Any) -> _Run | None:
        if self._pending:
            self._pending = False
            timeline = loop_timeline(self.pipe.scheduler, timestep)
            self._run = _Run(self.config, len(timeline), timeline)
        return self._run

    # -- ControlNet -----------------------------------------------------------------------------
    def _controlnet_forward(self, inner, *args, **kwargs):
        run = self._current_run(args[1] if len(args) > 1 else kwargs.get("timestep"))
        if run is None or self.split.mode is not None:
            return inner(*args, **kwargs)
        step = run.advance("controlnet")
        if step in run.key_set or step >= run.num_steps or run.control is None:
            out = inner(*args, **kwargs)
            run.control = tree_clone(out)
            self.stats["controlnet_runs"] += 1
            return out
        return tree_clone(run.control)

    # -- UNet -------------------------------------------------------------------------------------
    def _unet_forward(self, inner, *args, **kwargs):
        if self.split.mode is not None:
            return inner(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        run = self._current_run(call["timestep"])
        if run is None:
            if self.pipe is None:
                raise RuntimeError("tiec: call handle.start_run(num_steps) before each sampling loop of a bare UNet")
            return inner(**call)
        self.stats["unet_calls"] += 1
        step = run.advance("unet")
        if step >= run.num_steps:
            return inner(**call)
        t = run.time(step)
        if t is None:
            t = timestep_value(call["timestep"])
        if step in run.key_set:
            return self._key_step(inner, run, step, t, call)
        return_dict = call.get("return_dict", True)
        queued = run.queue.pop(step, None)
        if queued is not None and queued[0] == timestep_value(call["timestep"]):
            out = queued[1]
        else:
            out = self._decode(inner, run, self._group(run, step), t, call)
        return self._wrap(out, return_dict)

    def _key_step(self, inner, run: _Run, step: int, t: float, call: dict) -> Any:
        out, features = self.split.capture(lambda: inner(**call))
        run.store(step, self._coord(step, t), features)
        run.queue.clear()
        self.stats["encoder_runs"] += 1
        self.stats["decoder_runs"] += 1
        next_key = run.next_key(step)
        if self.config.estimator == "interpolate" and next_key is not None and next_key > step + 1:
            sample = out[0] if isinstance(out, tuple) else out.sample
            run.predicted[step] = self._look_ahead(inner, run, t, run.time(next_key), sample, call)
        return out

    def _group(self, run: _Run, step: int) -> list[int]:
        """The steps decoded together with ``step``: up to the next key step, at most ``max_parallel``."""
        if not self.config.parallel or run.timesteps is None:
            return [step]
        end = run.next_key(step) or run.num_steps
        if self.config.max_parallel is not None:
            end = min(end, step + self.config.max_parallel)
        return list(range(step, end))

    def _decode(self, inner, run: _Run, steps: list[int], t: float, call: dict) -> torch.Tensor:
        """Decode ``steps`` (the first at timestep ``t``) in one UNet call with the encoder skipped.

        The first step's output is returned, the others are queued for the calls to come.
        """
        per_step = [self._estimate(run, s, t if i == 0 else run.timesteps[s]) for i, s in enumerate(steps)]
        call = dict(call, return_dict=False)
        if len(steps) > 1:
            sample = call["sample"]
            batch, times = sample.shape[0], len(steps)
            timestep = call["timestep"]
            dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else torch.float32
            values = torch.tensor([run.timesteps[s] for s in steps], dtype=torch.float64)
            call = {k: (v if k in ("sample", "timestep") else tile_batch(v, batch, times)) for k, v in call.items()}
            call["sample"] = sample.repeat(times, *([1] * (sample.ndim - 1)))
            call["timestep"] = values.repeat_interleave(batch).to(device=sample.device, dtype=dtype)
            features = tuple(torch.cat(parts) for parts in zip(*per_step))
            self.stats["batched_decoder_calls"] += 1
        else:
            features = per_step[0]
        out = self.split.decode(lambda: inner(**call), features)[0]
        self.stats["decoder_runs"] += len(steps)
        outs = out.chunk(len(steps))
        for s, o in zip(steps[1:], outs[1:]):
            run.queue[s] = (run.timesteps[s], o)
        return outs[0]

    def _coord(self, step: int, t: float) -> float:
        """The position of a step on the axis along which the estimators are linear."""
        space = self.config.blend_space
        if space == "t":
            return t
        if space == "step":
            return float(step)
        alpha = _alpha_at(self.pipe.scheduler.alphas_cumprod, t)
        return math.log(alpha / (1.0 - alpha))

    def _estimate(self, run: _Run, step: int, t: float) -> Features:
        """The features step ``step`` (at timestep ``t``) decodes from, by the configured estimator."""
        key = run.last_key(step)
        current = run.features[key]
        estimator = self.config.estimator
        here = self._coord(step, t)
        if estimator == "interpolate" and key in run.predicted:
            next_key = run.next_key(step)
            return estimators.interpolate(current, run.predicted[key], run.key_coords[key],
                                          self._coord(next_key, run.time(next_key)), here)
        if estimator in ("extrapolate", "interpolate") and len(run.features) == 2:
            previous = min(run.features)
            return estimators.extrapolate(run.features[previous], current, run.key_coords[previous],
                                          run.key_coords[key], here, self.config.max_extrapolation)
        return estimators.reuse(current)

    def _look_ahead(self, inner, run: _Run, t: float, t_next: float, model_output: torch.Tensor,
                    call: dict) -> Features:
        """Encoder features at the next key step, from a one-step DDIM prediction of its latent."""
        scheduler = self.pipe.scheduler
        guided = model_output
        if getattr(self.pipe, "do_classifier_free_guidance", False):
            uncond, cond = model_output.chunk(2)
            guided = uncond + self.pipe.guidance_scale * (cond - uncond)
            guided = torch.cat([guided, guided])
        alphas = scheduler.alphas_cumprod
        prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        sample = call["sample"]
        x_next = estimators.ddim_jump(sample.float(), guided.float(), _alpha_at(alphas, t), _alpha_at(alphas, t_next),
                                      prediction_type).to(sample.dtype)
        timestep = call["timestep"]
        next_timestep = torch.full_like(timestep, t_next) if isinstance(timestep, torch.Tensor) else t_next
        lookahead = dict(call, sample=x_next, timestep=next_timestep)
        features = self.split.encode(lambda: inner(**lookahead))
        self.stats["encoder_runs"] += 1
        self.stats["lookahead_runs"] += 1
        return features

    @staticmethod
    def _wrap(sample: torch.Tensor, return_dict: bool) -> Any:
        if not return_dict:
            return (sample,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
        return UNet2DConditionOutput(sample=sample)

    # -- prior noise injection ------------------------------------------------------------------
    def _scheduler_step(self, inner, *args, **kwargs):
        run = self._run
        if run is None:
            return inner(*args, **kwargs)
        sample = self._step_signature.bind(*args, **kwargs).arguments["sample"]
        if run.z_T is None:
            run.z_T = sample.clone()
        out = inner(*args, **kwargs)
        nxt = run.step + 1
        if nxt < run.num_steps and run.timesteps[nxt] < self.config.noise_injection_tau:
            w = self.config.noise_injection
            if isinstance(out, tuple):
                out = (out[0] + w * run.z_T.to(out[0].dtype),) + tuple(out[1:])
            else:
                out = dataclasses.replace(out, prev_sample=out.prev_sample + w * run.z_T.to(out.prev_sample.dtype))
        return out


def _alpha_at(alphas_cumprod: torch.Tensor, t: float) -> float:
    """``alphas_cumprod`` at a possibly fractional timestep, linearly interpolated."""
    t = min(max(t, 0.0), len(alphas_cumprod) - 1.0)
    lo = int(math.floor(t))
    hi = min(lo + 1, len(alphas_cumprod) - 1)
    frac = t - lo
    return float(alphas_cumprod[lo]) * (1 - frac) + float(alphas_cumprod[hi]) * frac
