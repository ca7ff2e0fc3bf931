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
        self.named: Any = None  # the tiec.BlockModel that named this model, if any
        self.stats: dict[str, int] = {}
        self._patches: list[Patch] = []
        self._unobserve: Callable[[], None] | None = None
        self.active = False

    # -- life cycle ---------------------------------------------------------------------------
    def install(self) -> None:
        """Attach the call observer (subclasses then add their patches); ``detach`` undoes a partial install."""
        self.active = True
        if self.pipe is not None:
            self._unobserve = observe_calls(self.pipe, self)

    def patch(self, obj: Any, name: str, fn: Callable) -> Patch:
        patch = Patch(obj, name, fn, owner=self)
        self._patches.append(patch)
        return patch

    def check_removable(self) -> None:
        """Raise ``RuntimeError`` (changing nothing) if ``detach`` could not undo every patch."""
        for patch in self._patches:
            patch.check_removable()

    def check_linked(self) -> None:
        """Raise ``RuntimeError`` if other code replaced one of this part's patches since it was installed."""
        for patch in self._patches:
            if not patch.linked():
                raise RuntimeError(
                    f"tiec: the {type(self).__name__} patch of {patch.where()} was replaced by other code after "
                    f"tiec.apply (e.g. accelerate's remove_hook_from_module, which enable_model_cpu_offload and "
                    f"remove_all_hooks call); call handle.remove(), then tiec.apply again")

    def detach(self) -> None:
        """Remove every patch and the call observer; idempotent, and complete after a partial ``install``."""
        self.check_removable()
        was_active, self.active = self.active, False
        try:
            for patch in reversed(self._patches):
                patch.remove()
        finally:
            self._patches.clear()
            if self._unobserve is not None:
                self._unobserve()
                self._unobserve = None
            if was_active:
                self.reset()

    # -- per pipeline call -------------------------------------------------------------------
    def begin_call(self, pipe: Any, call_kwargs: dict | None = None) -> None:
        """A pipeline call begins; ``call_kwargs`` are its keyword arguments (read, never changed)."""
        self.check_linked()
        self.reset()
        self.stats = self.new_stats()

    def end_call(self, pipe: Any) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop every per-run state (caches, cursors); counters stay readable."""

    def new_stats(self) -> dict[str, int]:
        return {}

