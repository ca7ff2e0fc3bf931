"""GPU speed benchmark: whole diffusers pipeline calls, plain against every tiec method, in one run.

Builds the Stable Diffusion 1.5 and SDXL architectures (UNet and full-size VAE) with random weights
(speed does not depend on the weights), in fp16 on CUDA, inside the stock diffusers pipelines with
prompt embeddings passed directly (no tokenizer, no text encoder), and times whole pipeline calls
(DDIM, classifier-free guidance, VAE decode included) for: plain, reuse serial, reuse parallel,
extrapolate, interpolate, DeepCache, ToMe and reuse+ToMe. Every ratio is against the plain run of the
same model and batch in the same process. A method that cannot be built or fails is reported in its
row; the others still run. Results are written as markdown (``--out``) after every row, so a run that
is stopped early still leaves what it measured.

Examples:
    python benchmarks/gpu_speed.py                               # everything: both models, batch 1 and 4
    python benchmarks/gpu_speed.py --models sd15                 # the same in pieces, one report:
    python benchmarks/gpu_speed.py --models sdxl --batches 1 --append
    python benchmarks/gpu_speed.py --models sdxl --batches 4 --append
    python benchmarks/gpu_speed.py --models sd15 --batches 1 --compile --append   # torch.compile too
    python benchmarks/gpu_speed.py --tiny --threads 1 --steps 4 --key-steps 0,1 --repeats 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tiec

MARKER = "<!-- written by benchmarks/gpu_speed.py -->"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "gpu_speed.md"
TINY_OUT = Path(tempfile.gettempdir()) / "gpu_speed_tiny.md"  # the smoke test never replaces the GPU results

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)

# The tiny shapes of tests/conftest.py: the same code paths in seconds on a CPU.
TINY_SD_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=64, attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16)


# -- models --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One architecture to benchmark: its UNet and VAE configs and the shapes of its pipeline inputs."""

    key: str
    title: str
    xl: bool
    unet_config: dict
    vae_config: dict
    resolution: int
    guidance_scale: float
    text_dim: int
    pooled_dim: int = 0
    text_len: int = 77


def model_spec(key: str, tiny: bool) -> ModelSpec:
    """The SD1.5 (``"sd15"``) or SDXL (``"sdxl"``) architecture; ``tiny``: the small CPU stand-in."""
    from tiec.flops import SD15_UNET_CONFIG

    if key == "sd15":
        if tiny:
            return ModelSpec(key, "SD1.5-shaped tiny model", False, TINY_SD_UNET_CONFIG,
                             dict(TINY_VAE_CONFIG, sample_size=32), 32, 7.5, text_dim=32)
        return ModelSpec(key, "SD1.5 architecture", False, SD15_UNET_CONFIG,
                         dict(SD_VAE_CONFIG, sample_size=512), 512, 7.5, text_dim=768)
    if key == "sdxl":
        if tiny:
            return ModelSpec(key, "SDXL-shaped tiny model", True, TINY_SDXL_UNET_CONFIG,
                             dict(TINY_VAE_CONFIG, sample_size=32, force_upcast=False), 32, 5.0,
                             text_dim=64, pooled_dim=32)
        # force_upcast=False: the VAE decodes in fp16, as with the fp16-fixed SDXL VAE people deploy.
        return ModelSpec(key, "SDXL architecture", True, SDXL_UNET_CONFIG,
                         dict(SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
                         1024, 5.0, text_dim=2048, pooled_dim=1280)
    raise ValueError(f"--models: unknown model {key!r}; use sd15 and/or sdxl")


def build_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The stock diffusers pipeline of ``spec`` with random weights on ``device``, no text encoder or tokenizer."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds, not minutes, for 2.6 B parameters
        unet = UNet2DConditionModel(**spec.unet_config).eval()
        vae = AutoencoderKL(**spec.vae_config).eval()
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if spec.xl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(spec: ModelSpec, batch: int, steps: int, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> Callable[[], dict]:
    """A function returning the call arguments (fresh seeded generator each time, so every call is the same)."""
    g = torch.Generator().manual_seed(1234)

    def embeds(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    fixed = dict(prompt_embeds=embeds(batch, spec.text_len, spec.text_dim),
                 negative_prompt_embeds=embeds(batch, spec.text_len, spec.text_dim),
                 num_inference_steps=steps, guidance_scale=spec.guidance_scale, height=spec.resolution,
                 width=spec.resolution, output_type="np")
    if spec.xl:
        fixed.update(pooled_prompt_embeds=embeds(batch, spec.pooled_dim),
                     negative_pooled_prompt_embeds=embeds(batch, spec.pooled_dim))

    def make() -> dict:
        return dict(fixed, generator=torch.Generator(device).manual_seed(seed))
    return make


# -- methods -------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A method whose config cannot be built with this tiec (e.g. a peer not implemented yet)."""


def _peer(name: str, **kwargs) -> Any:
    cls = getattr(tiec, name, None)
    if cls is None:
        raise Unavailable(f"tiec.{name} does not exist in tiec {tiec.__version__}")
    return cls(**kwargs)


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its name and the tiec configs it applies (built late, so a missing peer is one row)."""

    name: str
    build: Callable[[argparse.Namespace], tuple]
    propagation: bool = False  # encoder propagation: fewer encoder runs than UNet calls expected


def _propagation(estimator: str, parallel: bool) -> Callable[[argparse.Namespace], tuple]:
    def build(args: argparse.Namespace) -> tuple:
        return (tiec.EncoderPropagationConfig(key_steps=args.key_steps, estimator=estimator, parallel=parallel,
                                              max_parallel=args.max_parallel),)
    return build


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("plain", lambda args: ()),
    Method("reuse-serial", _propagation("reuse", False), propagation=True),
    Method("reuse-parallel", _propagation("reuse", True), propagation=True),
    Method("extrapolate", _propagation("extrapolate", True), propagation=True),
    Method("interpolate", _propagation("interpolate", True), propagation=True),
    Method("deepcache", lambda args: (_peer("DeepCacheConfig", cache_interval=3, cache_branch_id=0),)),
    Method("tome", lambda args: (_peer("TokenMergingConfig", ratio=0.5),)),
    Method("reuse+tome", lambda args: _propagation("reuse", True)(args) + (_peer("TokenMergingConfig", ratio=0.5),),
           propagation=True),
)}

# (model, batch, method, reference method, largest allowed ratio of medians, description): end to end, eager.
TARGETS = (
    ("sd15", 1, "reuse-parallel", "plain", 0.30, "SD1.5 512 px batch 1: reuse parallel <= 0.30x plain"),
    ("sd15", 1, "extrapolate", "reuse-parallel", 1.02, "SD1.5 512 px batch 1: extrapolate within 2% of reuse parallel"),
    ("sdxl", 1, "reuse-parallel", "plain", 0.55, "SDXL 1024 px batch 1: reuse parallel <= 0.55x plain"),
)


# -- measuring -----------------------------------------------------------------------------------------
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
    except Unavailable as e:
        row.status = f"UNAVAILABLE: {e}"
        return row
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


# -- reporting -----------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table, device: torch.device) -> list[str]:
    """One table as markdown lines: a heading, the compile note if any, one row per method."""
    compiled = " — `pipe.unet` under torch.compile" if table.compiled else ""
    lines = [f"### {table.title}, batch {table.batch}{compiled}", ""] + ([table.note, ""] if table.note else [])
    head = ["method", "median s", "vs plain", "min s", "max s", "UNet s", "UNet share", "peak GiB",
            "UNet calls", "encoder runs", "decoder runs"]
    if table.compiled:
        head += ["vs eager plain", "first call s", "graphs", "graph breaks"]
    head.append("status")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        mem = "n/a" if device.type != "cuda" else _fmt(None if r.peak_bytes is None else r.peak_bytes / 2**30, ".2f")
        cells = [r.method, _fmt(r.median, ".3f"), _fmt(r.ratio, ".3f"), _fmt(min(r.times, default=None), ".3f"),
                 _fmt(max(r.times, default=None), ".3f"),
                 _fmt(statistics.median(r.unet_seconds) if r.unet_seconds else None, ".3f"),
                 _fmt(statistics.median(r.unet_shares) if r.unet_shares else None, ".1%"), mem,
                 _fmt(r.unet_calls, "d"), _fmt(r.stats.get("encoder_runs"), "d"),
                 _fmt(r.stats.get("decoder_runs"), "d")]
        if table.compiled:
            cells += [_fmt(r.ratio_eager_plain, ".3f"), _fmt(r.first_call_s, ".2f"), _fmt(r.graphs, "d"),
                      _fmt(r.graph_breaks, "d")]
        cells.append(_cell("; ".join([r.status] + r.notes)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def evaluate_targets(tables: list[Table], args: argparse.Namespace, device: torch.device) -> list[str]:
    """The speed targets with PASS/FAIL, from the eager tables; only for the setting they are defined in."""
    lines = ["## Targets", ""]
    if device.type != "cuda" or args.tiny or args.dtype != "float16" or args.steps != 50 \
            or args.key_steps != "faster-diffusion":
        lines += ["Not evaluated: the targets are for the full-size fp16 models on CUDA, DDIM 50 steps, "
                  "FasterDiffusion key steps (this run: "
                  f"{'tiny models' if args.tiny else 'full-size models'} in {args.dtype} on {device.type}, "
                  f"{args.steps} steps, key steps {args.key_steps})."]
        for *_, text in TARGETS:
            lines.append(f"- {text}")
        return lines + [""]
    lines += ["| target | measured | verdict |", "|---|---|---|"]
    for model, batch, method, against, limit, text in TARGETS:
        table = next((t for t in tables if t.model == model and t.batch == batch and not t.compiled), None)
        a = table.row(method) if table else None
        b = table.row(against) if table else None
        if a is None or b is None:
            lines.append(f"| {text} | not run | - |")
        elif not (a.ok and b.ok):
            lines.append(f"| {text} | failed | FAIL |")
        else:
            ratio = a.median / b.median
            lines.append(f"| {text} | {ratio:.3f}x {against} | {'PASS' if ratio <= limit else 'FAIL'} |")
    return lines + [""]


def environment(device: torch.device) -> dict[str, str]:
    """Device, library versions and the tiec commit, for the report's header."""
    import diffusers

    env = {"device": (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
                      if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, "
                                                     f"torch threads: {torch.get_num_threads()})"),
           "torch": torch.__version__, "diffusers": diffusers.__version__, "tiec": tiec.__version__,
           "python": platform.python_version()}
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            env["tiec commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    except Exception:
        pass
    return env


def render(tables: list[Table], args: argparse.Namespace, device: torch.device, command: str,
           env: dict[str, str], started: str, complete: bool) -> str:
    """The markdown section of this run: command, environment, what is measured, one table each, targets."""
    dtype = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    lines = [MARKER, f"## Run of {started}", ""]
    if not complete:
        lines += ["**Incomplete: the run was still going (or was stopped) when this file was written.**", ""]
    lines += [f"- Command: `{command}`"] + [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        f"- Setup: {'tiny stand-in models (CPU smoke test, not a speed result)' if args.tiny else 'full-size'} "
        f"random-weight UNets and VAEs in {dtype}, stock diffusers pipelines, prompt embeddings given directly "
        f"(77 tokens), DDIM {args.steps} steps, classifier-free guidance on (SD1.5 7.5, SDXL 5.0), "
        f"`output_type=\"np\"` (VAE decode included), key steps `{args.key_steps}`, max_parallel {args.max_parallel}.",
        f"- Timing: {max(args.warmup, 1)} warm-up call(s) ({max(args.warmup, 2)} under torch.compile), then the "
        f"median of {args.repeats} whole pipeline calls, device synchronised before and after each; `vs plain` is "
        f"the ratio of medians against the plain row of the same table, measured in this run.",
        f"- UNet s / UNet share: wall time inside the `pipe.unet(...)` calls (device synchronised at entry and exit "
        f"of each call) and its share of the whole call, median over {args.unet_repeats} further calls made only for "
        f"this, so the extra synchronisations do not touch the timings above. With encoder propagation it includes "
        f"the batched decoders and interpolate's look-ahead encoder passes (they run inside UNet calls); the rest "
        f"is the scheduler, the guidance arithmetic, the VAE decode and Python overhead.",
        "- peak GiB: `torch.cuda.max_memory_allocated`, reset before each method (model weights included).",
        "- UNet calls: counted calls of `pipe.unet` per pipeline call; encoder/decoder runs: `handle.stats` of the "
        "last call (for plain, every call runs both).",
        "- Methods (tiec configs applied):"]
    lines += [f"  - `{name}`: `{row.configs or '-'}`" for name, row in _method_configs(tables).items()]
    lines.append("")
    for table in tables:
        lines += table_markdown(table, device)
    if complete:
        lines += evaluate_targets(tables, args, device)
    return "\n".join(lines) + "\n"


def _method_configs(tables: list[Table]) -> dict[str, Row]:
    seen: dict[str, Row] = {}
    for table in tables:
        for row in table.rows:
            if row.method not in seen or (not seen[row.method].configs and row.configs):
                seen[row.method] = row
    return seen


def write_report(path: Path, prefix: str, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(prefix + text)
    os.replace(tmp, path)


def report_json(tables: list[Table], env: dict[str, str], command: str) -> dict:
    return {"command": command, "environment": env,
            "tables": [dict(model=t.model, title=t.title, batch=t.batch, compiled=t.compiled,
                            rows=[dict(dataclasses.asdict(r), median=r.median) for r in t.rows]) for t in tables]}


# -- command line ----------------------------------------------------------------------------------------
def _key_steps(text: str) -> Any:
    if text.replace(",", "").replace(" ", "").isdigit():
        return [int(s) for s in text.split(",")]
    return text


def _csv(choices: Sequence[str], label: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{label}: {bad or text!r} not known; choose from {', '.join(choices)}")
        return items
    return parse


def _batches(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batches={text!r}: expected comma-separated positive integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batches={text!r}: expected comma-separated positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Examples:"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(("sd15", "sdxl"), "--models"), default=["sd15", "sdxl"],
                   help="comma-separated: sd15, sdxl (default both)")
    p.add_argument("--batches", type=_batches, default=[1, 4], help="images per prompt batch (default 1,4)")
    p.add_argument("--methods", type=_csv(tuple(METHODS), "--methods"), default=list(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)} (default all; plain always runs)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--key-steps", type=_key_steps, default="faster-diffusion",
                   help="encoder propagation key steps: a schedule name or indices like 0,1 (default faster-diffusion)")
    p.add_argument("--max-parallel", type=int, default=None, help="cap on batched decoder steps (default none)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per method first (default 1; at least 1 is made, 2 when compiled)")
    p.add_argument("--unet-repeats", type=int, default=2,
                   help="further calls measuring the time inside the UNet (default 2; 0: skip)")
    p.add_argument("--compile", action="store_true", help="also run every method with pipe.unet.compile()")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (default none)")
    p.add_argument("--tiny", action="store_true", help="tiny models in fp32 at 32 px: a CPU smoke test of this script")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for this run (default: unchanged); 1 avoids oversubscribing a busy CPU")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default float16 on CUDA, float32 on CPU or with --tiny")
    p.add_argument("--out", default=None, help=f"markdown report (default docs/results/gpu_speed.md of this "
                                                f"repository; with --tiny, {TINY_OUT})")
    p.add_argument("--append", action="store_true",
                   help="add this run's report to --out if it holds earlier results of this script (else replace it)")
    p.add_argument("--json", default=None, help="also write the measurements as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every plain baseline ran, 1 otherwise, 2 on bad arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            print(f"gpu_speed.py: error: --{name}={getattr(args, name)} must be >= 1", file=sys.stderr)
            return 2
    if args.warmup < 0 or args.unet_repeats < 0:
        print("gpu_speed.py: error: --warmup and --unet-repeats must be >= 0", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and not args.tiny:
            print("gpu_speed.py: error: no CUDA device; the full-size models are meant for a GPU. Use --tiny for the "
                  "CPU smoke test, or --device cpu to force full size on the CPU (very slow).", file=sys.stderr)
            return 2
    else:
        device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "float16" if device.type == "cuda" and not args.tiny else "float32"
    dtype = getattr(torch, args.dtype)
    try:
        tiec.schedules.validate(args.key_steps)
    except ValueError as e:
        print(f"gpu_speed.py: error: --key-steps: {e}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"gpu_speed.py: error: --threads={args.threads} must be >= 1", file=sys.stderr)
        return 2
    command = "python benchmarks/gpu_speed.py" + "".join(" " + shlex.quote(a) for a in argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args, device, dtype, command)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, command: str) -> int:
    """Every model, batch and method of ``args``; writes the report as it goes. 0 if every plain baseline ran."""
    methods = [METHODS["plain"]] + [METHODS[m] for m in args.methods if m != "plain"]
    env = environment(device)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out) if args.out else (TINY_OUT if args.tiny else DEFAULT_OUT)
    prefix = ""
    if out.exists():
        old = out.read_text()
        if args.append and old.startswith("# ") and MARKER in old:
            prefix = old.rstrip("\n") + "\n\n"
    if not prefix:
        prefix = "# GPU speed benchmark: SD1.5 and SDXL architectures, every tiec method\n\n"
    tables: list[Table] = []

    def save(complete: bool) -> None:
        write_report(out, prefix, render(tables, args, device, command, env, started, complete))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report_json(tables, env, command), indent=1, default=str))

    print(f"{command}\n" + "".join(f"{k}: {v}\n" for k, v in env.items()), flush=True)
    for key in args.models:
        spec = model_spec(key, args.tiny)
        print(f"building {spec.title} ({args.dtype}, {device})", flush=True)
        pipe = build_pipeline(spec, device, dtype)
        eager_tables: dict[int, Table] = {}
        for compiled in ((False, True) if args.compile else (False,)):
            compile_note = ""
            if compiled:
                kwargs = {"backend": args.compile_backend, **({"mode": args.compile_mode} if args.compile_mode else {})}
                call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
                compile_note = (f"Compiled in place with `pipe.unet.compile({call})`, then tiec applied on top. "
                                f"{wrapper_form_check(pipe, kwargs)}")
                try:
                    pipe.unet.compile(**kwargs)
                except Exception as e:
                    print(f"torch.compile unavailable: {type(e).__name__}: {e}", file=sys.stderr)
                    break
            for batch in args.batches:
                latent = spec.resolution // 2 ** (len(spec.vae_config["block_out_channels"]) - 1)
                title = f"{spec.title}, {spec.resolution} px ({latent}x{latent} latents)"
                table = Table(key, title, batch, compiled, note=compile_note)
                tables.append(table)
                if not compiled:
                    eager_tables[batch] = table
                make_inputs = pipeline_inputs(spec, batch, args.steps, device, dtype)
                for method in methods:
                    eager = eager_tables[batch].row(method.name) if compiled else None
                    row = measure(pipe, method, make_inputs, args, device, compiled, eager)
                    table.rows.append(row)
                    _fill_ratios(table, eager_tables.get(batch))
                    print(f"{key} batch {batch}{' compiled' if compiled else ''} {method.name:<15} "
                          f"median {_fmt(row.median, '.4f')} s  vs plain {_fmt(row.ratio, '.3f')}  "
                          f"encoders {row.stats.get('encoder_runs', '-')}/{row.unet_calls or '-'}  {row.status}",
                          flush=True)
                    save(complete=False)
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.compile:
            torch._dynamo.reset()
    save(complete=True)
    report = render(tables, args, device, command, env, started, complete=True)
    print("\n" + report)
    print(f"written: {out}" + (f" and {args.json}" if args.json else ""))
    plain_ok = all(t.row("plain") is not None and t.row("plain").ok for t in tables if not t.compiled)
    return 0 if tables and plain_ok else 1


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


def _fill_ratios(table: Table, eager_table: Table | None) -> None:
    plain = table.row("plain")
    eager_plain = eager_table.row("plain") if eager_table is not None else None
    for row in table.rows:
        if row.ok and plain is not None and plain.ok:
            row.ratio = row.median / plain.median
        if table.compiled and row.ok and eager_plain is not None and eager_plain.ok:
            row.ratio_eager_plain = row.median / eager_plain.median


if __name__ == "__main__":
    sys.exit(main())
