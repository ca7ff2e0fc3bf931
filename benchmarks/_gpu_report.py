"""The report of benchmarks/gpu_speed.py: markdown tables, the speed targets, the environment, JSON.

Both files are written with ``tiec.eval.results.atomic_write`` (temporary file, fsync, rename), so a run
stopped while writing leaves the previous complete report, never a torn one.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import subprocess
from pathlib import Path

import torch

import tiec
from tiec.eval.results import atomic_write

from _gpu_measure import Row, Table

MARKER = "<!-- written by benchmarks/gpu_speed.py -->"

# (model, batch, method, reference method, largest allowed ratio of medians, description): end to end, eager.
TARGETS = (
    ("sd15", 1, "reuse-parallel", "plain", 0.30, "SD1.5 512 px batch 1: reuse parallel <= 0.30x plain"),
    ("sd15", 1, "extrapolate", "reuse-parallel", 1.02, "SD1.5 512 px batch 1: extrapolate within 2% of reuse parallel"),
    ("sdxl", 1, "reuse-parallel", "plain", 0.55, "SDXL 1024 px batch 1: reuse parallel <= 0.55x plain"),
)


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None."""
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
        mem = "n/a" if device.type != "cuda" else fmt(None if r.peak_bytes is None else r.peak_bytes / 2**30, ".2f")
        cells = [r.method, fmt(r.median, ".3f"), fmt(r.ratio, ".3f"), fmt(min(r.times, default=None), ".3f"),
                 fmt(max(r.times, default=None), ".3f"),
                 fmt(statistics.median(r.unet_seconds) if r.unet_seconds else None, ".3f"),
                 fmt(statistics.median(r.unet_shares) if r.unet_shares else None, ".1%"), mem,
                 fmt(r.unet_calls, "d"), fmt(r.stats.get("encoder_runs"), "d"),
                 fmt(r.stats.get("decoder_runs"), "d")]
        if table.compiled:
            cells += [fmt(r.ratio_eager_plain, ".3f"), fmt(r.first_call_s, ".2f"), fmt(r.graphs, "d"),
                      fmt(r.graph_breaks, "d")]
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
    for name, configs in _method_configs(tables).items():
        if len(configs) == 1:
            lines.append(f"  - `{name}`: `{next(iter(configs)) or '-'}`")
        else:  # set per model (ToMe's max_downsample)
            lines.append(f"  - `{name}`: " + "; ".join(f"`{config or '-'}` ({', '.join(models)})"
                                                      for config, models in configs.items()))
    lines.append("")
    for table in tables:
        lines += table_markdown(table, device)
    if complete:
        lines += evaluate_targets(tables, args, device)
    return "\n".join(lines) + "\n"


def _method_configs(tables: list[Table]) -> dict[str, dict[str, list[str]]]:
    """Each method's configs as run, with the models that ran each (a failed build has none: left out if another
    table has one)."""
    seen: dict[str, dict[str, list[str]]] = {}
    for table in tables:
        for row in table.rows:
            models = seen.setdefault(row.method, {}).setdefault(row.configs, [])
            if table.model not in models:
                models.append(table.model)
    for configs in seen.values():
        if len(configs) > 1:
            configs.pop("", None)
    return seen


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (parent folders created) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def report_json(tables: list[Table], env: dict[str, str], command: str) -> dict:
    """The measurements as JSON-ready data: the command, the environment, every table and row."""
    return {"command": command, "environment": env,
            "tables": [dict(model=t.model, title=t.title, batch=t.batch, compiled=t.compiled,
                            rows=[dict(dataclasses.asdict(r), median=r.median) for r in t.rows]) for t in tables]}
