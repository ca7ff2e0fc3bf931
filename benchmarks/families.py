"""Encoder propagation beyond Stable Diffusion: exact denoiser FLOPs per model family, and tiec side by side with
diffusers' own caches on the tiny transformer pipelines.

Table 1a: full-size architectures (DiT-XL/2 256 px, PixArt-alpha XL 512 px, SD3-medium 1024 px, Flux.1-dev
1024 px, the SD1.5 UNet 512 px) built on the ``meta`` device (shapes only: no memory, no arithmetic), each
called as a bare model once per step of a ``--steps`` loop (guided batch of 2; Flux batch 1, its guidance is an
embedding), plain and with ``tiec.EncoderPropagationConfig`` (the default encoder: ``k = round(18/28 * blocks)``
for transformers, ``conv_in`` + down blocks + mid block for UNets). FLOPs by ``tiec.flops.flop_counter()``.

Table 1b: every family of ``tiec.tiny`` (random weights), one real pipeline call of ``--steps`` steps, FLOPs of
the denoiser module only (``counter.get_flop_counts()[<denoiser class>]``), plain and accelerated.

Table 2: the tiny DiT, PixArt-alpha, SD3 and Flux pipelines: tiec's estimators and diffusers'
``FirstBlockCacheConfig`` / ``TaylorSeerCacheConfig`` / ``MagCacheConfig`` (``transformer.enable_cache``), each row
with its exact denoiser FLOPs ratio, the PSNR of its images against the plain pipeline's (same seeds) and its
wall-clock ratio measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/families.py --threads 1 --out docs/results/families.md
    OMP_NUM_THREADS=1 python benchmarks/families.py --quick --out /tmp/families.md   # smoke run (~15 s)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tiec
from tiec import families, schedules, tiny
from tiec.flops import SD15_UNET_CONFIG, flop_counter

FD = "faster-diffusion"
CACHE_FAMILIES = ("dit", "pixart", "sd3", "flux")
PIPELINES = {"if": "IFPipeline", "if-sr": "IFSuperResolutionPipeline", "t2v": "TextToVideoSDPipeline",
             "animatediff": "AnimateDiffPipeline", "svd": "StableVideoDiffusionPipeline",
             "t2v-zero": "TextToVideoZeroPipeline", "dit": "DiTPipeline", "pixart": "PixArtAlphaPipeline",
             "pixart-sigma": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@dataclass(frozen=True)
class Settings:
    steps: int            # loop length of every table
    seeds: int            # seeds of table 2 (PSNR, timing)
    repeats: int          # timing repeats of table 2 (the fastest of them is kept)
    full_models: tuple[str, ...]
    cache_families: tuple[str, ...]

    @property
    def second(self) -> str:
        """The second key-step schedule of table 1: ``uniform:10`` at 50 steps."""
        return f"uniform:{max(1, self.steps // 5)}"


def settings_for(quick: bool, steps: int | None, seeds: int | None, repeats: int | None) -> Settings:
    if quick:
        return Settings(steps or 6, seeds or 1, repeats or 1, ("DiT-XL/2",), ("dit", "flux"))
    return Settings(steps or 50, seeds or 4, repeats or 3, tuple(FULL_MODELS), CACHE_FAMILIES)


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".replace("|", "\\|")


# ------------------------------------------------------------------------------------------------------------------
# FLOPs by module
# ------------------------------------------------------------------------------------------------------------------

def encoder_module_names(model: torch.nn.Module, family: families.Family, k: int | None) -> list[str]:
    """The counter's names (``<class>.<path>``) of the modules tiec treats as the encoder of ``model``."""
    root = type(model).__name__
    names = {id(m): n for n, m in model.named_modules()}
    if family.is_unet:
        parts = [model.conv_in]
        if isinstance(getattr(model, "transformer_in", None), torch.nn.Module):
            parts.append(model.transformer_in)
        parts += list(model.down_blocks)
        if model.mid_block is not None:
            parts.append(model.mid_block)
    else:
        parts = list(family.blocks[:k])
    return [f"{root}.{names[id(p)]}" for p in parts]


def module_flops(counts: dict[str, dict[Any, int]], name: str) -> int:
    return int(sum(counts.get(name, {}).values()))


def encoder_share(counts: dict[str, dict[Any, int]], model: torch.nn.Module, family: families.Family,
                  k: int | None) -> float:
    """FLOPs inside the encoder modules / FLOPs of the whole denoiser, from one plain run's counts."""
    total = module_flops(counts, type(model).__name__)
    return sum(module_flops(counts, n) for n in encoder_module_names(model, family, k)) / total


# ------------------------------------------------------------------------------------------------------------------
# Table 1a: full-size architectures on the meta device
# ------------------------------------------------------------------------------------------------------------------

def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _timestep_projections_to_meta(model: torch.nn.Module) -> int:
    """Move the sinusoidal timestep projections' outputs to ``meta``.

    tiec reads every bare-model call's timestep value (``Tensor.item()``), which a meta tensor does not have, so
    the timestep is given as a CPU tensor; diffusers' ``Timesteps`` modules turn it into a CPU embedding, moved
    here to ``meta`` for the linear layers after it. No FLOPs are counted in these projections (elementwise).
    """
    from diffusers.models.embeddings import Timesteps
    count = 0
    for module in model.modules():
        if isinstance(module, Timesteps):
            module.register_forward_hook(lambda mod, args, out: out.to("meta"))
            count += 1
    return count


def _build_meta(cls_name: str, config: dict) -> torch.nn.Module:
    import diffusers
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    model = model.to("meta").eval()
    _timestep_projections_to_meta(model)
    return model


def _ddim_timesteps(steps: int, beta_schedule: str = "linear") -> torch.Tensor:
    from diffusers import DDIMScheduler
    extra = dict(beta_start=0.00085, beta_end=0.012) if beta_schedule == "scaled_linear" else {}
    scheduler = DDIMScheduler(beta_schedule=beta_schedule, **extra)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def _flow_timesteps(steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


@dataclass
class FullModel:
    label: str
    cls_name: str
    config: dict
    inputs: Callable[[], dict]                 # the call's inputs but the timestep
    timestep: Callable[[torch.Tensor], Any]    # scheduler timestep -> the model's timestep argument
    timesteps: Callable[[int], torch.Tensor]
    shape: str                                 # what one call sees, in words
    batch: int


def _dit_inputs():
    return dict(hidden_states=_meta(2, 4, 32, 32), class_labels=_meta(2, dtype=torch.long))


def _pixart_inputs():
    return dict(hidden_states=_meta(2, 4, 64, 64), encoder_hidden_states=_meta(2, 120, 4096),
                encoder_attention_mask=_meta(2, 120), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _sd3_inputs():
    return dict(hidden_states=_meta(2, 16, 128, 128), encoder_hidden_states=_meta(2, 333, 4096),
                pooled_projections=_meta(2, 2048))


def _flux_inputs():
    return dict(hidden_states=_meta(1, 4096, 64), encoder_hidden_states=_meta(1, 512, 4096),
                pooled_projections=_meta(1, 768), img_ids=_meta(4096, 3), txt_ids=_meta(512, 3),
                guidance=torch.full((1,), 3.5))


def _sd15_inputs():
    return dict(sample=_meta(2, 4, 64, 64), encoder_hidden_states=_meta(2, 77, 768))


FULL_MODELS: dict[str, FullModel] = {m.label: m for m in [
    FullModel("DiT-XL/2", "DiTTransformer2DModel",
              dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, in_channels=4,
                   out_channels=8, sample_size=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
              _dit_inputs, lambda t: t.expand(2), lambda n: _ddim_timesteps(n),
              "256 px: 32x32x4 latent, 256 tokens; class label", 2),
    FullModel("PixArt-alpha XL", "PixArtTransformer2DModel",
              dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                   patch_size=2, sample_size=64, cross_attention_dim=1152, caption_channels=4096,
                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                   num_embeds_ada_norm=1000, use_additional_conditions=False),
              _pixart_inputs, lambda t: t.expand(2), lambda n: _ddim_timesteps(n),
              "512 px: 64x64x4 latent, 1024 tokens; 120 T5 tokens", 2),
    FullModel("SD3-medium", "SD3Transformer2DModel",
              dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
              _sd3_inputs, lambda t: t.expand(2), _flow_timesteps,
              "1024 px: 128x128x16 latent, 4096 tokens; 333 text tokens (77 CLIP + 256 T5)", 2),
    FullModel("Flux.1-dev", "FluxTransformer2DModel",
              dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
              _flux_inputs, lambda t: (t / 1000).expand(1), _flow_timesteps,
              "1024 px: 4096 packed tokens x 64; 512 T5 tokens; guidance 3.5 embedded", 1),
    FullModel("SD1.5 UNet", "UNet2DConditionModel", dict(SD15_UNET_CONFIG),
              _sd15_inputs, lambda t: t, lambda n: _ddim_timesteps(n, "scaled_linear"),
              "512 px: 64x64x4 latent; 77 CLIP tokens", 2),
]}


def bare_loop(model: torch.nn.Module, spec: FullModel, steps: int, config=None) -> dict[str, Any]:
    """Denoiser FLOPs of a ``steps``-call bare loop, plain (``config=None``) or with ``config`` applied."""
    handle = tiec.apply(model, config) if config is not None else None
    try:
        if handle is not None:
            handle.start_run(steps)
        inputs = spec.inputs()
        with torch.no_grad(), flop_counter() as counter:
            for t in spec.timesteps(steps):
                model(**inputs, timestep=spec.timestep(t))
        stats = dict(handle.stats) if handle is not None else {"encoder_runs": steps, "decoder_runs": steps}
    finally:
        if handle is not None:
            handle.remove()
    counts = counter.get_flop_counts()
    return {"flops": module_flops(counts, type(model).__name__), "counts": counts, **stats}


def full_size_rows(settings: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for label in settings.full_models:
        spec = FULL_MODELS[label]
        start = time.perf_counter()
        row: dict[str, Any] = {"label": label, "spec": spec}
        try:
            model = _build_meta(spec.cls_name, spec.config)
            family = families.family_of(model)
            k = family.default_blocks()
            plain = bare_loop(model, spec, settings.steps)
            row.update(blocks=None if family.is_unet else len(family.blocks), k=k,
                       share=encoder_share(plain["counts"], model, family, k), plain=plain["flops"])
            for key, schedule in (("fd", FD), ("second", settings.second)):
                cfg = tiec.EncoderPropagationConfig(key_steps=schedule, estimator="extrapolate")
                run = bare_loop(model, spec, settings.steps, cfg)
                row[key] = {"ratio": run["flops"] / plain["flops"], "encoder_runs": run["encoder_runs"],
                            "decoder_runs": run["decoder_runs"]}
        except Exception as exc:  # reported in the table, never hidden
            row["error"] = _first_line(exc)
        row["seconds"] = time.perf_counter() - start
        log(f"full-size {label}: {row.get('error') or _fmt_ratio(row['fd']['ratio'])} ({row['seconds']:.0f} s)")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Table 1b: the tiny pipelines
# ------------------------------------------------------------------------------------------------------------------

def counted_call(pipe, name: str, steps: int, seed: int = 0) -> tuple[np.ndarray, int, dict]:
    """One pipeline call under the FLOP counter: (images, denoiser FLOPs, all module counts)."""
    key = type(tiny.denoiser(pipe)).__name__
    with flop_counter() as counter:
        images = tiny.run(pipe, name, steps=steps, seed=seed)
    counts = counter.get_flop_counts()
    return np.asarray(images), module_flops(counts, key), counts


def tiny_rows(settings: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for name in tiny.FAMILIES:
        start = time.perf_counter()
        row: dict[str, Any] = {"name": name}
        try:
            pipe = tiny.build(name)
            model = tiny.denoiser(pipe)
            family = families.family_of(model, pipe)
            k = family.default_blocks()
            _, plain, counts = counted_call(pipe, name, settings.steps)
            row.update(denoiser=type(model).__name__, pipeline=type(pipe).__name__, k=k,
                       blocks=None if family.is_unet else len(family.blocks), serial=family.serial,
                       share=encoder_share(counts, model, family, k), plain=plain)
            for key, schedule in (("fd", FD), ("second", settings.second)):
                cfg = tiec.EncoderPropagationConfig(key_steps=schedule, estimator="extrapolate")
                with tiec.apply(pipe, cfg) as handle:
                    _, flops, _ = counted_call(pipe, name, settings.steps)
                    stats = dict(handle.stats)
                row[key] = {"ratio": flops / plain, **{s: stats[s] for s in (
                    "unet_calls", "encoder_runs", "decoder_runs", "batched_decoder_calls")}}
        except Exception as exc:
            row["error"] = _first_line(exc)
        row["seconds"] = time.perf_counter() - start
        log(f"tiny {name}: {row.get('error') or _fmt_ratio(row['fd']['ratio'])} ({row['seconds']:.1f} s)")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Table 2: tiec vs diffusers' caches on the tiny transformers
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Method:
    label: str
    settings: str
    kind: str                         # "plain", "tiec" or the diffusers cache's config class name
    make: Callable[[], Any] | None = None
    note: str = ""


def tiec_methods(steps: int) -> list[Method]:
    fd_keys = len(schedules.resolve(FD, steps))
    # interpolate with uniform keys: K keys + K-1 look-ahead encoder passes, about FasterDiffusion's encoder count
    k_interp = max(2, (fd_keys + 1) // 2)
    k_aggr = max(2, steps // 10)

    def cfg(keys, estimator):
        return lambda: tiec.EncoderPropagationConfig(key_steps=keys, estimator=estimator)
    return [
        Method("tiec reuse (FasterDiffusion)", f"{FD} ({fd_keys} keys)", "tiec", cfg(FD, "reuse")),
        Method("tiec extrapolate", f"{FD} ({fd_keys} keys)", "tiec", cfg(FD, "extrapolate")),
        Method("tiec interpolate", f"{FD} ({fd_keys} keys)", "tiec", cfg(FD, "interpolate")),
        Method("tiec interpolate", f"uniform:{k_interp}", "tiec", cfg(f"uniform:{k_interp}", "interpolate")),
        Method("tiec extrapolate", f"uniform:{k_aggr} (aggressive)", "tiec", cfg(f"uniform:{k_aggr}", "extrapolate")),
    ]


def cache_methods(steps: int, mag_ratios: list[float] | None) -> list[Method]:
    import diffusers
    fbc = getattr(diffusers, "FirstBlockCacheConfig", None)
    ts = getattr(diffusers, "TaylorSeerCacheConfig", None)
    mag = getattr(diffusers, "MagCacheConfig", None)
    methods = []
    if fbc is not None:
        methods += [Method("FirstBlockCache", "threshold=0.05 (default)", "FirstBlockCacheConfig", lambda: fbc()),
                    Method("FirstBlockCache", "threshold=0.2", "FirstBlockCacheConfig", lambda: fbc(threshold=0.2))]
    if ts is not None:
        methods += [Method("TaylorSeer", "cache_interval=5, disable_cache_before_step=3, max_order=1 (default)",
                           "TaylorSeerCacheConfig", lambda: ts()),
                    Method("TaylorSeer", "cache_interval=10", "TaylorSeerCacheConfig", lambda: ts(cache_interval=10)),
                    Method("TaylorSeer", "use_lite_mode=True", "TaylorSeerCacheConfig", lambda: ts(use_lite_mode=True))]
    if mag is not None:
        note = "calibrated `mag_ratios`, see below"
        methods += [Method("MagCache", "threshold=0.06, max_skip_steps=3, retention_ratio=0.2 (default)",
                           "MagCacheConfig", lambda: mag(mag_ratios=mag_ratios, num_inference_steps=steps), note),
                    Method("MagCache", "threshold=0.24, max_skip_steps=6", "MagCacheConfig",
                           lambda: mag(mag_ratios=mag_ratios, num_inference_steps=steps, threshold=0.24,
                                       max_skip_steps=6), note)]
    return methods


def calibrate_mag_ratios(pipe, name: str, steps: int) -> list[float]:
    """MagCache's calibration mode: one plain-equivalent call; diffusers prints the ratios list at the loop's end."""
    from diffusers import MagCacheConfig
    model = tiny.denoiser(pipe)
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            tiny.run(pipe, name, steps=steps, seed=0)
    finally:
        model.disable_cache()
    for line in reversed(out.getvalue().splitlines()):
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            try:
                ratios = ast.literal_eval(line)
            except (ValueError, SyntaxError):
                continue
            if isinstance(ratios, list) and len(ratios) == steps:
                return [float(r) for r in ratios]
    raise RuntimeError(f"MagCache calibration printed no list of {steps} ratios: {out.getvalue()!r}")


def psnr(images: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """PSNR (dB) of images in [0, 1] from their mean squared error over all seeds (inf: all bitwise equal)."""
    mse = float(np.mean([np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
                         for a, b in zip(images, reference)]))
    if not math.isfinite(mse):
        return float("nan")
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@contextlib.contextmanager
def _enabled(pipe, method: Method, holder: dict):
    """Apply ``method`` to ``pipe`` for the duration (tiec's handle or ``transformer.enable_cache``)."""
    if method.kind == "plain":
        yield
        return
    if method.kind == "tiec":
        with tiec.apply(pipe, method.make()) as handle:
            holder["handle"] = handle
            yield
        return
    model = tiny.denoiser(pipe)
    model.enable_cache(method.make())
    try:
        yield
    finally:
        model.disable_cache()


def measure(pipe, name: str, method: Method, settings: Settings, reference: list[np.ndarray] | None
            ) -> dict[str, Any]:
    """FLOPs (counted on every seed), images and seconds (uncounted calls, fastest of ``repeats``) of a method."""
    seeds = range(settings.seeds)
    holder: dict[str, Any] = {}
    flops, images, stats = 0, [], None
    with _enabled(pipe, method, holder):
        for seed in seeds:
            _, f, _ = counted_call(pipe, name, settings.steps, seed)
            flops += f
            if "handle" in holder and stats is None:
                stats = dict(holder["handle"].stats)
        best = math.inf
        for _ in range(settings.repeats):
            start = time.perf_counter()
            images = [np.asarray(tiny.run(pipe, name, steps=settings.steps, seed=seed)) for seed in seeds]
            best = min(best, time.perf_counter() - start)
    result = {"flops": flops, "images": images, "seconds": best, "stats": stats}
    if reference is not None:
        result["psnr"] = psnr(images, reference)
        result["bitwise"] = all(np.array_equal(a, b) for a, b in zip(images, reference))
    return result


def cache_rows(settings: Settings, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows, notes = [], {}
    for name in settings.cache_families:
        pipe = tiny.build(name)
        model = tiny.denoiser(pipe)
        plain = measure(pipe, name, Method("plain", "", "plain"), settings, None)
        rows.append({"family": name, "label": "plain (reference)", "settings": f"{settings.steps} steps",
                     "ratio": 1.0, "psnr": float("inf"), "bitwise": True, "time": 1.0, "stats": None})

        def add(method: Method):
            start = time.perf_counter()
            row = {"family": name, "label": method.label, "settings": method.settings, "note": method.note}
            try:
                res = measure(pipe, name, method, settings, plain["images"])
                row.update(ratio=res["flops"] / plain["flops"], psnr=res["psnr"], bitwise=res["bitwise"],
                           time=res["seconds"] / plain["seconds"], stats=res["stats"])
            except Exception as exc:
                row["error"] = _first_line(exc)
            log(f"caches {name} {method.label} {method.settings}: "
                f"{row.get('error') or _fmt_ratio(row['ratio'])} ({time.perf_counter() - start:.1f} s)")
            rows.append(row)

        for method in tiec_methods(settings.steps):
            add(method)
        try:
            model.enable_cache  # noqa: B018 (diffusers' CacheMixin; its absence is the "not supported" reason)
        except AttributeError as exc:
            error = _first_line(exc)
            for label in ("FirstBlockCache", "TaylorSeer", "MagCache"):
                rows.append({"family": name, "label": label, "settings": "-", "error": error, "unsupported": True})
                log(f"caches {name} {label}: not supported ({error})")
            continue
        ratios = None
        try:
            ratios = calibrate_mag_ratios(pipe, name, settings.steps)
            notes[name] = (f"MagCache `mag_ratios` for `{name}`, calibrated with `MagCacheConfig(calibrate=True, "
                           f"num_inference_steps={settings.steps})` on seed 0 of this tiny model: "
                           + ", ".join(f"{r:.3f}" for r in ratios))
        except Exception as exc:
            notes[name] = f"MagCache calibration failed on `{name}`: {_first_line(exc)}"
        for method in cache_methods(settings.steps, ratios):
            if method.kind == "MagCacheConfig" and ratios is None:
                rows.append({"family": name, "label": method.label, "settings": method.settings,
                             "error": "calibration failed (see notes)", "unsupported": True})
                continue
            add(method)
    return rows, notes


# ------------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------------

def _gflops(x: int) -> str:
    return f"{x / 1e12:,.1f} TFLOPs" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOPs"


def _runs(run: dict) -> str:
    return f"{run['encoder_runs']}/{run['decoder_runs']}"


def _psnr(row: dict) -> str:
    if row.get("bitwise"):
        return "inf (bitwise equal)"
    value = row.get("psnr")
    return "nan" if value is None or math.isnan(value) else f"{value:.1f}"


def render(settings: Settings, full: list, small: list, caches: list, notes: dict, command: str,
           elapsed: float, threads: int) -> str:
    import diffusers
    n, second = settings.steps, settings.second
    fd_keys = schedules.resolve(FD, n)
    second_keys = schedules.resolve(second, n)
    out = [
        "# Encoder propagation across model families: exact FLOPs, and diffusers' caches side by side",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} in {elapsed / 60:.1f} min on {platform.machine()} CPU, "
        f"{threads} thread(s), torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}; `benchmarks/families.py` (with `--quick` a smoke run: fewer steps, seeds and "
        f"models)." + (" **This is a `--quick` smoke run.**" if "--quick" in command else ""),
        "",
        f"Key steps: `{FD}` at {n} steps = {list(fd_keys)} ({len(fd_keys)} of {n}); `{second}` = "
        f"{list(second_keys)}. tiec rows of table 1 use `estimator=\"extrapolate\"` (its blend is elementwise: the "
        f"same counted FLOPs as `reuse`). FLOPs are `tiec.flops.flop_counter()` (torch's `FlopCounterMode` plus "
        f"the CPU attention kernel): matrix multiplications, convolutions and attention, 2 FLOPs per "
        f"multiply-add, counted exactly, op by op, over the whole loop; elementwise work (norms, activations, "
        f"tiec's feature blends, the caches' residual arithmetic) is outside the counter for every row alike. "
        f"\"enc/dec runs\" are tiec's `handle.stats[\"encoder_runs\"]` / `[\"decoder_runs\"]` of the loop.",
        "",
        f"## 1a. Full-size architectures: denoiser FLOPs of a {n}-step loop (accelerated / plain)",
        "",
        "Built on the `meta` device (shapes only), called as a bare model once per step (`handle.start_run`), "
        "guided batch of 2 (Flux: batch 1, guidance-distilled). Default encoder: the first `k = round(18/28 * "
        "blocks)` transformer blocks (Flux: its 19 two-stream blocks, then single-stream ones), or the UNet's "
        "`conv_in` + down blocks + mid block. A bare model decodes serially (one decoder call per step); batched "
        "decoders do the same FLOPs. \"Encoder share\" is the encoder modules' FLOPs / the denoiser's FLOPs in one "
        "plain step.",
        "",
        f"| model | one call | blocks, k | encoder share of a step | plain, {n} steps | {FD} ratio | enc/dec runs "
        f"| {second} ratio | enc/dec runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in full:
        spec = row["spec"]
        what = f"{spec.shape}; batch {spec.batch}"
        if "error" in row:
            out.append(f"| {row['label']} (`{spec.cls_name}`) | {what} | - | - | - | failed: {row['error']} "
                       f"| - | - | - |")
            continue
        blocks = "UNet encoder" if row["k"] is None else f"{row['blocks']}, k={row['k']}"
        out.append(f"| {row['label']} (`{spec.cls_name}`) | {what} | {blocks} | {row['share']:.1%} | "
                   f"{_gflops(row['plain'])} | **{row['fd']['ratio']:.4f}** | {_runs(row['fd'])} | "
                   f"{row['second']['ratio']:.4f} | {_runs(row['second'])} |")
    out += [
        "",
        "Meta device: tiec reads each bare-model call's timestep value (`Tensor.item()`), which a meta tensor does "
        "not have, so the timestep (and Flux's guidance) is a CPU tensor and a forward hook moves the output of "
        "diffusers' sinusoidal `Timesteps` projections to `meta` (no counted FLOPs there). Every model ran at its "
        "full resolution.",
        "",
        f"## 1b. The tiny pipelines of `tiec.tiny`: denoiser FLOPs of one {n}-step pipeline call",
        "",
        "Random weights, 32 px (video: 3 frames), each family's usual scheduler and guidance (`tiec.tiny.inputs`); "
        "the denoiser module's FLOPs only (`counter.get_flop_counts()[<denoiser class>]`: no VAE, no text or "
        "image encoder). \"Batched decoder calls\": how many decoder calls ran several steps as one batch "
        "(`max_parallel=8`).",
        "",
        f"| family | pipeline | denoiser | encoder | encoder share | plain denoiser FLOPs | {FD} ratio | "
        f"enc/dec runs (model calls) | batched decoder calls | {second} ratio | enc/dec runs | batched decoder calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in small:
        if "error" in row:
            out.append(f"| {row['name']} | {PIPELINES.get(row['name'], '')} | - | - | - | - | failed: {row['error']} "
                       f"| - | - | - | - | - |")
            continue
        encoder = "UNet encoder" if row["k"] is None else f"{row['k']} of {row['blocks']} blocks"
        fd, sec = row["fd"], row["second"]

        def batched(run):
            return "0 (serial by design)" if row["serial"] else str(run["batched_decoder_calls"])
        out.append(f"| {row['name']} | `{row['pipeline']}` | `{row['denoiser']}` | {encoder} | {row['share']:.1%} | "
                   f"{_gflops(row['plain'])} | **{fd['ratio']:.4f}** | {_runs(fd)} ({fd['unet_calls']}) | "
                   f"{batched(fd)} | {sec['ratio']:.4f} | {_runs(sec)} | {batched(sec)} |")
    serial = [r["name"] for r in small if r.get("serial")]
    restarted = [r["name"] for r in small if "fd" in r and r["fd"]["unet_calls"] != n]
    out += [""]
    if serial:
        out.append(f"Serial decoders: {', '.join(serial)} (Text2Video-Zero's cross-frame attention reads the frame "
                   f"count from the batch, so tiec decodes its steps one at a time; the FLOPs are the same).")
    if restarted:
        out.append(f"More model calls than steps: {', '.join(restarted)} (Text2Video-Zero denoises the first frame "
                   f"alone for a few steps, then goes back to an earlier step and denoises all frames; each loop is "
                   f"a tiec run with its own key steps, so there are more key steps than {len(fd_keys)}, and a key "
                   f"step of the first-frame loop costs a third of one of the video loop (1 frame of 3)).")
    out += [
        "",
        f"## 2. tiec and diffusers' caches on the tiny transformer pipelines ({n} steps, {settings.seeds} seeds)",
        "",
        "**These are random-weight tiny models: the PSNR figures only show that each method runs and how far its "
        "images move from the plain pipeline's on these models. They say nothing about image quality on trained "
        "models, and neither the tiec nor the cache settings are tuned for them.**",
        "",
        f"Denoiser FLOPs ratio: exact count, summed over the {settings.seeds} seeds, accelerated / plain, counted "
        f"the same way for every row. PSNR (dB): images in [0, 1] against the plain pipeline's images of the same "
        f"seed, from the mean squared error averaged over the seeds. Seconds ratio: the fastest of "
        f"{settings.repeats} timed passes over the seeds (uncounted calls) / the plain pipeline's, measured in "
        f"this run; tiny models on a shared CPU, mostly Python overhead: noise, not a speed result. diffusers' "
        f"caches are enabled with "
        f"`pipe.transformer.enable_cache(config)` and removed with `disable_cache()`; default settings plus one "
        f"more aggressive setting each (TaylorSeer also in its lite mode). tiec's `interpolate` pays one encoder "
        f"look-ahead per key interval; with uniform keys it runs about as many encoder passes as `{FD}`.",
        "",
        "| family | method | settings | denoiser FLOPs ratio | enc/dec runs | PSNR vs plain (dB) | seconds ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in caches:
        if "error" in row:
            what = "not supported" if row.get("unsupported") else "failed"
            out.append(f"| {row['family']} | {row['label']} | {row['settings']} | {what}: {row['error']} | - | - | - |")
            continue
        runs = "-" if not row.get("stats") else (_runs(row["stats"]) + (
            f" (+{row['stats']['lookahead_runs']} look-ahead)" if row["stats"]["lookahead_runs"] else ""))
        label = row["label"] + (f" ({row['note']})" if row.get("note") else "")
        out.append(f"| {row['family']} | {label} | {row['settings']} | {row['ratio']:.4f} | {runs} | {_psnr(row)} | "
                   f"{row['time']:.2f} |")
    unsupported = sorted({r["family"] for r in caches if r.get("unsupported") and "enable_cache" in r["error"]})
    out += [""]
    if unsupported:
        out.append(f"\"not supported\": in diffusers {diffusers.__version__} the transformers of "
                   f"{', '.join(unsupported)} have no `CacheMixin` (no `enable_cache`), so none of diffusers' "
                   f"caches can be enabled on them the documented way.")
        out.append("")
    for name, note in notes.items():
        out += [f"- {note}"]
    if notes:
        out.append("")
    out.append("enc/dec runs (table 2): tiec's counters of seed 0's call; an `interpolate` look-ahead is an encoder "
               "run too (counted in the first number and shown separately).")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/families.md", help="the markdown report to write")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 6 steps, 1 seed, 1 timing pass, only DiT-XL/2 in 1a, only dit and flux in 2")
    parser.add_argument("--steps", type=int, default=None, help="loop length (default 50; --quick 6)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of table 2 (default 4; --quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timing passes of table 2 (default 3; --quick 1)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(args.threads)
    settings = settings_for(args.quick, args.steps, args.seeds, args.repeats)
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={omp} " if omp else "") + "python benchmarks/families.py " + shlex.join(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    with warnings.catch_warnings():
        # deprecation notices of diffusers' older pipelines and numpy 2 warnings inside schedulers, not ours
        warnings.simplefilter("ignore")
        import diffusers.utils.logging as dlog
        verbosity = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            full = full_size_rows(settings, log)
            small = tiny_rows(settings, log)
            caches, notes = cache_rows(settings, log)
        finally:
            dlog.set_verbosity(verbosity)
    report = render(settings, full, small, caches, notes, command.strip(), time.perf_counter() - start,
                    args.threads)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    log(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    return report


if __name__ == "__main__":
    main()
