"""Encoder propagation (FasterDiffusion) with the TIEC estimators: config, step cursor and UNet hook.

At a key step the full UNet runs and its encoder features are recorded. At a non-key step the
encoder is skipped and the decoder runs on features estimated from the recorded ones (see
``estimators``). With ``parallel=True`` the decoders of all the non-key steps up to the next key
step run as one batched call, and the pipeline then consumes their outputs one step at a time.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import estimators, families, schedules
from ._part import Part
from ._timeline import StepCursor, Timeline, bare_timestep, timestep_value
from ._tree import tile_batch, tree_clone, tree_leaves, tree_map, tree_rebuild
from .noise import PriorNoiseInjection
from .split import Features

logger = logging.getLogger("tiec")
DEFAULT_MAX_PARALLEL = 8

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
        max_parallel: at most this many steps per batched decoder call. Default 8: the batched decoder then
            holds at most 8x the activations of one decoder step (peak memory measured in README, Memory);
            None: no cap (a 14-step FasterDiffusion group in one call).
        noise_injection: prior noise injection weight ``w``: from the first step with ``t < tau`` on,
            ``w * z_T`` is added to the latent before each step. FasterDiffusion uses 0.003. Default 0 (off).
        noise_injection_tau: the timestep ``tau`` below which noise is injected. Default 500.
        blend_space: the coordinate in which the estimators are linear: ``"t"`` (the timestep, as the
            seed defines them; default), ``"log-snr"`` (log of alpha_bar / (1 - alpha_bar) of the
            scheduler; needs a pipeline) or ``"step"`` (the step index).
        extrapolation_order: 1 (default: the line through the last two key steps) or 2 (the quadratic through
            the last three; order 1 until three key steps exist). Used wherever the estimators extrapolate
            (``extrapolate``, and ``interpolate`` after the last key step). ``max_extrapolation`` bounds the line only
            (order 1, and order 2 while two key steps exist), not the quadratic.
        max_extrapolation: bound on the magnitude of the negative weight of ``extrapolate`` (None: no
            bound). Smaller values stay closer to ``reuse`` far from the last key step.
        encoder_blocks: transformers and ``tiec.BlockModel`` only: the encoder is the first ``k`` blocks of the
            stack. None (default): ``round(18 / 28 * len(blocks))``, FasterDiffusion's DiT-XL/2 setting (see
            ``tiec.families``). UNets take None (their encoder is fixed).

    Example:
        >>> cfg = EncoderPropagationConfig(key_steps="uniform:5", estimator="extrapolate")
        >>> schedules.resolve(cfg.key_steps, 20)  # the key steps of a 20-step loop
        (0, 4, 8, 12, 16)
    """

    key_steps: schedules.KeyStepSpec = "faster-diffusion"
    estimator: str = "reuse"
    parallel: bool = True
    max_parallel: int | None = DEFAULT_MAX_PARALLEL
    noise_injection: float = 0.0
    noise_injection_tau: float = 500
    blend_space: str = "t"
    max_extrapolation: float | None = None
    extrapolation_order: int = 1
    encoder_blocks: int | None = None

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
        if self.extrapolation_order not in (1, 2) or isinstance(self.extrapolation_order, bool):
            raise ValueError(f"extrapolation_order={self.extrapolation_order!r} must be 1 (linear) or 2 (quadratic)")
        if self.encoder_blocks is not None and (not isinstance(self.encoder_blocks, int) or isinstance(
                self.encoder_blocks, bool) or self.encoder_blocks < 1):
            raise ValueError(f"encoder_blocks={self.encoder_blocks!r} must be None or a positive integer")


class _Slot:
    """The cache of one call position within a step (pipelines that call the UNet twice per step get two)."""

    def __init__(self, keep: int = 2):
        self.keep = keep                             # key steps kept: 2, or 3 for second-order forecasts
        self.features: dict[int, Features] = {}      # the last key steps, with distinct coordinates
        self.key_coords: dict[int, float] = {}       # key step -> its coordinate in the blend space
        self.predicted: dict[int, Features] = {}     # look-ahead features of the next key step, by key step
        self.queue: dict[int, torch.Tensor] = {}     # batched decoder outputs of the steps to come
        self.control: Any = None                     # ControlNet output of the last key step
        self.control_scale: Any = None               # and the conditioning scale it was computed with
        self.step_scale: tuple[int, Any] | None = None  # (step, conditioning scale) of this step's ControlNet call
        self.sample_batch: int | None = None         # the model input's batch of the cached key steps

    def store(self, step: int, coord: float, features: Features, sample_batch: int | None = None) -> int:
        """Keep the features of key step ``step``; returns how many queued decodes it made useless.

        ``sample_batch`` is the model input's batch (default: the features'; video UNets fold frames into theirs).
        """
        # A key step at the coordinate of the previous one (a repeated timestep: Heun, KDPM2) replaces it, so
        # that the two kept key steps always span a line; features of another batch size (guidance switched off
        # by a callback) cannot be blended with these.
        batch = features[0].shape[0]
        for old in [k for k, c in self.key_coords.items() if c == coord or self.features[k][0].shape[0] != batch]:
            self._drop(old)
        self.key_coords[step], self.features[step] = coord, features
        self.sample_batch = features[0].shape[0] if sample_batch is None else sample_batch
        for old in sorted(self.features)[:-self.keep]:
            self._drop(old)
        unused = len(self.queue)
        self.queue.clear()
        return unused

    def _drop(self, step: int) -> None:
        self.features.pop(step, None)
        self.key_coords.pop(step, None)
        self.predicted.pop(step, None)

    def scale_at(self, step: int) -> Any:
        """The ControlNet conditioning scale of ``step`` in this call position (None without a ControlNet)."""
        return self.step_scale[1] if self.step_scale is not None and self.step_scale[0] == step else None

    def batch(self) -> int | None:
        return self.sample_batch if self.features else None


class _Run:
    """The state of one sampling loop: its timeline, key steps, step cursor and per-slot caches."""

    def __init__(self, config: EncoderPropagationConfig, num_steps: int, timeline: Timeline | None,
                 pipe: Any = None, unet: Any = None):
        self.num_steps, self.timeline = num_steps, timeline
        self.timesteps = timeline.values if timeline is not None else None
        spec = config.key_steps
        if isinstance(spec, tuple):  # a list is read on the loop that runs (denoising_end, img2img): drop the rest
            spec = tuple(k for k in spec if k < num_steps)
        self.key_steps = schedules.resolve(spec, num_steps, pipe=pipe, unet=unet, estimator=config.estimator,
                                           extrapolation_order=config.extrapolation_order)
        self.key_set = frozenset(self.key_steps)
        self.adaptive = schedules.adaptive_threshold(config.key_steps)  # None, or T: keys chosen during the run
        self.cursor = StepCursor(timeline, ("unet", "controlnet"))
        self.slots: dict[int, _Slot] = {}
        estimates = config.estimator != "reuse"
        # key steps kept per slot: reuse reads the last one (adaptive compares two), the line two, the parabola three
        self.keep = (3 if config.extrapolation_order == 2 else 2) if estimates else (2 if self.adaptive else 1)

    @property
    def step(self) -> int:
        """The step of the last call (-1 before the first)."""
        return self.cursor.step

    def locate(self, caller: str, timestep: Any) -> tuple[int, _Slot] | None:
        """The step and cache slot of a UNet or ControlNet call; None for a call outside this loop."""
        if self.timeline is None:  # a bare UNet: every UNet call is the next step
            if caller == "controlnet":
                return None
            if self.step + 1 >= self.num_steps:
                raise RuntimeError(f"tiec: this run of {self.num_steps} steps is over; call "
                                   f"handle.start_run(num_steps) before each sampling loop of a bare UNet")
        located = self.cursor.locate(timestep, caller)
        if located is None:
            return None
        step, slot = located
        if slot not in self.slots:
            self.slots[slot] = _Slot(keep=self.keep)
        return step, self.slots[slot]

    def add_key(self, step: int) -> None:
        self.key_steps = tuple(sorted(set(self.key_steps) | {step}))
        self.key_set = frozenset(self.key_steps)

    def next_key(self, step: int) -> int | None:
        return next((k for k in self.key_steps if k > step), None)

    def time(self, step: int) -> float | None:
        return self.timesteps[step] if self.timesteps is not None else None


class EncoderPropagation(Part):
    """Encoder propagation applied to one UNet (and its pipeline). Made by ``tiec.apply``."""

    config: EncoderPropagationConfig

    def install(self) -> None:
        if self.pipe is None and self.config.estimator == "interpolate":
            raise ValueError("estimator='interpolate' needs a pipeline (its scheduler predicts the next key "
                             "latent); apply it to the pipeline rather than to the bare UNet")
        if self.pipe is None and self.config.noise_injection > 0:
            raise ValueError(f"noise_injection={self.config.noise_injection} needs a pipeline (it patches the "
                             f"scheduler's step); apply it to the pipeline rather than to the bare UNet")
        if self.pipe is None and self.config.blend_space == "log-snr":
            raise ValueError("blend_space='log-snr' needs a pipeline (its scheduler's alphas_cumprod); "
                             "apply it to the pipeline rather than to the bare UNet")
        if self.config.estimator == "interpolate" and hasattr(type(self.pipe), "image_guidance_scale"):
            raise ValueError(f"estimator='interpolate' does not support {type(self.pipe).__name__}: its look-ahead "
                             f"needs the guided prediction of a two-way guidance batch, and this pipeline guides "
                             f"a three-way batch with an image scale; use 'reuse' or 'extrapolate'")
        self.family = families.family_of(self.unet, self.pipe, self.named)
        controlnet = getattr(self.pipe, "controlnet", None) if self.pipe is not None else None
        if not self.family.is_unet and controlnet is not None:
            raise ValueError(f"EncoderPropagationConfig does not support a ControlNet on {type(self.unet).__name__}: "
                             f"its residuals are added between the transformer blocks that a non-key step skips")
        if self.config.blend_space == "log-snr" and self.pipe is not None and \
                getattr(self.pipe.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"blend_space='log-snr' needs a scheduler with alphas_cumprod; "
                             f"{type(self.pipe.scheduler).__name__} has none: use 't' or 'step'")
        if self.config.noise_injection > 0 and self.pipe is not None and \
                type(self.pipe).__name__.startswith("TextToVideoZero"):
            raise ValueError(f"noise_injection does not support {type(self.pipe).__name__}: it swaps its scheduler for "
                             f"a copy in the middle of a call, which would carry the injection's patch along")
        if self.pipe is not None and type(self.pipe).__name__.startswith("StableDiffusionSAG"):
            raise ValueError(f"EncoderPropagationConfig does not support {type(self.pipe).__name__}: self-attention "
                             f"guidance reads the mid block's attention map of every step, which a non-key step "
                             f"does not compute")
        super().install()
        self._run: _Run | None = None
        self.last_key_steps: tuple[int, ...] | None = None  # the key steps of the last loop (auto, adaptive)
        self._pending = False
        self._noise = PriorNoiseInjection(self.config.noise_injection, self.config.noise_injection_tau, owner=self,
                                          position=self._loop_position) if self.config.noise_injection > 0 else None
        self._warned: set[str] = set()
        self._call_guidance: Any = None
        self._signature = inspect.signature(self.unet.forward)
        self.split = self.family.make_split(self, self.unet, self.config.encoder_blocks)
        fam = self.family
        self._unchecked = _UNCHECKED | {fam.sample_arg, fam.timestep_arg}
        # The step logic (data-dependent Python) stays out of torch.compile's graphs: compiled whole, the UNet
        # then runs eagerly under tiec; compile its blocks instead (README, torch.compile).
        self.patch(self.unet, "forward", torch.compiler.disable(self._unet_forward))
        if isinstance(controlnet, torch.nn.Module):
            self._controlnet_signature = inspect.signature(controlnet.forward)
            self.patch(controlnet, "forward", torch.compiler.disable(self._controlnet_forward))
        self.stats = self.new_stats()

    def new_stats(self) -> dict[str, int]:
        return {"unet_calls": 0, "encoder_runs": 0, "decoder_runs": 0, "lookahead_runs": 0,
                "batched_decoder_calls": 0, "controlnet_runs": 0,
                # fallbacks, each also logged once at debug level:
                "plain_calls": 0,        # UNet calls that are no step of the loop (run plain)
                "recomputed_steps": 0,   # non-key steps run in full: their batch no longer matched the cache
                "unused_decodes": 0,     # batched decodes of steps that were never called (an interrupt)
                "lookahead_unguided": 0,  # look-ahead jumps made without guidance (not a two-way batch)
                "regrouped_steps": 0}     # queued decodes dropped: the conditioning changed inside the group

    def _fallback(self, counter: str, message: str) -> None:
        self.stats[counter] += 1
        if counter not in self._warned:
            self._warned.add(counter)
            logger.debug("tiec: %s (counted in stats[%r]; logged once)", message, counter)

    def reset(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None:
            self.last_key_steps = tuple(run.key_steps)
            unused = sum(len(slot.queue) for slot in run.slots.values()) if run.timeline is not None else 0
            if unused:
                self.stats["unused_decodes"] += unused
        self._run, self._pending = None, False

    # -- runs ------------------------------------------------------------------------------------
    def begin_call(self, pipe: Any, call_kwargs: dict | None = None) -> None:
        super().begin_call(pipe, call_kwargs)
        self._pending = True
        self._denoising_end = (call_kwargs or {}).get("denoising_end")
        self._call_guidance = _call_argument(pipe, call_kwargs or {}, self.family.guidance_arg)
        if self._noise is not None:
            self._patches.append(self._noise.begin_call(pipe))

    def end_call(self, pipe: Any) -> None:
        if self._noise is not None and self._noise.patch is not None:
            self._patches.remove(self._noise.patch)
            self._noise.end_call()
        super().end_call(pipe)

    def _guidance(self) -> float | torch.Tensor | None:
        """The guidance scale of this call: the pipeline's, or its call argument where it keeps none (DiT, PixArt)."""
        if hasattr(type(self.pipe), "do_classifier_free_guidance"):
            return _guidance_scale(self.pipe)
        scale = self._call_guidance
        return scale if isinstance(scale, (int, float)) and scale > 1 else None

    def _loop_position(self) -> tuple[int, int, Timeline] | None:
        """(the step after the current one, the loop length, its timeline) for noise injection; None outside."""
        run = self._run
        return None if run is None or run.timeline is None else (run.step + 1, run.num_steps, run.timeline)

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling loop of ``num_steps`` UNet calls (only needed for a bare UNet)."""
        self.stats = self.new_stats()
        self._run = _Run(self.config, num_steps, None, None, self.unet)

    def _scheduler_timestep(self, timestep: Any) -> Any:
        """The call's timestep in the scheduler's units (Flux's pipeline passes ``t / 1000``).

        Such a pipeline keeps the loop's own ``t`` (a view of ``scheduler.timesteps``) as ``_current_timestep``:
        located exactly, without a device sync; else the value, scaled back (bf16 rounds it: matched by value).
        """
        scale = self.family.timestep_scale
        if scale == 1.0 or self.pipe is None:
            return timestep
        current = getattr(self.pipe, "_current_timestep", None)
        return current if isinstance(current, torch.Tensor) else timestep_value(timestep) * scale

    def _current_run(self, timestep: Any) -> _Run | None:
        if self._pending:
            self._pending = False
            denoising_end = self._denoising_end
            timeline = Timeline(self.pipe.scheduler, timestep, denoising_end)
            self._run = _Run(self.config, len(timeline), timeline, self.pipe)
        return self._run

    def _restarted(self, run: _Run, timestep: Any) -> bool:
        """A call that goes back to an earlier step of the timeline starts a new run from there.

        Text2Video-Zero denoises the first frame, then goes back and denoises all frames from an earlier step:
        each such loop is a run of its own, with its own key steps and caches.
        """
        if run.timeline is None:
            return False
        index = run.timeline.index(timestep)
        if index is None or index - run.timeline.start >= run.step:
            return False
        self.reset()
        self._pending = True
        return self._current_run(timestep) is not None

    # -- ControlNet -----------------------------------------------------------------------------
    def _controlnet_forward(self, inner, *args, **kwargs):
        if self.split.mode is not None:
            return inner(*args, **kwargs)
        call = self._controlnet_signature.bind(*args, **kwargs).arguments
        run = self._current_run(call.get("timestep"))
        located = run.locate("controlnet", call.get("timestep")) if run is not None else None
        if located is None:
            return inner(*args, **kwargs)
        step, slot = located
        scale = _plain(call.get("conditioning_scale", 1.0))
        slot.step_scale = (step, scale)
        if step in run.key_set or slot.control is None or not _same_shape(slot.control, call.get("sample")):
            out = inner(*args, **kwargs)
            slot.control, slot.control_scale = tree_clone(out), scale
            self.stats["controlnet_runs"] += 1
            return out
        if scale == slot.control_scale:
            return tree_clone(slot.control)
        if _is_zero(scale):  # outside control_guidance_start/end: the ControlNet's residuals are zeros
            return tree_map(torch.zeros_like, slot.control)
        # Another scale than the cached one (control_guidance_start/end): run it, and replay this run from here on.
        out = inner(*args, **kwargs)
        slot.control, slot.control_scale = tree_clone(out), scale
        self.stats["controlnet_runs"] += 1
        return out

    # -- UNet -------------------------------------------------------------------------------------
    def _unet_forward(self, inner, *args, **kwargs):
        if self.split.mode is not None:
            return inner(*args, **kwargs)
        call = dict(self._signature.bind(*args, **kwargs).arguments)
        self.split.refresh()
        fam = self.family
        timestep, sample = self._scheduler_timestep(call[fam.timestep_arg]), call[fam.sample_arg]
        run = self._current_run(timestep)
        if run is None:
            if self.pipe is None:
                raise RuntimeError("tiec: call handle.start_run(num_steps) before each sampling loop of a bare UNet")
            return inner(**call)
        self.stats["unet_calls"] += 1
        located = run.locate("unet", timestep)
        if located is None and self._restarted(run, timestep):
            run = self._run
            located = run.locate("unet", timestep)
        if located is None:
            self._fallback("plain_calls", "a UNet call whose timestep is no step of the loop ran the plain UNet")
            return inner(**call)
        step, slot = located
        t = run.time(step)
        if t is None:
            t = bare_timestep(timestep, step, self.family.timestep_scale)
        if step in run.key_set or slot.batch() != sample.shape[0]:
            if step not in run.key_set:
                self._fallback("recomputed_steps", "a non-key step ran in full: its batch differs from the "
                               "cached key step's (or no key step ran in this call position)")
            return self._key_step(inner, run, slot, step, t, call)
        queued = slot.queue.pop(step, None)
        if queued is not None and not (queued[2] == slot.scale_at(step)
                                       and _same_inputs(queued[1], call, self._unchecked)):
            # the conditioning changed inside the group (a callback, control_guidance_start/end): decode anew
            self._fallback("regrouped_steps", "a queued decode was dropped: the step's conditioning differs from "
                           "the one the group was decoded with")
            self.stats["unused_decodes"] += 1 + len(slot.queue)
            slot.queue.clear()
            queued = None
        return queued[0] if queued is not None else self._decode(inner, run, slot, self._group(run, step), call, t)

    def _key_step(self, inner, run: _Run, slot: _Slot, step: int, t: float, call: dict) -> Any:
        needed = run.keep > 1 or self.config.estimator != "reuse" or (step + 1 < run.num_steps
                                                                       and step + 1 not in run.key_set)
        if not needed:  # reuse, and the next step is a key step too: these features would never be read
            self.stats["unused_decodes"] += len(slot.queue)
            slot.queue.clear()
            out = inner(**_fresh(call))
            self.stats["encoder_runs"] += 1
            self.stats["decoder_runs"] += 1
            return out
        out, features = self.split.capture(lambda: inner(**_fresh(call)))
        self.stats["unused_decodes"] += slot.store(step, self._coord(step, t), features,
                                                   call[self.family.sample_arg].shape[0])
        self.stats["encoder_runs"] += 1
        self.stats["decoder_runs"] += 1
        if run.adaptive is not None and slot is run.slots[0] and step >= max(run.key_steps):
            self._choose_next_key(run, slot, step)
        next_key = run.next_key(step)
        if self.config.estimator == "interpolate" and next_key is not None and next_key > step + 1 \
                and run.time(next_key) != t:
            slot.predicted[step] = self._look_ahead(inner, run, step, next_key, tree_leaves(out)[0], call)
        return out

    def _choose_next_key(self, run: _Run, slot: _Slot, step: int) -> None:
        """``adaptive:T``: the next key step, from the change of the features between the last two key steps.

        Decided here, at the key step, so that the decoders of the steps up to it can still run batched. The
        first slot's features decide for every call position of the step. One device sync per key step.
        """
        keys = sorted(slot.features)
        if len(keys) < 2:
            return
        previous, current = slot.features[keys[-2]], slot.features[keys[-1]]
        ratios = torch.stack([(a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)
                              for a, b in zip(current, previous)])
        nxt = schedules.next_adaptive_key(keys[-1], keys[-2], float(ratios.mean()), run.adaptive, run.num_steps)
        if nxt is not None:
            run.add_key(nxt)

    def _group(self, run: _Run, step: int) -> list[int]:
        """The steps decoded together with ``step``: up to the next key step, at most ``max_parallel``."""
        if not self.config.parallel or run.timesteps is None or self.family.serial:
            return [step]
        end = run.next_key(step) or run.num_steps
        if self.config.max_parallel is not None:
            end = min(end, step + self.config.max_parallel)
        return list(range(step, end))

    def _decode(self, inner, run: _Run, slot: _Slot, steps: list[int], call: dict, t: float) -> Any:
        """Decode ``steps`` (the first being this call's) in one model call with the encoder skipped.

        The first step's output is returned, the others are queued for the calls to come, each in the structure
        of the model's output. The decoder never sees a cached tensor: FreeU and adapters write into what they
        are given.
        """
        inputs = _input_refs(call, self._unchecked)
        call = _fresh(call)
        if len(steps) == 1:
            features = self._estimate(run, slot, steps[0], t)
            if any(f is c for f, c in zip(features, slot.features[max(slot.features)])):
                features = tuple(f.clone() for f in features)
        else:
            features, call = self._batched_inputs(run, slot, steps, call)
            self.stats["batched_decoder_calls"] += 1
        result = self.split.decode(lambda: inner(**call), features)
        self.stats["decoder_runs"] += len(steps)
        if len(steps) == 1:
            return result
        size = call[self.family.sample_arg].shape[0]
        leaves = tree_leaves(result)
        chunks = [leaf.chunk(len(steps)) if leaf.ndim and leaf.shape[0] == size else None for leaf in leaves]
        outs = [tree_rebuild(result, [leaf if parts is None else parts[i] for leaf, parts in zip(leaves, chunks)])
                for i in range(len(steps))]
        scale = slot.scale_at(steps[0])
        for s, o in zip(steps[1:], outs[1:]):
            slot.queue[s] = (o, inputs, scale)
        return outs[0]

    def _batched_inputs(self, run: _Run, slot: _Slot, steps: list[int], call: dict) -> tuple[Features, dict]:
        """The features and UNet inputs of one decoder call for ``steps``, laid out step-major.

        The features are written into one buffer step by step (no second copy); the latent is a broadcast view
        (the decoder never reads it); ControlNet residuals, the same for every step of the group, are added to
        the features here instead of being tiled per step.
        """
        fam = self.family
        sample, timestep = call[fam.sample_arg], call[fam.timestep_arg]
        batch, times = sample.shape[0], len(steps)
        down_control, mid_control = call.get("down_block_additional_residuals"), call.get("mid_block_additional_residual")
        control = None
        if down_control is not None and mid_control is not None and len(down_control) + 1 == self.split.num_features:
            control = tuple(down_control) + (mid_control,)
            call["down_block_additional_residuals"] = call["mid_block_additional_residual"] = None
        buffers: list[torch.Tensor] | None = None
        ends: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # each line's ends, converted once
        for i, s in enumerate(steps):
            line = self._line(run, slot, s)
            features = line[1] if line is not None else self._estimate(run, slot, s)
            if buffers is None:  # a feature's batch may differ from the input's: video UNets fold the frames in
                buffers = [f.new_empty((times * f.shape[0],) + f.shape[1:]) for f in features]
            for j, f in enumerate(features):
                part = buffers[j][i * f.shape[0]:(i + 1) * f.shape[0]]
                if line is not None:  # the blend written straight into the buffer: one kernel per feature and step
                    pair = (id(line[0][j]), id(f))
                    if pair not in ends:
                        ends[pair] = estimators.blend_ends(line[0][j], f)
                    a, b = ends[pair]
                    torch.lerp(b, a, line[2], out=part)
                    if control is not None:
                        part.add_(control[j])
                elif control is not None:
                    torch.add(f, control[j], out=part)
                else:
                    part.copy_(f)
        dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else torch.float32
        values = torch.tensor([run.timesteps[s] for s in steps], dtype=torch.float64)
        keep = fam.untiled | {fam.sample_arg, fam.timestep_arg}
        folded = fam.frames(sample)
        call = {k: (v if k in keep else tile_batch(v, batch, times, folded)) for k, v in call.items()}
        # A view of the right shape: with the encoder skipped, the decoder reads only the latent's shape and dtype.
        call[fam.sample_arg] = sample[:1].expand(times * batch, *sample.shape[1:])
        # in the model's units as the pipeline makes them (Flux: t cast to the timestep's dtype, then / 1000)
        call[fam.timestep_arg] = values.repeat_interleave(batch).to(device=sample.device, dtype=dtype)
        if fam.timestep_scale != 1.0:
            call[fam.timestep_arg] = call[fam.timestep_arg] / fam.timestep_scale
        return tuple(buffers), call

    def _coord(self, step: int, t: float) -> float:
        """The position of a step on the axis along which the estimators are linear."""
        space = self.config.blend_space
        if space == "t":
            return t
        if space == "step":
            return float(step)
        alpha = _alpha_at(self.pipe.scheduler.alphas_cumprod, t)
        return math.log(alpha / (1.0 - alpha))

    def _estimate(self, run: _Run, slot: _Slot, step: int, t: float | None = None) -> Features:
        """The features step ``step`` decodes from, by the configured estimator (may alias the cache).

        ``t`` is the step's timestep when the run has no timeline (a bare UNet: the call's own).
        """
        line = self._line(run, slot, step, t)
        if line is not None:
            return estimators.blend(*line)
        keys = sorted(slot.features)
        if self.config.estimator in ("extrapolate", "interpolate") and len(keys) == 3:
            (k0, k1, key), coords = keys, slot.key_coords
            return estimators.extrapolate_quadratic(slot.features[k0], slot.features[k1], slot.features[key],
                                                    coords[k0], coords[k1], coords[key], self._here(run, step, t))
        return estimators.reuse(slot.features[keys[-1]])

    def _here(self, run: _Run, step: int, t: float | None) -> float:
        t = run.time(step) if run.timesteps is not None else t
        return self._coord(step, t if t is not None else 0.0)

    def _line(self, run: _Run, slot: _Slot, step: int,
              t: float | None = None) -> tuple[Features, Features, float] | None:
        """``(f_a, f_b, w)`` where step ``step``'s estimate is the line ``w*f_a + (1-w)*f_b``: interpolation to the
        predicted next key step, or extrapolation from the last two key steps; None for reuse and second order."""
        key = max(slot.features)
        current = slot.features[key]
        estimator = self.config.estimator
        if estimator == "interpolate" and key in slot.predicted:
            next_key = run.next_key(step)
            w = estimators.line_weight(slot.key_coords[key], self._coord(next_key, run.time(next_key)),
                                       self._here(run, step, t))
            return current, slot.predicted[key], w
        if estimator in ("extrapolate", "interpolate") and len(slot.features) == 2:
            previous = min(slot.features)
            w = estimators.line_weight(slot.key_coords[previous], slot.key_coords[key], self._here(run, step, t))
            if self.config.max_extrapolation is not None:
                w = max(w, -self.config.max_extrapolation)
            return slot.features[previous], current, w
        return None

    def _look_ahead(self, inner, run: _Run, step: int, next_key: int, model_output: torch.Tensor,
                    call: dict) -> Features:
        """Encoder features at the next key step, from a one-step prediction of its latent (DDIM, or the flow).

        The latent is the first ``min(in_channels, out_channels)`` channels of the model's input (inpainting,
        InstructPix2Pix, IF stage II and SVD append conditioning channels, kept as they are; learned-variance
        models append a variance half to the output, not used). The prediction is the guided one, as the
        pipeline forms it.
        """
        fam, scheduler = self.family, self.pipe.scheduler
        t_next = run.time(next_key)
        sample = call[fam.sample_arg]
        dim = fam.channel_dim % sample.ndim
        out_channels = model_output.shape[dim]
        if getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range"):
            out_channels //= 2  # DeepFloyd IF: epsilon, then the variance
        channels = min(sample.shape[dim], out_channels)
        prediction = model_output.narrow(dim, 0, channels).float()
        latent = sample.narrow(dim, 0, channels)
        scale = self._guidance()
        guided = scale is not None and prediction.shape[0] % 2 == 0
        if guided:  # the pipeline guides a batch [uncond, cond] of one latent: its two halves are equal
            first, second = latent.chunk(2)  # (the conditioning channels may differ: SVD's unconditional image)
            guided = torch.equal(first, second)
        if guided:
            uncond, cond = prediction.chunk(2)
            if fam.cond_first:
                uncond, cond = cond, uncond
            guided = uncond + scale * (cond - uncond)
            rescale = getattr(self.pipe, "guidance_rescale", 0.0) or 0.0
            if rescale > 0:
                guided = _rescale_guidance(guided, cond, rescale)
            prediction = torch.cat([guided, guided])
        elif scale is not None or getattr(self.pipe, "do_perturbed_attention_guidance", False):
            self._fallback("lookahead_unguided", "the look-ahead used each sample's own prediction: the guidance "
                           "batch is not [uncond, cond] of one latent (PAG, split calls)")
        x_next = _jump(scheduler, run, step, next_key, latent.float(), prediction).to(sample.dtype)
        if channels < sample.shape[dim]:
            x_next = torch.cat([x_next, sample.narrow(dim, channels, sample.shape[dim] - channels)], dim=dim)
        timestep = call[fam.timestep_arg]
        next_timestep = torch.full_like(timestep, t_next) / fam.timestep_scale if isinstance(timestep, torch.Tensor) \
            else t_next / fam.timestep_scale
        lookahead = dict(_fresh(call), **{fam.sample_arg: x_next, fam.timestep_arg: next_timestep})
        features = self.split.encode(lambda: inner(**lookahead))
        self.stats["encoder_runs"] += 1
        self.stats["lookahead_runs"] += 1
        return features

# Call arguments a queued decode does not depend on, or that are checked otherwise (the ControlNet's scale).
_UNCHECKED = frozenset({"sample", "timestep", "return_dict", "down_block_additional_residuals",
                        "mid_block_additional_residual", "down_intrablock_additional_residuals"})


def _call_tensors(call: dict, unchecked: frozenset[str]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for key in sorted(call):
        if key not in unchecked:
            tree_map(found.append, call[key])
    return found


def _version(t: torch.Tensor) -> int | None:
    """The tensor's write counter; None for inference-mode tensors, which keep none (writes go unseen there)."""
    return None if t.is_inference() else t._version


def _input_refs(call: dict, unchecked: frozenset[str]) -> list[tuple[torch.Tensor, int | None]]:
    """What the conditioning of a decode was: each input tensor and its version (held until the group ends)."""
    return [(t, _version(t)) for t in _call_tensors(call, unchecked)]


def _same_inputs(refs: list[tuple[torch.Tensor, int | None]], call: dict, unchecked: frozenset[str]) -> bool:
    """Whether a call's conditioning is what :func:`_input_refs` recorded, unchanged.

    The same tensor or the same memory (address, shape, strides, dtype: per-step views of one tensor, as a
    pipeline that splits its guidance batch makes) with no write since needs no device sync. A copy (accelerate's
    offload hooks copy inputs on a CPU) is compared by value: one sync. The recorded tensors are held, so no new
    tensor can be allocated at their address in the meantime.
    """
    tensors = _call_tensors(call, unchecked)
    if len(tensors) != len(refs):
        return False
    for (old, version), t in zip(refs, tensors):
        if _version(old) != version or t.shape != old.shape or t.dtype != old.dtype or t.device != old.device:
            return False
        if t is old or (t.data_ptr() == old.data_ptr() and t.stride() == old.stride()):
            continue
        if not torch.equal(t, old):
            return False
    return True


def _fresh(call: dict) -> dict:
    """The call with its containers rebuilt: the UNet pops adapter residuals from the lists it is given."""
    return tree_map(lambda t: t, call)


def _call_argument(pipe: Any, call_kwargs: dict, name: str) -> Any:
    """A keyword argument of a pipeline call, or its default in ``__call__``'s signature (None if it has none)."""
    if name in call_kwargs:
        return call_kwargs[name]
    try:
        parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _jump(scheduler: Any, run: _Run, step: int, target: int, latent: torch.Tensor,
          prediction: torch.Tensor) -> torch.Tensor:
    """The latent at step ``target`` predicted from step ``step`` in one deterministic step.

    Flow matching (SD3, Flux): ``x + (sigma_next - sigma) * v`` with ``sigma = t / num_train_timesteps``.
    EDM-style continuous timesteps (SVD): a DDIM jump in variance-preserving units with ``alpha_bar =
    1 / (1 + sigma^2)`` from the scheduler's sigmas. Otherwise a DDIM jump with ``alphas_cumprod`` at ``t``.
    """
    t, t_next = run.time(step), run.time(target)
    if getattr(scheduler, "alphas_cumprod", None) is None and getattr(scheduler, "sigmas", None) is not None:
        total = float(scheduler.config.num_train_timesteps)
        return latent + (t_next - t) / total * prediction
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if getattr(scheduler.config, "timestep_type", "discrete") == "continuous" and run.timeline is not None:
        sigmas = scheduler.sigmas
        alpha, alpha_next = (1.0 / (1.0 + float(sigmas[run.timeline.start + i]) ** 2) for i in (step, target))
    else:
        alpha, alpha_next = _alpha_at(scheduler.alphas_cumprod, t), _alpha_at(scheduler.alphas_cumprod, t_next)
    return estimators.ddim_jump(latent, prediction, alpha, alpha_next, prediction_type)


def _guidance_scale(pipe: Any) -> float | torch.Tensor | None:
    """The pipeline's classifier-free guidance scale while it guides, else None (read without failing)."""
    try:
        if not getattr(pipe, "do_classifier_free_guidance", False) or \
                getattr(pipe, "do_perturbed_attention_guidance", False):  # PAG: a three-way batch, not guided here
            return None
        scale = pipe.guidance_scale
        if isinstance(scale, torch.Tensor) and scale.numel() > 1:  # SVD: one scale per frame, broadcast
            return scale.float()
        return float(scale)
    except (AttributeError, TypeError, ValueError):
        return None


def _rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al., 2023, sec. 3.4): match the guided prediction's std to the conditional one."""
    dims = list(range(1, guided.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


def _plain(scale: Any) -> Any:
    """A conditioning scale as plain Python numbers (lists stay lists), for comparisons."""
    if isinstance(scale, torch.Tensor):
        return scale.tolist()
    if isinstance(scale, (list, tuple)):
        return [_plain(s) for s in scale]
    return float(scale)


def _is_zero(scale: Any) -> bool:
    return all(_is_zero(s) for s in scale) if isinstance(scale, list) else scale == 0


def _same_shape(cached: Any, sample: Any) -> bool:
    first = cached[0][0] if isinstance(cached, tuple) and isinstance(cached[0], (list, tuple)) else None
    return not isinstance(sample, torch.Tensor) or first is None or first.shape[0] == sample.shape[0]


def _alpha_at(alphas_cumprod: torch.Tensor, t: float) -> float:
    """``alphas_cumprod`` at a possibly fractional timestep, linearly interpolated."""
    t = min(max(t, 0.0), len(alphas_cumprod) - 1.0)
    lo = int(math.floor(t))
    hi = min(lo + 1, len(alphas_cumprod) - 1)
    frac = t - lo
    return float(alphas_cumprod[lo]) * (1 - frac) + float(alphas_cumprod[hi]) * frac
