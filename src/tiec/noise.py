"""Prior noise injection (FasterDiffusion): ``w * z_T`` added to the latent after each scheduler step below ``tau``.

It patches the pipeline's scheduler, not the UNet, for the duration of one pipeline call; encoder propagation
owns it (its settings are fields of ``EncoderPropagationConfig``) and tells it where the loop stands.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch

from ._patch import Patch


class PriorNoiseInjection:
    """Adds ``weight * z_T`` to ``scheduler.step``'s output from the first step whose timestep is below ``tau``.

    ``z_T`` is the loop's first latent in variance-preserving form (unit variance for text-to-image; the noised
    image for img2img), and the injection is carried into the scheduler's own latent space, so that sigma-scaled
    schedulers (Euler, Heun, ...) inject as much as DDIM does.

    ``position()`` gives ``(next_step, num_steps, timeline)`` of the running loop, or None outside one.

    Example:
        >>> injection = PriorNoiseInjection(0.003, 500, owner=None, position=lambda: None)
        >>> injection.weight, injection.tau
        (0.003, 500)
    """

    def __init__(self, weight: float, tau: float, owner: Any, position: Callable[[], Any]):
        self.weight, self.tau, self.owner, self.position = weight, tau, owner, position
        self.patch: Patch | None = None
        self.z_T: torch.Tensor | None = None

    def begin_call(self, pipe: Any) -> Patch:
        """Patch ``pipe.scheduler.step`` for this call; returns the patch (the owner removes it with the rest)."""
        self.z_T = None
        self._signature = inspect.signature(pipe.scheduler.step)
        self._scheduler = pipe.scheduler
        self.patch = Patch(pipe.scheduler, "step", self._step, owner=self.owner)
        return self.patch

    def end_call(self) -> None:
        if self.patch is not None:
            self.patch.remove()
            self.patch = None
        self.z_T = None

    def _step(self, inner, *args, **kwargs):
        where = self.position()
        if where is None:
            return inner(*args, **kwargs)
        nxt, num_steps, timeline = where
        bound = self._signature.bind(*args, **kwargs).arguments
        scheduler = self._scheduler
        if self.z_T is None:
            sample = bound["sample"]
            self.z_T = sample * input_scale(scheduler, sample, bound["timestep"])
        out = inner(*args, **kwargs)
        if nxt < num_steps and timeline.values[nxt] < self.tau:
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            t_next = scheduler.timesteps[timeline.start + nxt]
            added = prev + (self.weight * self.z_T / input_scale(scheduler, prev, t_next)).to(prev.dtype)
            out = (added,) + tuple(out[1:]) if isinstance(out, tuple) else dataclasses.replace(out, prev_sample=added)
        return out


def input_scale(scheduler: Any, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
    """The factor ``scheduler.scale_model_input`` applies at ``timestep``: 1 for DDIM, 1/sqrt(sigma^2+1) for Euler.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> float(input_scale(DDIMScheduler(), torch.zeros(1, 4, 8, 8), 500))
        1.0
    """
    one = torch.ones((1,) * sample.ndim, device=sample.device, dtype=torch.float32)
    if not hasattr(scheduler, "scale_model_input"):  # flow matching: the latent is the model's input as it is
        return one
    return scheduler.scale_model_input(one, timestep)
