"""Which step of a sampling loop a model call belongs to: the call's own timestep, checked against the timeline.

Calls are not counted: a pipeline may call the UNet several times per step (split guidance batches, SAG) or
stop early (SDXL's ``denoising_end``, an interrupt), and a scheduler may repeat timesteps (Heun, KDPM2, PNDM).
Diffusers pipelines pass the UNet a view of ``scheduler.timesteps`` (``for t in timesteps``), so a call's step is
read from where its timestep tensor sits in that tensor's storage: exact for repeated timesteps and free of
device syncs. A timestep that is not such a view (a Python number, a converted copy) is matched by value.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def timestep_value(timestep: Any) -> float:
    """The timestep of one model call as a Python float (a device sync when it lives on a GPU)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


def bare_timestep(timestep: Any, step: int, scale: float = 1.0) -> float:
    """A bare model call's own timestep times ``scale``; on the meta device (FLOP counting) a timestep holds no value,
    and the step index stands in."""
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "meta":
        return float(step)
    return timestep_value(timestep) * scale


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a))


class Timeline:
    """The timesteps one pipeline call iterates, read once at its first model call (one device sync per call).

    ``start`` is the index in ``scheduler.timesteps`` of the loop's first step (img2img starts later),
    ``values`` the timesteps of the steps the loop really runs (``denoising_end`` cut off), ``len`` their count.
    """

    def __init__(self, scheduler: Any, first_timestep: Any, denoising_end: Any = None):
        self.source = scheduler.timesteps
        every = [float(t) for t in self.source.tolist()]
        start = self.index(first_timestep)
        if start is None:
            warnings.warn(f"tiec: the first timestep {timestep_value(first_timestep)} of this call is not in "
                          f"scheduler.timesteps; counting the loop from the scheduler's first step")
            start = 0
        values = every[start:]
        end = denoising_end
        if isinstance(end, float) and 0 < end < 1:
            # The rule of diffusers' SDXL pipelines: keep the timesteps at or above the cutoff.
            total = scheduler.config.num_train_timesteps
            cutoff = int(round(total - end * total))
            values = values[:sum(1 for t in values if t >= cutoff)]
        self.start, self.values = start, values

    def index(self, timestep: Any) -> int | None:
        """The index of ``timestep`` in ``scheduler.timesteps`` (its first occurrence by value), None if absent."""
        found = self._storage_index(timestep)
        if found is None:
            value = timestep_value(timestep)
            found = next((i for i, t in enumerate(self.source.tolist()) if _close(float(t), value)), None)
        return found

    def __len__(self) -> int:
        return len(self.values)

    def _storage_index(self, timestep: Any) -> int | None:
        """The index of ``timestep`` in ``scheduler.timesteps`` if it is a view of it (no device sync)."""
        source = self.source
        if not isinstance(timestep, torch.Tensor) or timestep.device.type == "meta" or timestep.numel() == 0:
            return None
        if timestep.dtype != source.dtype or timestep.untyped_storage().data_ptr() != \
                source.untyped_storage().data_ptr() or source.ndim != 1 or source.stride(0) == 0:
            return None
        if any(stride != 0 for stride in timestep.stride()) and timestep.numel() > 1:
            return None  # several distinct timesteps: not one step of the loop
        offset = timestep.storage_offset() - source.storage_offset()
        index, rest = divmod(offset, source.stride(0))
        return index if rest == 0 and 0 <= index < len(source) else None

    def locate(self, timestep: Any, current: int, calls_in_current: int, calls_per_step: int) -> int | None:
        """The step (index into ``values``) of a call with ``timestep``; None if it is not a step of this loop.

        ``current`` is the step of the previous call (-1 before the first), which ``calls_in_current`` calls have
        had so far; ``calls_per_step`` is how many calls the first step had (to tell a repeated timestep from
        another call in the same step when the timestep has to be matched by value).
        """
        index = self._storage_index(timestep)
        if index is not None:
            step = index - self.start
            return step if 0 <= step < len(self.values) else None
        value = timestep_value(timestep)
        if 0 <= current < len(self.values) and _close(self.values[current], value):
            repeated = current + 1 < len(self.values) and _close(self.values[current + 1], value)
            if not repeated or calls_in_current < calls_per_step:
                return current
        return next((s for s in range(max(current + 1, 0), len(self.values)) if _close(self.values[s], value)), None)


class StepCursor:
    """Which step of a loop each model call belongs to, and its position among the calls of that step.

    With a ``timeline`` the step is read from the call's timestep (:meth:`Timeline.locate`); without one (a bare
    model) every call is the next step. ``callers`` are the kinds of calls counted apart (a UNet and its
    ControlNet); the first kind's calls per step tell a repeated timestep from another call of the same step.
    """

    def __init__(self, timeline: Timeline | None, callers: tuple[str, ...] = ("unet",)):
        self.timeline, self.callers = timeline, callers
        self.step = -1
        self.calls = dict.fromkeys(callers, 0)  # calls of each kind in the current step
        self.calls_per_step = 1                  # calls of the first step, learned when the second begins

    def locate(self, timestep: Any, caller: str | None = None) -> tuple[int, int] | None:
        """(step, position of this call among its kind's calls in the step); None for a call outside the loop."""
        caller = caller or self.callers[0]
        if self.timeline is None:
            step = self.step + 1
        else:
            step = self.timeline.locate(timestep, self.step, self.calls[caller], self.calls_per_step)
            if step is None or step < self.step:
                return None
        if step != self.step:
            if self.step == 0:
                self.calls_per_step = max(1, self.calls[self.callers[0]])
            self.step, self.calls = step, dict.fromkeys(self.callers, 0)
        position = self.calls[caller]
        self.calls[caller] += 1
        return step, position
