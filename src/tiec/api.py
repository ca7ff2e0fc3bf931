"""``tiec.apply``: put one or more acceleration configs on a diffusers pipeline or UNet, and take them off."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from ._part import Part
from ._patch import call_observers, patch_owners
from .deepcache import DeepCache, DeepCacheConfig
from .families import TRANSFORMER_CLASSES, UNET_CLASSES, BlockModel, is_denoiser, known_class
from .propagation import EncoderPropagation, EncoderPropagationConfig
from .tome import TokenMerging, TokenMergingConfig


def _registry() -> dict[type, type[Part]]:
    return {EncoderPropagationConfig: EncoderPropagation, TokenMergingConfig: TokenMerging,
            DeepCacheConfig: DeepCache}


def _split_target(target: Any) -> tuple[torch.nn.Module, Any | None, BlockModel | None]:
    """(the denoiser, the pipeline or None, the ``BlockModel`` naming it or None) of what ``apply`` got."""
    if isinstance(target, BlockModel):
        return target.model, None, target
    if is_denoiser(target):
        return target, None, None
    for name in ("unet", "transformer"):
        model = getattr(target, name, None)
        if is_denoiser(model) and hasattr(target, "scheduler"):
            return model, target, None
    wrapped = [getattr(target, "_orig_mod", None)] + [getattr(getattr(target, n, None), "_orig_mod", None)
                                                       for n in ("unet", "transformer")]
    if any(is_denoiser(m) for m in wrapped):
        raise TypeError("tiec.apply got a model wrapped by torch.compile; apply tiec to the uncompiled model, "
                        "then compile its blocks in place with `unet.compile_repeated_blocks()` (README, torch.compile)")
    known = ", ".join(UNET_CLASSES + tuple(TRANSFORMER_CLASSES))
    raise TypeError(f"tiec.apply expects a diffusers pipeline (with a .scheduler) holding one of {known} as .unet "
                    f"or .transformer, such a model itself, or a tiec.BlockModel; got {type(target).__name__}")


def applied_parts(unet: torch.nn.Module, pipe: Any | None = None) -> list[Part]:
    """Every active tiec part on ``unet`` (and ``pipe``), found from the patches themselves."""
    found: list[Part] = []
    for module in unet.modules():
        for owner in patch_owners(module):
            if owner not in found:
                found.append(owner)
    if pipe is not None:
        found += [o for o in call_observers(pipe) if o not in found]
    return [p for p in found if isinstance(p, Part) and p.active]


class Handle:
    """What ``tiec.apply`` returns: the applied methods, their counters, and the way to remove them.

    A pipeline with tiec applied keeps per-call state (step cursor, feature caches, counters, ToMe's generator)
    in the parts of this handle, so one such pipeline object is not safe to call from several threads at once:
    give each thread its own pipeline (and its own ``tiec.apply``).

    Example:
        >>> with tiec.apply(pipe, tiec.EncoderPropagationConfig()) as handle:
        ...     image = pipe("a photo of a bag", num_inference_steps=50).images[0]
        >>> handle.stats["encoder_runs"]  # FasterDiffusion's 9 key steps of 50
        9
    """

    def __init__(self, target: Any, parts: list[Part]):
        self.target, self.parts = target, parts

    @property
    def active(self) -> bool:
        """False once ``remove()`` ran or a later ``tiec.apply`` replaced every method of this handle."""
        return any(part.active for part in self.parts)

    @property
    def stats(self) -> Mapping[str, int]:
        """Counters of the last pipeline call (or bare-UNet run), summed over the applied methods."""
        merged: dict[str, int] = {}
        for part in self.parts:
            for key, value in part.stats.items():
                merged[key] = max(merged.get(key, 0), value) if key == "unet_calls" else merged.get(key, 0) + value
        return merged

    @property
    def configs(self) -> tuple[Any, ...]:
        return tuple(part.config for part in self.parts)

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling loop of ``num_steps`` steps; needed before each loop of a bare UNet only.

        Example:
            >>> handle = tiec.apply(unet, tiec.EncoderPropagationConfig(key_steps="every:2"))
            >>> handle.start_run(len(scheduler.timesteps))  # 10 steps
            >>> sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
            >>> with torch.no_grad():
            ...     for t in scheduler.timesteps:
            ...         sample = scheduler.step(unet(sample, t, text).sample, t, sample).prev_sample
            >>> handle.stats["encoder_runs"]
            5
            >>> handle.remove()
        """
        for part in self.parts:
            if part.active:
                part.check_linked()
        for part in self.parts:
            part.start_run(num_steps)

    def remove(self) -> None:
        """Take every method of this handle off; the model is then exactly as before ``apply``.

        Idempotent. Raises ``RuntimeError``, changing nothing, where other code wrapped a tiec patch after
        ``apply`` in a way tiec cannot undo (accelerate's offload hooks are undone); remove that first.
        """
        for part in self.parts:
            part.check_removable()
        for part in reversed(self.parts):
            part.detach()

    def __enter__(self) -> "Handle":
        if not self.active:
            raise RuntimeError("tiec: this handle was removed (handle.remove(), the end of a `with` block, or a later "
                               "tiec.apply of the same config types); call tiec.apply again for a new handle")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.configs)

    def __repr__(self) -> str:
        return f"Handle({', '.join(repr(c) for c in self.configs)})"


def apply(target: Any, *configs: Any) -> Handle:
    """Apply acceleration configs to a diffusers pipeline (or a bare ``UNet2DConditionModel``).

    A config of a type already applied replaces the earlier one (whose handle then removes nothing);
    configs of different types compose. Encoder propagation and DeepCache both cache UNet features and
    cannot be combined.

    All or nothing: the new methods are installed first and the methods they replace are taken off only
    once every install succeeded. If any install fails, everything this call did is undone and the error
    propagates: the pipeline is exactly as before (its class, every module's attributes, its outputs),
    earlier methods included.

    accelerate's CPU offload (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``) works in
    either order with ``apply``, also through the removal and re-adding of hooks that model offload does
    after every call: tiec's patches sit beneath accelerate's hooks, and ``remove()`` leaves the hooks in
    place. Other code that wraps a patched ``forward`` after ``apply`` (diffusers' ``HookRegistry`` hooks,
    for one) has to go before tiec can: ``remove()`` says so, changing nothing. Code that replaces a
    patched method outright makes the next pipeline call raise ``RuntimeError``.

    Example:
        >>> handle = tiec.apply(pipe, tiec.EncoderPropagationConfig(key_steps="uniform:5", estimator="extrapolate"))
        >>> images = pipe(["sneaker", "bag"], num_inference_steps=20).images
        >>> handle.stats["encoder_runs"], len(images)
        (5, 2)
        >>> handle.remove()
        >>> handle.active
        False
    """
    registry = _registry()
    if not configs:
        raise ValueError(f"tiec.apply needs at least one config, one of {[c.__name__ for c in registry]}")
    for config in configs:
        if type(config) not in registry:
            raise TypeError(f"tiec.apply got {type(config).__name__}; expected one of "
                            f"{[c.__name__ for c in registry]}")
    types = [type(c) for c in configs]
    if len(set(types)) != len(types):
        raise ValueError(f"tiec.apply got two configs of the same type: {[t.__name__ for t in types]}")
    unet, pipe, named = _split_target(target)
    if known_class(unet) != "UNet2DConditionModel" or named is not None:
        for config in configs:
            if not isinstance(config, EncoderPropagationConfig):
                raise TypeError(f"{type(config).__name__} supports UNet2DConditionModel pipelines only; "
                                f"{type(unet).__name__} takes EncoderPropagationConfig")
    existing = applied_parts(unet, pipe)
    replaced = [p for p in existing if type(p.config) in types]
    kinds = set(types) | {type(p.config) for p in existing if p not in replaced}
    names = {t.__name__ for t in kinds}
    if {"EncoderPropagationConfig", "DeepCacheConfig"} <= names:
        raise ValueError("EncoderPropagationConfig and DeepCacheConfig cannot be combined: both cache UNet "
                         "features, in conflicting ways; apply one of them (remove the other first)")
    for part in replaced:
        part.check_removable()
    parts: list[Part] = []
    try:
        for config in configs:
            part = registry[type(config)](config, unet, pipe)
            part.named = named
            parts.append(part)  # before install: a part that fails halfway is undone too
            part.install()
    except BaseException as error:
        for part in reversed(parts):
            try:
                part.detach()
            except BaseException as undo_error:  # keep the original error; say what could not be undone
                if hasattr(error, "add_note"):
                    error.add_note(f"tiec could not undo {type(part).__name__}: {undo_error!r}")
        raise
    for part in replaced:
        part.detach()
    return Handle(target, parts)
