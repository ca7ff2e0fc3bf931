"""Redraw a committed frontier (``report.md``, ``grid.png``, ``pareto.png``, ``frontier.png``) from its
``results.jsonl`` alone, without the run's stored images; optionally replace some of its rows first.

``tiec bench`` writes its report from ``OUT/results.jsonl`` and draws the grid from the images it keeps under
``OUT/images``. A results folder committed without the images (``docs/results/frontier``) cannot be redrawn that way
once a row is replaced (say, rerun after a calibration change): the bench would regenerate all 1,000 images of every
row. This script

- with ``--replace FILE``: takes the rows of FILE (another ``tiec bench`` run of the same protocol: same run key)
  whose row keys the folder holds, and writes the folder's ``results.jsonl`` with them in place of the old ones;
- regenerates, for every row, the bench's first batch (seeds ``seed .. seed + batch_size - 1``, the same prompts
  and batch size: the same computation as the row's own first batch) and keeps the first ``grid_columns`` images
  (``auto:K`` rows run their recorded key steps: no calibration is needed);
- writes the report as ``tiec bench --frontier`` does (its notes, the seed spread from the folder's
  ``spread-*.jsonl``, the rows in the frontier's order) and copies it and the figures into the folder.

``--check DIR`` compares the regenerated images with those a bench run stored in ``DIR/images`` (for the rows it
holds) and prints the share of identical pixels.

Usage: python benchmarks/frontier_redraw.py docs/results/frontier [--replace runs/o2/results.jsonl]
       [--check runs/o2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from tiec import EncoderPropagationConfig
from tiec.calibrate import default_guidance
from tiec.eval import methods as M
from tiec.eval.bench import BenchSettings, _notes, _reference_speckle, bench_prompts, generate, load_model, plan
from tiec.eval.report import fid_spread, write_report
from tiec.eval.results import atomic_write, images_path, load_images, read_rows, save_images


def _configs(item, row: dict) -> list:
    """The row's configs, with ``auto:K`` replaced by the key steps the row ran."""
    if not item.schedule.key_steps.startswith("auto:"):
        return item.configs
    return [dataclasses.replace(c, key_steps=list(row["key_steps"])) if isinstance(c, EncoderPropagationConfig)
            else c for c in item.configs]


def _replaced(rows: dict[str, dict], path: Path) -> list[str]:
    """Put the rows of ``path`` with the same run key and a row key of ``rows`` in their place; their keys."""
    run_keys = {r["run_key"] for r in rows.values()}
    new = {r["row_key"]: r for r in read_rows(path) if r.get("run_key") in run_keys and r.get("row_key") in rows}
    rows.update(new)
    return sorted(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder with results.jsonl (and spread-*.jsonl)")
    parser.add_argument("--replace", default=None, help="results.jsonl of a run whose rows replace the folder's")
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
    if args.replace:
        print(f"replaced from {args.replace}: {_replaced(rows, Path(args.replace)) or 'nothing'}")
    pipe, _ = load_model(settings.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    prompts = bench_prompts(settings, pipe)
    guidance = default_guidance(pipe)
    base = pipe.scheduler.config
    first = list(range(settings.batch_size))
    ordered = [rows[item.row_key] for item in items]
    with tempfile.TemporaryDirectory() as scratch:
        for n, (item, row) in enumerate(zip(items, ordered), 1):
            pipe.scheduler = M.make_scheduler(item.schedule.sampler, base)
            g = generate(pipe, _configs(item, row), item.schedule.num_steps, prompts, first, settings.seed,
                         settings.batch_size, guidance, progress=False)
            images = g.images[:settings.grid_columns]
            save_images(images_path(scratch, row["schedule"], row["method"]), images, row["run_key"])
            line = f"{n}/{len(items)} {row['method']}@{row['schedule']}"
            stored = load_images(images_path(args.check, row["schedule"], row["method"])) if args.check else None
            if stored is not None:
                line += f"  identical to {args.check}: {float(np.mean(stored[:len(images)] == images)):.2%} of pixels"
            print(line, flush=True)
        spread_rows = [r for path in sorted(folder.glob("spread-*.jsonl")) for r in read_rows(path)]
        spread = fid_spread([r for r in ordered if r["method"] == "full"] + spread_rows)
        notes = _notes(settings, ordered[0]["settings"]["reference"], True, _reference_speckle(settings))
        write_report(scratch, ordered, prompts=prompts, seed=settings.seed, columns=settings.grid_columns,
                     notes=notes, spread=spread)
        for name in ("report.md", "grid.png", "pareto.png", "frontier.png"):
            shutil.copyfile(Path(scratch) / name, folder / name)
    text = "".join(json.dumps(r) + "\n" for r in rows.values()).encode()  # in the file's order
    atomic_write(folder / "results.jsonl", lambda f: f.write(text))
    print(f"wrote {folder}: results.jsonl, report.md and the figures ({len(ordered)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
