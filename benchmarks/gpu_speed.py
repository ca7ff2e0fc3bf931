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
import datetime
import gc
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tiec
from tiec.tome import first_attention_downsample

# This file is the command line; the parts sit next to it (on sys.path when run as a script):
# _gpu_models builds the pipelines, _gpu_measure times the methods, _gpu_report writes the report.
from _gpu_measure import METHODS, Table, fill_ratios, measure, wrapper_form_check
from _gpu_models import build_pipeline, model_spec, pipeline_inputs
from _gpu_report import MARKER, environment, fmt, render, report_json, write_text

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "gpu_speed.md"
TINY_OUT = Path(tempfile.gettempdir()) / "gpu_speed_tiny.md"  # the smoke test never replaces the GPU results


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
        write_text(out, prefix + render(tables, args, device, command, env, started, complete))
        if args.json:
            write_text(Path(args.json), json.dumps(report_json(tables, env, command), indent=1, default=str))

    print(f"{command}\n" + "".join(f"{k}: {v}\n" for k, v in env.items()), flush=True)
    for key in args.models:
        spec = model_spec(key, args.tiny)
        print(f"building {spec.title} ({args.dtype}, {device})", flush=True)
        pipe = build_pipeline(spec, device, dtype)
        args.tome_max_downsample = first_attention_downsample(pipe.unet) or 1
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
                    fill_ratios(table, eager_tables.get(batch))
                    print(f"{key} batch {batch}{' compiled' if compiled else ''} {method.name:<15} "
                          f"median {fmt(row.median, '.4f')} s  vs plain {fmt(row.ratio, '.3f')}  "
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


if __name__ == "__main__":
    sys.exit(main())
