"""``tiec bench``'s generation: the model and prompts of a run, and one row's images with their timings, UNet
FLOPs and counters.

Image ``i`` is generated from prompt ``i`` with its own generator seeded ``seed + i``, so images depend neither
on the batch size nor on how the seeds are sharded across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .dist import synchronize
from .fid import to_uint8
from .results import atomic_write, digest
from .settings import BenchSettings

@dataclass
class Generation:
    """One process's share of a row: its images and what was measured while making them."""

    indices: list[int]
    images: np.ndarray | None
    seconds_per_image: list[float] = field(default_factory=list)
    gflops_per_image: float | None = None
    stats: dict[str, int] = field(default_factory=dict)
    samples: np.ndarray | None = None  # the demo's uncropped 32x32 samples (uint8), for the speckle figure
    key_steps: tuple[int, ...] | None = None  # the key steps of the first batch's loop (encoder propagation)


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
        # by content, not by file date: a reinstall or a copy of the same weights resumes the same runs
        sha = hashlib.sha256()
        for name in ("unet.safetensors", "config.json"):
            path = WEIGHTS_DIR / name
            sha.update(path.read_bytes() if path.is_file() else b"")
        return pipe, f"demo:sha256:{sha.hexdigest()[:20]}"
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
             label: str = "", keep_samples: bool = False, partial: str | os.PathLike | None = None,
             partial_key: str = "") -> Generation:
    """Generate the images ``indices`` with ``configs`` applied; time the calls and count the UNet FLOPs.

    The first batch is the warm-up: it runs under ``tiec.flops.flop_counter()`` (FLOPs per image = its
    UNet FLOPs / its size) and is not timed. The other batches are timed with the device synchronised;
    with a single batch, it is run once more for the timing. ``keep_samples`` (demo pipelines only): also
    keep each image's uncropped 32x32 sample in ``Generation.samples`` (for ``frame_speckle``).

    ``partial``: a file where everything measured so far is saved after each batch, so that an interrupted
    row resumes at the next batch (``partial_key`` names the run and row; a file written for another key,
    other indices or another batch size is ignored; its timings are dropped when the device or thread count
    differ). The first batch after a resume is a warm-up again, not timed; a row left without a timed batch
    times its last batch once more. The caller deletes the file once the row is stored.

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
    key = digest([partial_key, batches], 24)
    where = f"{device}/{torch.get_num_threads()} threads"
    state = _load_partial(partial, key) if partial is not None else None
    if state is None:
        state = _Partial(where=where)
    elif state.where != where:  # the images stand; timings on another device or thread count do not
        state.seconds_per_image, state.where = [], where
    out, samples, per_image = state.images, state.samples, state.seconds_per_image
    resumed = len(out) > 0
    try:
        with torch.no_grad():
            if not out and any(str(getattr(c, "key_steps", "")).startswith("auto:") for c in configs):
                # "auto:K" measures its calibration in its first call when none is stored: not in the counted
                # batch, so one image first (uncounted, discarded)
                _call(pipe, prompts, batches[0][:1], num_steps, seed, guidance_scale)
            for b in tqdm(range(len(out), len(batches)), desc=f"generate {label}".strip(), unit="batch",
                          initial=len(out), total=len(batches), disable=not progress or len(batches) < 2,
                          leave=False):
                batch = batches[b]
                if resumed:  # a fresh process: its first call is a warm-up like batch 0, not a timing
                    images, kept = _call(pipe, prompts, batch, num_steps, seed, guidance_scale, keep_samples)
                    resumed = False
                elif b == 0:
                    with flop_counter() as counter:
                        images, kept = _call(pipe, prompts, batch, num_steps, seed, guidance_scale, keep_samples)
                    state.gflops = unet_flops(counter, pipe) / len(batch) / 1e9
                    state.key_steps = next((p.last_key_steps for p in handle.parts
                                            if hasattr(p, "last_key_steps")), None) if handle is not None else None
                else:
                    (images, kept), seconds = _timed(device, lambda: _call(pipe, prompts, batch, num_steps, seed,
                                                                           guidance_scale, keep_samples))
                    per_image.append(seconds / len(batch))
                out.append(images)
                samples.append(kept)
                state.stats = dict(handle.stats) if handle is not None else {}
                if partial is not None:
                    _save_partial(partial, key, state)
            if not per_image:  # one batch, or a resume left none timed: time the last batch once more
                _, seconds = _timed(device, lambda: _call(pipe, prompts, batches[-1], num_steps, seed, guidance_scale))
                per_image.append(seconds / len(batches[-1]))
    finally:
        if handle is not None:
            handle.remove()
    kept_all = np.concatenate(samples) if keep_samples and all(k is not None for k in samples) else None
    return Generation(indices, np.concatenate(out), per_image, state.gflops, state.stats, kept_all, state.key_steps)


def _timed(device: Any, call: Callable[[], Any]) -> tuple[Any, float]:
    """``call()``'s result and its wall time in seconds, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


@dataclass
class _Partial:
    """What ``generate`` has measured after some batches (one entry per batch in ``images`` and ``samples``)."""

    images: list[np.ndarray] = field(default_factory=list)
    samples: list[np.ndarray | None] = field(default_factory=list)
    seconds_per_image: list[float] = field(default_factory=list)
    gflops: float | None = None
    stats: dict[str, int] = field(default_factory=dict)  # the last call's counters
    key_steps: tuple[int, ...] | None = None
    where: str = ""  # device and thread count of the timings


def _save_partial(path: str | os.PathLike, key: str, state: _Partial) -> None:
    path = Path(path)
    meta = dict(key=key, where=state.where, batches=len(state.images), seconds_per_image=state.seconds_per_image,
                gflops=state.gflops, stats=state.stats,
                key_steps=None if state.key_steps is None else list(state.key_steps),
                samples=all(s is not None for s in state.samples))
    arrays = {f"images{i}": a for i, a in enumerate(state.images)}
    if meta["samples"]:
        arrays.update({f"samples{i}": a for i, a in enumerate(state.samples)})
    for attempt in range(3):  # another run on this OUT may remove the empty folder between mkdir and the write
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda f: np.savez(f, meta=json.dumps(meta), **arrays))
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def _load_partial(path: str | os.PathLike, key: str) -> _Partial | None:
    """The batches saved by an interrupted ``generate`` with the same key, or None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("key") != key:
                return None
            n = meta["batches"]
            images = [data[f"images{i}"] for i in range(n)]
            samples = [data[f"samples{i}"] if meta["samples"] else None for i in range(n)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, torn or foreign: start afresh
        return None
    key_steps = meta["key_steps"]
    return _Partial(images, samples, list(meta["seconds_per_image"]), meta["gflops"], dict(meta["stats"]),
                    None if key_steps is None else tuple(key_steps), meta.get("where", ""))
