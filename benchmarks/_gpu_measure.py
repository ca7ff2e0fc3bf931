"""The measurements of benchmarks/gpu_speed.py: the methods, and timing one of them on one pipeline.

``measure`` applies a method, warms up, times whole pipeline calls (device synchronised around each),
measures the time inside the UNet in further calls, removes the method and checks that the pipeline is
as it was; any failure becomes the row's status instead of an exception, so one broken method is one row.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import tiec


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its name and the tiec configs it applies (built inside ``measure``)."""

    name: str
    build: Callable[[argparse.Namespace], tuple]
    propagation: bool = False  # encoder propagation: fewer encoder runs than UNet calls expected


def _propagation(estimator: str, parallel: bool) -> Callable[[argparse.Namespace], tuple]:
    def build(args: argparse.Namespace) -> tuple:
        return (tiec.EncoderPropagationConfig(key_steps=args.key_steps, estimator=estimator, parallel=parallel,
                                              max_parallel=args.max_parallel),)
    return build


def _tome(args: argparse.Namespace) -> tiec.TokenMergingConfig:
    # ToMe's published setting merges at the highest-resolution attention level: max_downsample=1 on SD1.5,
    # 2 on SDXL (whose first level has no attention); run() sets it for each model
    return tiec.TokenMergingConfig(ratio=0.5, max_downsample=getattr(args, "tome_max_downsample", 1))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("plain", lambda args: ()),
    Method("reuse-serial", _propagation("reuse", False), propagation=True),
    Method("reuse-parallel", _propagation("reuse", True), propagation=True),
    Method("extrapolate", _propagation("extrapolate", True), propagation=True),
    Method("interpolate", _propagation("interpolate", True), propagation=True),
    Method("deepcache", lambda args: (tiec.DeepCacheConfig(cache_interval=3, cache_branch_id=0),)),
    Method("tome", lambda args: (_tome(args),)),
    Method("reuse+tome", lambda args: _propagation("reuse", True)(args) + (_tome(args),), propagation=True),
)}


class UNetTimer:
    """Wall time spent inside ``unet(...)`` calls, with the device synchronised on entry and exit.

    Wraps the module's ``__call__`` through a same-named subclass (so ``isinstance`` checks, ``torch.compile``
    of the module and tiec's patches on ``forward`` are all unaffected), and restores the class on exit. Calls
    nested inside an outer UNet call count once.
    """

    def __init__(self, unet: torch.nn.Module, sync: Callable[[], None]):
        self.unet, self.sync = unet, sync
        self.seconds, self.calls, self._depth = 0.0, 0, 0
        self._base: type | None = None

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __enter__(self) -> "UNetTimer":
        timer, base = self, type(self.unet)

        def __call__(module, *args, **kwargs):
            if timer._depth:
                return base.__call__(module, *args, **kwargs)
            timer.sync()
            start = time.perf_counter()
            timer._depth = 1
            try:
                return base.__call__(module, *args, **kwargs)
            finally:
                timer._depth = 0
                timer.sync()
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

        self._base = base
        self.unet.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                            "__qualname__": base.__qualname__})
        return self

    def __exit__(self, *exc) -> None:
        self.unet.__class__ = self._base


def fingerprint(pipe) -> list:
    """What applying and removing a method must leave unchanged: classes, instance ``forward``s, hook counts."""
    return [type(pipe)] + [(name, type(m), "forward" in vars(m), len(m._forward_hooks), len(m._forward_pre_hooks))
                           for name, m in pipe.unet.named_modules()]


@dataclass
class Row:
    """The measurements of one method on one model and batch."""

    method: str
    status: str = "ok"
    configs: str = ""
    times: list = field(default_factory=list)
    first_call_s: float | None = None
    unet_seconds: list = field(default_factory=list)
    unet_shares: list = field(default_factory=list)
    unet_calls: int | None = None
    stats: dict = field(default_factory=dict)
    peak_bytes: int | None = None
    ratio: float | None = None
    ratio_eager_plain: float | None = None
    graphs: int | None = None
    graph_breaks: int | None = None
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


@dataclass
class Table:
    """The rows of one model, batch and mode (eager or compiled)."""

    model: str
    title: str
    batch: int
    compiled: bool
    rows: list = field(default_factory=list)
    note: str = ""

    def row(self, method: str) -> Row | None:
        return next((r for r in self.rows if r.method == method), None)


def _dynamo_counts(clear: bool = False) -> tuple[int | None, int | None]:
    """Graphs compiled and graph breaks since the last clear (torch's private counters; None if they moved)."""
    try:
        from torch._dynamo.utils import counters
        if clear:
            counters.clear()
        return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))
    except Exception:
        return None, None


def timed_call(pipe, make_inputs: Callable[[], dict], sync: Callable[[], None]) -> float:
    """Seconds of one whole pipeline call, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    pipe(**make_inputs())
    sync()
    return time.perf_counter() - start


def _time_method(row: Row, pipe, make_inputs: Callable[[], dict], args: argparse.Namespace,
                 sync: Callable[[], None], compiled: bool, handle: Any) -> None:
    """Warm up, time ``args.repeats`` calls, then measure the UNet share in ``args.unet_repeats`` more."""
    for i in range(max(args.warmup, 2 if compiled else 1)):
        seconds = timed_call(pipe, make_inputs, sync)
        if i == 0:
            row.first_call_s = seconds
    if compiled:
        row.graphs, row.graph_breaks = _dynamo_counts()
    row.times = [timed_call(pipe, make_inputs, sync) for _ in range(args.repeats)]
    row.stats = dict(handle.stats) if handle is not None else {}
    if not args.unet_repeats:
        return
    with UNetTimer(pipe.unet, sync) as timer:
        if compiled:
            pipe(**make_inputs())  # the class swap is a new dynamo guard: recompile outside the measured calls
        for _ in range(args.unet_repeats):
            timer.reset()
            total = timed_call(pipe, make_inputs, sync)
            row.unet_seconds.append(timer.seconds)
            row.unet_shares.append(timer.seconds / total)
            row.unet_calls = timer.calls


def measure(pipe, method: Method, make_inputs: Callable[[], dict], args: argparse.Namespace,
            device: torch.device, compiled: bool, eager: Row | None) -> Row:
    """Apply ``method``, time it, remove it; any failure becomes the row's status instead of an exception."""
    row = Row(method.name)
    try:
        configs = method.build(args)
    except Exception as e:
        row.status = f"FAILED building the config: {type(e).__name__}: {e}"
        return row
    row.configs = ", ".join(repr(c) for c in configs) or "none"
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    before = fingerprint(pipe)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if compiled:
        torch._dynamo.reset()  # each method compiles from scratch, inside its own warm-up
        _dynamo_counts(clear=True)
    handle = None
    try:
        handle = tiec.apply(pipe, *configs) if configs else None
        with torch.inference_mode():
            _time_method(row, pipe, make_inputs, args, sync, compiled, handle)
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.status = f"FAILED: {type(e).__name__}: {message[:300]}"
        print(f"\n--- {method.name} failed ---", file=sys.stderr)
        traceback.print_exc()
    finally:
        if handle is not None:
            handle.remove()
    if device.type == "cuda":
        row.peak_bytes = torch.cuda.max_memory_allocated(device)
        if not row.ok:
            gc.collect()
            torch.cuda.empty_cache()
    if fingerprint(pipe) != before:
        row.notes.append("WARNING: the pipeline/UNet differs from before tiec.apply after handle.remove()")
    _annotate(row, method, bool(configs), compiled, eager)
    return row


def _annotate(row: Row, method: Method, applied: bool, compiled: bool, eager: Row | None) -> None:
    """Fill plain's counters and add notes: counter mismatches, extra counters, agreement with eager."""
    if not row.ok:
        return
    encoders = row.stats.get("encoder_runs")
    if method.propagation and encoders is not None and row.unet_calls is not None and encoders >= row.unet_calls:
        row.notes.append("no encoder skipped: every step is a key step at this step count (see --key-steps)")
    if not applied and row.unet_calls is not None:  # plain: every UNet call runs the whole UNet
        row.stats = {"unet_calls": row.unet_calls, "encoder_runs": row.unet_calls, "decoder_runs": row.unet_calls}
    if applied and row.unet_calls is not None and row.stats.get("unet_calls", row.unet_calls) != row.unet_calls:
        row.notes.append(f"stats['unet_calls']={row.stats['unet_calls']} but the pipeline made {row.unet_calls}")
    columns, rarely_used = ("unet_calls", "encoder_runs", "decoder_runs"), ("lookahead_runs", "controlnet_runs")
    extra = {k: v for k, v in row.stats.items() if k not in columns and (v or k not in rarely_used)}
    if extra:
        row.notes.append(", ".join(f"{k}={v}" for k, v in extra.items()))
    if compiled and eager is not None and eager.ok:
        differ = {k: v for k, v in row.stats.items() if eager.stats.get(k) != v}
        row.notes.append("counters match eager" if not differ else f"counters differ from eager: {differ}")


def fill_ratios(table: Table, eager_table: Table | None) -> None:
    """Each row's median against the plain row of ``table`` and, when compiled, of the eager ``eager_table``."""
    plain = table.row("plain")
    eager_plain = eager_table.row("plain") if eager_table is not None else None
    for row in table.rows:
        if row.ok and plain is not None and plain.ok:
            row.ratio = row.median / plain.median
        if table.compiled and row.ok and eager_plain is not None and eager_plain.ok:
            row.ratio_eager_plain = row.median / eager_plain.median


def wrapper_form_check(pipe, kwargs: dict) -> str:
    """Whether ``tiec.apply`` accepts a pipeline whose UNet is the ``torch.compile(pipe.unet)`` wrapper."""
    original = pipe.unet
    try:
        pipe.unet = torch.compile(original, **kwargs)  # wraps only: nothing compiles until it is called
        tiec.apply(pipe, tiec.EncoderPropagationConfig()).remove()
        verdict = "accepted"
    except Exception as e:
        verdict = f"rejected ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    finally:
        pipe.unet = original
    return f"The wrapper form `pipe.unet = torch.compile(pipe.unet)`: tiec.apply {verdict}."
