"""The common life cycle of an applied method: its patches, its per-call counters, its removal."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._patch import Patch, observe_calls


class Part:
    """One applied config on one UNet (and its pipeline, if any). Subclasses add their patches in ``install``."""

    config: Any

    def __init__(self, config: Any, unet: torch.nn.Module, pipe: Any | None):
        self.config, self.unet, self.pipe = config, unet, pipe
        self.stats: dict[str, int] = {}
        self._patches: list[Patch] = []
        self._unobserve: Callable[[], None] | None = None
        self.active = False

    # -- life cycle ---------------------------------------------------------------------------
    def install(self) -> None:
        self.active = True
        if self.pipe is not None:
            self._unobserve = observe_calls(self.pipe, self)

    def patch(self, obj: Any, name: str, fn: Callable) -> Patch:
        patch = Patch(obj, name, fn, owner=self)
        self._patches.append(patch)
        return patch

    def detach(self) -> None:
        """Remove every patch; idempotent."""
        if not self.active:
            return
        self.active = False
        for patch in reversed(self._patches):
            patch.remove()
        self._patches.clear()
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
        self.reset()

    # -- per pipeline call -------------------------------------------------------------------
    def begin_call(self, pipe: Any) -> None:
        self.reset()
        self.stats = self.new_stats()

    def end_call(self, pipe: Any) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop every per-run state (caches, cursors); counters stay readable."""

    def new_stats(self) -> dict[str, int]:
        return {}
