"""Reversible patches: wrap a method of one object, or observe the calls of one pipeline.

Removing a patch restores the object exactly: no leftover instance attribute, no wrapper left in
the chain, even when patches are removed out of order.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

_MISSING = object()


class Patch:
    """Replaces ``obj.<name>`` (an instance attribute shadowing the class method) by ``fn(inner, ...)``.

    ``owner`` is the tiec part that made the patch, so that ``tiec.apply`` can find what is applied.
    """

    def __init__(self, obj: Any, name: str, fn: Callable, owner: Any):
        self.obj, self.name, self.owner = obj, name, owner
        self.previous = obj.__dict__.get(name, _MISSING)
        self.inner = getattr(obj, name)

        @functools.wraps(self.inner)
        def patched(*args, **kwargs):
            return fn(self.inner, *args, **kwargs)

        patched.__tiec_patch__ = self
        setattr(obj, name, patched)
        self.patched = patched

    def remove(self) -> None:
        current = self.obj.__dict__.get(self.name, _MISSING)
        if current is self.patched:
            if self.previous is _MISSING:
                delattr(self.obj, self.name)
            else:
                setattr(self.obj, self.name, self.previous)
            return
        # Another patch was applied on top of this one: unlink this one from the chain.
        patch = getattr(current, "__tiec_patch__", None)
        while patch is not None and patch.previous is not self.patched:
            patch = getattr(patch.previous, "__tiec_patch__", None)
        if patch is not None:
            patch.previous, patch.inner = self.previous, self.inner


def patch_owners(obj: Any, name: str = "forward") -> list[Any]:
    """The owners of the tiec patches currently stacked on ``obj.<name>``, outermost first."""
    owners, current = [], obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
    while (patch := getattr(current, "__tiec_patch__", None)) is not None:
        owners.append(patch.owner)
        current = patch.previous
    return owners


def observe_calls(pipe: Any, observer: Any) -> Callable[[], None]:
    """Call ``observer.begin_call(pipe)`` before and ``observer.end_call(pipe)`` after every ``pipe(...)``.

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
                    obs.begin_call(self)
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
