"""Redraw a frontier's ``grid.png`` from its ``results.jsonl`` alone, without the run's stored images.

``tiec bench`` draws the grid from the images it keeps under ``OUT/images``; a results folder committed without
them (``docs/results/frontier``) cannot be redrawn that way once a row is replaced. This script regenerates, for
every row of the file, the bench's first batch (seeds ``seed .. seed + batch_size - 1``, the same prompts and batch
size: the same computation as the row's own first batch), keeps the first ``--columns`` images, and draws the grid
in the bench's row order. ``auto:K`` rows run their recorded key steps (no calibration is needed); every other row
its frontier configuration. ``--check DIR`` compares the regenerated images with those a bench run stored in
``DIR/images`` (for the rows it holds) and prints the share of identical pixels.

Usage: python benchmarks/frontier_grid.py docs/results/frontier [--out DIR] [--check runs/o2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from tiec import EncoderPropagationConfig
from tiec.calibrate import default_guidance
from tiec.eval import methods as M
from tiec.eval.bench import BenchSettings, bench_prompts, generate, load_model, plan
from tiec.eval.report import write_grid
from tiec.eval.results import images_path, load_images, read_rows, save_images


def _configs(item, row: dict) -> list:
    """The row's configs, with ``auto:K`` replaced by the key steps the row ran."""
    if not item.schedule.key_steps.startswith("auto:"):
        return item.configs
    return [dataclasses.replace(c, key_steps=list(row["key_steps"])) if isinstance(c, EncoderPropagationConfig)
            else c for c in item.configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder with results.jsonl; grid.png is written there unless --out")
    parser.add_argument("--out", default=None, help="where to write grid.png (default: the folder)")
    parser.add_argument("--check", default=None, help="a bench --out folder whose stored images to compare with")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    rows = {r["row_key"]: r for r in read_rows(folder / "results.jsonl")}
    if not rows:
        raise SystemExit(f"no rows in {folder / 'results.jsonl'}")
    settings = BenchSettings.create(frontier=True)
    items = [item for item in plan(settings) if item.row_key in rows]
    unplanned = sorted(set(rows) - {item.row_key for item in items})
    if unplanned:
        raise SystemExit(f"rows not in the frontier's plan (other configs?): {unplanned[:5]}")
    pipe, _ = load_model(settings.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    prompts = bench_prompts(settings, pipe)
    guidance = default_guidance(pipe)
    base = pipe.scheduler.config
    first = list(range(settings.batch_size))
    ordered = []
    with tempfile.TemporaryDirectory() as scratch:
        for n, item in enumerate(items, 1):
            row = rows[item.row_key]
            pipe.scheduler = M.make_scheduler(item.schedule.sampler, base)
            g = generate(pipe, _configs(item, row), item.schedule.num_steps, prompts, first, settings.seed,
                         settings.batch_size, guidance, progress=False)
            images = g.images[:settings.grid_columns]
            save_images(images_path(scratch, row["schedule"], row["method"]), images, row["run_key"])
            ordered.append(row)
            line = f"{n}/{len(items)} {row['method']}@{row['schedule']}"
            if args.check:
                stored = load_images(images_path(args.check, row["schedule"], row["method"]))
                if stored is not None:
                    same = float(np.mean(stored[:len(images)] == images))
                    line += f"  identical to {args.check}: {same:.2%} of pixels"
            print(line, flush=True)
        out = Path(args.out) if args.out else folder
        out.mkdir(parents=True, exist_ok=True)
        write_grid(out / "grid.png", ordered, scratch, prompts, settings.seed, settings.grid_columns)
    print(f"wrote {out / 'grid.png'} ({len(ordered)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
