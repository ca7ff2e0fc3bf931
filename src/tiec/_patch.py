"""Reversible patches: wrap a method of one object, or observe the calls of one pipeline.

Removing a patch restores the object exactly: no leftover instance attribute, no wrapper left in
the chain, even when patches are removed out of order.

accelerate's hooks (CPU offload) replace ``forward`` by a wrapper that calls ``module._old_forward``.
Either way round, the tiec patch ends up in ``_old_forward``: a module hooked before tiec is patched
there, beneath the hook, and a hook added after tiec stores the patch there. accelerate's own removal
and re-adding of hooks (diffusers' model offload does it after every call) keep it, and
:meth:`Patch.remove` relinks it. A patch that other code wrapped in a way tiec does not know cannot be
unlinked; :meth:`Patch.check_removable` says so before anything changes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

_MISSING = object()
_MAX_CHAIN = 256  # a guard against cycles in foreign wrappers' ``__wrapped__``


class Patch:
    """Replaces ``obj.<name>`` (an instance attribute shadowing the class method) by ``fn(inner, ...)``.

    ``owner`` is the tiec part that made the patch, so that ``tiec.apply`` can find what is applied.
    """

    def __init__(self, obj: Any, name: str, fn: Callable, owner: Any):
        self.obj, self.name, self.owner = obj, name, owner
        slot = name
        if name == "forward" and _is_accelerate_wrapper(obj, obj.__dict__.get(name)):
            # Beneath accelerate's hook, not above it: its remove_hook_from_module (run by remove_all_hooks, and
            # by diffusers' model offload after every pipeline call) makes ``_old_forward`` the forward again,
            # which would drop a patch above the hook; one beneath it stays, and gets inputs already placed.
            slot = "_old_forward"
        self.previous = obj.__dict__.get(slot, _MISSING)
        self.inner = getattr(obj, slot)

        @functools.wraps(self.inner)
        def patched(*args, **kwargs):
            return fn(self.inner, *args, **kwargs)

        patched.__tiec_patch__ = self
        self.patched = patched
        setattr(obj, slot, patched)

    def where(self) -> str:
        return f"{type(self.obj).__name__}.{self.name}"

    def _find(self) -> tuple[_Slot | None, Any] | None:
        """``(slot, wrapper)`` holding this patch in the chain, ``wrapper`` the callable that calls it; None if gone.

        ``slot`` is None when the patch is only reachable through a wrapper tiec cannot relink.
        """
        wrapper = None
        for slot, value in _links(self.obj, self.name):
            if value is self.patched:
                return slot, wrapper
            wrapper = value
        return None

    def linked(self) -> bool:
        """Whether this patch is still called by ``obj.<name>`` (other code may have replaced the method)."""
        return self._find() is not None

    def check_removable(self) -> None:
        """Raise ``RuntimeError`` if other code wrapped this patch in a way that :meth:`remove` cannot undo."""
        found = self._find()
        if found is not None and found[0] is None:
            raise RuntimeError(f"tiec cannot remove its patch of {self.where()}: other code wrapped it after "
                               f"tiec.apply ({_describe(found[1])}); remove that wrapper first, then remove or "
                               f"replace the tiec method")

    def remove(self) -> None:
        """Unlink this patch from the chain of ``obj.<name>``; nothing to do if other code already dropped it."""
        self.check_removable()
        found = self._find()
        if found is not None:
            found[0].unlink(self, found[1])


def _patch_of(value: Any) -> Patch | None:
    """The tiec patch whose wrapper ``value`` is (``functools.update_wrapper`` copies the marker: check it)."""
    patch = getattr(value, "__tiec_patch__", None)
    return patch if isinstance(patch, Patch) and patch.patched is value else None


def _is_accelerate_wrapper(obj: Any, value: Any) -> bool:
    """Whether ``value`` is the ``forward`` that accelerate's ``add_hook_to_module`` put on ``obj``.

    That wrapper calls ``obj._old_forward``, looked up at every call.
    """
    return isinstance(value, functools.partial) and bool(value.args) and value.args[0] is obj \
        and "_old_forward" in obj.__dict__ and getattr(value.func, "__module__", "").startswith("accelerate.")


def _describe(value: Any) -> str:
    fn = value.func if isinstance(value, functools.partial) else value
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class _Slot:
    """A place in a call chain that holds the next callable; ``unlink`` puts what a patch wrapped in its stead."""

    def unlink(self, patch: Patch, wrapper: Any) -> None:
        raise NotImplementedError


class _AttrSlot(_Slot):
    """The instance attribute ``obj.<name>`` itself."""

    def __init__(self, obj: Any, name: str):
        self.obj, self.name = obj, name

    def unlink(self, patch: Patch, wrapper: Any) -> None:
        if patch.previous is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, patch.previous)


class _PatchSlot(_Slot):
    """What a tiec patch wraps (a later patch on top of an earlier one)."""

    def __init__(self, upper: Patch):
        self.upper = upper

    def unlink(self, patch: Patch, wrapper: Any) -> None:
        self.upper.previous, self.upper.inner = patch.previous, patch.inner
        _rewrap(self.upper.patched, patch)


class _AccelerateSlot(_Slot):
    """``module._old_forward``, which accelerate's ``forward`` wrapper calls."""

    def __init__(self, obj: Any):
        self.obj = obj

    def unlink(self, patch: Patch, wrapper: Any) -> None:
        # without tiec, accelerate would have stored what the patch wrapped (the class method, bound)
        self.obj._old_forward = patch.inner
        _rewrap(wrapper, patch)


def _rewrap(wrapper: Any, patch: Patch) -> None:
    """Point ``wrapper``'s ``functools.update_wrapper`` metadata past ``patch``, which is leaving the chain."""
    attrs = getattr(wrapper, "__dict__", None)
    if attrs is None:
        return
    if attrs.get("__wrapped__") is patch.patched:
        attrs["__wrapped__"] = patch.inner
    if attrs.get("__tiec_patch__") is patch:  # a copy made by update_wrapper, not a patch of its own
        del attrs["__tiec_patch__"]


def _links(obj: Any, name: str) -> Iterator[tuple[_Slot | None, Any]]:
    """``(slot, callable)`` along the call chain of ``obj.<name>``, outermost first.

    Follows tiec patches, accelerate's hook wrapper and, through any other wrapper, ``__wrapped__``; the slot
    is None for a callable that only such a foreign wrapper holds (tiec cannot relink it).
    """
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        return
    slot, value = _AttrSlot(obj, name), attrs.get(name, _MISSING)
    for _ in range(_MAX_CHAIN):
        if value is _MISSING or value is None:
            return
        yield slot, value
        patch = _patch_of(value)
        if patch is not None:
            slot, value = _PatchSlot(patch), patch.previous
        elif name == "forward" and _is_accelerate_wrapper(obj, value):
            slot, value = _AccelerateSlot(obj), attrs.get("_old_forward", _MISSING)
        else:
            slot, value = None, getattr(value, "__wrapped__", _MISSING)


def patch_owners(obj: Any, name: str = "forward") -> list[Any]:
    """The owners of the tiec patches currently in the chain of ``obj.<name>``, outermost first."""
    return [patch.owner for _, value in _links(obj, name) if (patch := _patch_of(value)) is not None]


def observe_calls(pipe: Any, observer: Any) -> Callable[[], None]:
    """Call ``observer.begin_call(pipe, call_kwargs)`` before and ``observer.end_call(pipe)`` after every ``pipe(...)``.

    ``pipe(...)`` looks ``__call__`` up on the class, so the pipeline gets a same-named subclass whose
    ``__call__`` wraps the original; when the last observer goes, the original class is put back.
    Returns the function that removes this observer.
    """
    cls = type(pipe)
    if "__tiec_observers__" not in cls.__dict__:
        base = cls

        @functools.wraps(base.__call__)
        def __call__(self, *args, **kwargs):
            observers = list(type(self).__tiec_observers__)
            started = []
            try:
                for obs in observers:
                    obs.begin_call(self, kwargs)
                    started.append(obs)
                return base.__call__(self, *args, **kwargs)
            finally:
                for obs in reversed(started):
                    obs.end_call(self)

        cls = type(base.__name__, (base,), {"__call__": __call__, "__tiec_observers__": [], "__tiec_base__": base,
                                            "__module__": base.__module__, "__qualname__": base.__qualname__})
        pipe.__class__ = cls
    cls.__tiec_observers__.append(observer)

    def remove() -> None:
        if observer in cls.__tiec_observers__:
            cls.__tiec_observers__.remove(observer)
        if not cls.__tiec_observers__ and type(pipe) is cls:
            pipe.__class__ = cls.__tiec_base__

    return remove


def call_observers(pipe: Any) -> list[Any]:
    """The observers currently attached to a pipeline by :func:`observe_calls`."""
    return list(type(pipe).__dict__.get("__tiec_observers__", ()))
