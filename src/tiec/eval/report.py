"""The benchmark report: ``report.md`` (the comparison table, the FID-gap recovery and the equal-cost comparison),
``grid.png``, ``pareto.png`` and ``frontier.png``.

Plots use matplotlib's Agg canvas directly (no global backend change, no display needed).
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Any, Sequence


from .results import atomic_write, images_path, load_images

ESTIMATOR_NAMES = ("extrapolate", "interpolate")
LABEL_OFFSET = (0.01, -0.01)  # a plot label's unmoved lower-left corner, from its point (axes fractions)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if value != 0 and abs(value) < 10 ** -digits * 10:  # tiny values keep 2 significant digits
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


def _full_row(rows: Sequence[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["method"] == "full" and r["sampler"] == row["sampler"]
                 and r["num_steps"] == row["num_steps"]), None)


def speedup(rows: Sequence[dict], row: dict) -> float | None:
    """Seconds per image of the ``full`` row of the same sampler and step count, divided by this row's."""
    full = _full_row(rows, row)
    if full is None or not full.get("s_per_image") or not row.get("s_per_image"):
        return None
    return full["s_per_image"] / row["s_per_image"]


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _key_steps_text(row: dict) -> str:
    keys = row.get("key_steps") or []
    if row["method"] == "full" or len(keys) == row["num_steps"]:
        return "all"
    spec = row.get("key_step_spec") or ("every " + str(keys[1] - keys[0]) if len(keys) > 1 else "")
    count = len(keys) or row.get("encoder_runs")  # adaptive rows: the encoder runs of the first batch
    return f"{count if count is not None else '?'} ({spec})"


def results_table(rows: Sequence[dict]) -> str:
    """The comparison table in markdown, in the seed's layout (one line per row).

    Optional columns (adherence, CLIPScore, speckle) appear when any row has them; a row without the value
    (e.g. written by an older tiec, before ``speckle`` existed) shows "–".

    Example:
        >>> rows = [dict(method="full", sampler="ddim", num_steps=20, fid=50.0, s_per_image=0.2),
        ...         dict(method="reuse", sampler="ddim", num_steps=20, fid=60.0, s_per_image=0.1,
        ...              key_steps=[0, 5, 10, 15], key_step_spec="uniform:4")]
        >>> print(results_table(rows))
        | method | sampler, steps | key steps | FID | PSNR | SSIM | s/img | speed-up | GFLOPs/img | encoders / decoders |
        |---|---|---|---|---|---|---|---|---|---|
        | full | DDIM 20 | all | 50.00 | – | – | 0.2000 | 1.00x | – | – / – |
        | reuse | DDIM 20 | 4 (uniform:4) | 60.00 | – | – | 0.1000 | 2.00x | – | – / – |
    """
    show_adherence = any(r.get("adherence") is not None for r in rows)
    show_clip = any(r.get("clip_score") is not None for r in rows)
    show_speckle = any(r.get("speckle") is not None for r in rows)
    head = ["method", "sampler, steps", "key steps", "FID"]
    head += ["adherence"] if show_adherence else []
    head += ["CLIPScore"] if show_clip else []
    head += ["speckle"] if show_speckle else []
    head += ["PSNR", "SSIM", "s/img", "speed-up", "GFLOPs/img", "encoders / decoders"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        up = speedup(rows, r)
        cells = [r["method"], f"{r['sampler'].upper()} {r['num_steps']}", _key_steps_text(r), _num(r.get("fid"))]
        cells += [_num(r.get("adherence"), 3)] if show_adherence else []
        cells += [_num(r.get("clip_score"))] if show_clip else []
        cells += [_percent(r.get("speckle"))] if show_speckle else []
        enc, dec = r.get("encoder_runs"), r.get("decoder_runs")
        cells += [_num(r.get("psnr")), _num(r.get("ssim"), 4), _num(r.get("s_per_image"), 4),
                  f"{up:.2f}x" if up is not None else "–", _num(r.get("gflops_per_image"), 3),
                  f"{enc if enc is not None else '–'} / {dec if dec is not None else '–'}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def gap_recovery(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """The share of the reuse -> full FID gap each estimator recovers, ``(FID_reuse - FID_est) / (FID_reuse - FID_full)``.

    Each estimator row (``extrapolate``/``interpolate``, with or without ``+noise``/``+tome``) is compared with the
    ``reuse`` row of the same schedule and modifiers and with ``full`` of the same sampler and step count.
    Noise injection, FasterDiffusion's own fix for ``reuse``, is measured the same way: ``reuse+noise``
    (with any other modifiers) against the ``reuse`` row without ``+noise``.
    ``recovered`` is None where there is no gap (the baseline's FID is not above full's: it lost nothing to recover,
    and a ratio over a gap of noise means nothing) or a FID is missing; negative values are kept (the estimator is
    worse than reuse). ``extra_s`` is the estimator's extra seconds per image over reuse.

    Example:
        >>> rows = [dict(method=method, sampler="ddim", num_steps=20, schedule=schedule, fid=fid)
        ...         for method, schedule, fid in [("full", "ddim20", 50.0), ("reuse", "ddim20:uniform:5", 60.0),
        ...                                       ("extrapolate", "ddim20:uniform:5", 57.0)]]
        >>> gap_recovery(rows)[0]["recovered"]  # (60 - 57) / (60 - 50)
        0.3
    """
    out = []
    for est in rows:
        parts = est["method"].split("+")
        if parts[0] in ESTIMATOR_NAMES:
            reuse_name = "+".join(["reuse", *parts[1:]])
        elif parts[0] == "reuse" and "noise" in parts:
            reuse_name = "+".join(p for p in parts if p != "noise")
        else:
            continue
        reuse = next((r for r in rows if r["method"] == reuse_name and r["schedule"] == est["schedule"]), None)
        full = _full_row(rows, est)
        if reuse is None or full is None:
            continue
        f_est, f_reuse, f_full = est.get("fid"), reuse.get("fid"), full.get("fid")
        recovered = None
        if None not in (f_est, f_reuse, f_full) and f_reuse > f_full:
            recovered = (f_reuse - f_est) / (f_reuse - f_full)
        s_est, s_reuse = est.get("s_per_image"), reuse.get("s_per_image")
        extra = s_est - s_reuse if s_est is not None and s_reuse is not None else None
        out.append({"estimator": est["method"], "baseline": reuse_name, "schedule": est["schedule"],
                    "fid_full": f_full, "fid_reuse": f_reuse, "fid_estimator": f_est, "recovered": recovered,
                    "extra_s": extra, "extra_pct": 100.0 * extra / s_reuse if extra is not None and s_reuse else None})
    return out


def gap_table(rows: Sequence[dict]) -> str:
    """``gap_recovery`` as a markdown table."""
    gaps = gap_recovery(rows)
    if not gaps:
        return "_No estimator row has both a `reuse` and a `full` row to compare with._"
    lines = ["| estimator | vs | schedule | FID full | FID reuse | FID estimator | gap recovered | extra s/img vs reuse |",
             "|---|---|---|---|---|---|---|---|"]
    for g in gaps:
        if g["recovered"] is not None:
            recovered = f"{100 * g['recovered']:.1f}%"
        elif None in (g["fid_estimator"], g["fid_reuse"], g["fid_full"]):
            recovered = "n/a (no FID)"
        else:
            recovered = "n/a (no gap: reuse not worse than full)"
        extra = (f"{g['extra_s']:+.4f} s ({g['extra_pct']:+.1f}%)" if g["extra_s"] is not None else "–")
        lines.append(f"| {g['estimator']} | {g['baseline']} | {g['schedule']} | {_num(g['fid_full'])} | "
                     f"{_num(g['fid_reuse'])} | {_num(g['fid_estimator'])} | {recovered} | {extra} |")
    return "\n".join(lines)


def plain_curve(rows: Sequence[dict], sampler: str) -> list[tuple[float, float]]:
    """The plain sampler's quality-cost curve: the ``full`` rows of ``sampler`` (any step count) as
    ``(gflops_per_image, fid)`` points, sorted by GFLOPs. Rows without FID or GFLOPs are left out.

    Args:
        rows: result rows (``method``, ``sampler``, ``fid``, ``gflops_per_image``).
        sampler: the sampler's name in the rows, e.g. ``"ddim"``.

    Example:
        >>> rows = [dict(method="full", sampler="ddim", num_steps=50, fid=51.65, gflops_per_image=84.89),
        ...         dict(method="full", sampler="ddim", num_steps=20, fid=55.20, gflops_per_image=33.95),
        ...         dict(method="reuse", sampler="ddim", num_steps=20, fid=64.76, gflops_per_image=29.86)]
        >>> plain_curve(rows, "ddim")
        [(33.95, 55.2), (84.89, 51.65)]
    """
    return sorted((r["gflops_per_image"], r["fid"]) for r in rows
                  if r["method"] == "full" and r["sampler"] == sampler
                  and r.get("gflops_per_image") is not None and r.get("fid") is not None)


def fid_at_equal_cost(curve: Sequence[tuple[float, float]], gflops: float | None) -> float | None:
    """The plain curve's FID at ``gflops``, interpolated linearly in log(GFLOPs) between its neighbouring points.

    None where ``gflops`` is missing or outside the curve's range: a curve is not extrapolated.

    Args:
        curve: ``(gflops, fid)`` points sorted by GFLOPs, as ``plain_curve`` returns them.
        gflops: the cost to read the curve at (UNet GFLOPs per image).

    Example:
        >>> curve = [(27.16, 57.55), (33.95, 55.20)]
        >>> round(fid_at_equal_cost(curve, 29.86), 2)  # 57.55 + ln(29.86/27.16) / ln(33.95/27.16) * (55.20 - 57.55)
        56.55
        >>> fid_at_equal_cost(curve, 20.0) is None  # cheaper than the cheapest plain row
        True
    """
    if gflops is None or not curve or gflops <= 0 or not curve[0][0] <= gflops <= curve[-1][0]:
        return None
    for (g0, f0), (g1, f1) in zip(curve, curve[1:]):
        if g0 <= gflops <= g1:
            if g1 == g0:  # two plain rows of the same cost: either is the curve there
                return f0
            t = (math.log(gflops) - math.log(g0)) / (math.log(g1) - math.log(g0))
            return f0 + t * (f1 - f0)
    return curve[0][1]  # a one-point curve, read at exactly its cost


def equal_cost_delta(row: dict, curve: Sequence[tuple[float, float]]) -> float | None:
    """The row's equal-cost FID delta: its FID minus the plain curve's FID at the row's GFLOPs.

    Negative means the row beats the plain sampler at its cost. None where the row has no FID or GFLOPs or its
    GFLOPs lie outside the curve.

    Example:
        >>> curve = [(27.16, 57.55), (33.95, 55.20)]
        >>> round(equal_cost_delta(dict(fid=56.82, gflops_per_image=29.86), curve), 2)
        0.27
    """
    plain = fid_at_equal_cost(curve, row.get("gflops_per_image"))
    return None if plain is None or row.get("fid") is None else row["fid"] - plain


def plain_curves(rows: Sequence[dict]) -> dict[str, list[tuple[float, float]]]:
    """``plain_curve`` of every sampler whose ``full`` rows (with FID and GFLOPs) cover two or more step counts."""
    curves = {}
    for sampler in sorted({r["sampler"] for r in rows if r["method"] == "full"}):
        steps = {r["num_steps"] for r in rows if r["method"] == "full" and r["sampler"] == sampler
                 and r.get("gflops_per_image") is not None and r.get("fid") is not None}
        if len(steps) >= 2:
            curves[sampler] = plain_curve(rows, sampler)
    return curves


def _sampler_name(sampler: str) -> str:
    return sampler.upper()


def equal_cost_table(rows: Sequence[dict]) -> str:
    """The equal-cost comparison in markdown: for every non-``full`` row, each plain curve's FID at the row's
    GFLOPs and the row's equal-cost FID delta; a note on each curve's range (rows outside it are not judged).

    Example:
        >>> rows = [dict(method="full", sampler="ddim", num_steps=n, fid=f, gflops_per_image=g)
        ...         for n, f, g in [(16, 57.55, 27.16), (20, 55.20, 33.95)]]
        >>> rows.append(dict(method="extrapolate", sampler="ddim", num_steps=20, fid=56.82, gflops_per_image=29.86,
        ...                  key_steps=list(range(0, 20, 2)), key_step_spec="uniform:10"))
        >>> print(equal_cost_table(rows))
        | method | sampler, steps | key steps | FID | GFLOPs/img | plain DDIM at equal GFLOPs | equal-cost FID delta vs DDIM |
        |---|---|---|---|---|---|---|
        | extrapolate | DDIM 20 | 10 (uniform:10) | 56.82 | 29.860 | 56.55 | +0.27 |
        <BLANKLINE>
        - Plain DDIM curve: 2 `full` rows, 27.160 to 33.950 GFLOPs/img; not extrapolated beyond them.
    """
    curves = plain_curves(rows)
    head = ["method", "sampler, steps", "key steps", "FID", "GFLOPs/img"]
    for s in curves:
        head += [f"plain {_sampler_name(s)} at equal GFLOPs", f"equal-cost FID delta vs {_sampler_name(s)}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["method"] == "full":
            continue
        cells = [r["method"], f"{_sampler_name(r['sampler'])} {r['num_steps']}", _key_steps_text(r), _num(r.get("fid")),
                 _num(r.get("gflops_per_image"), 3)]
        for curve in curves.values():
            gflops = r.get("gflops_per_image")
            if gflops is not None and not curve[0][0] <= gflops <= curve[-1][0]:
                cells += ["outside the curve", "–"]
                continue
            delta = equal_cost_delta(r, curve)
            cells += [_num(fid_at_equal_cost(curve, gflops)), "–" if delta is None else f"{delta:+.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines += [f"- Plain {_sampler_name(s)} curve: {len(c)} `full` rows, {_num(c[0][0], 3)} to {_num(c[-1][0], 3)} "
              "GFLOPs/img; not extrapolated beyond them."
              for s, c in curves.items()]
    return "\n".join(lines)


def delta_sources_table(rows: Sequence[dict]) -> str:
    """Where each row's equal-cost FID delta comes from, in markdown: the delta is the sum of

    - the **ceiling**: the delta the row would have if its images were as good as its own ``full`` row's (same
      sampler and step count), i.e. that row's FID minus the plain curve's FID at this row's GFLOPs. Against its
      own sampler's curve it depends only on the cost saved and on the curve's slope there; against another
      sampler's curve it also holds the gap between the two samplers. At or above zero, the row can win only where
      the method lowers FID below its own ``full`` row's;
    - the **method's FID cost**: the row's FID minus its own ``full`` row's (the estimator's error, or what
      caching or merging changes; negative where the change happens to lower FID).

    Rows without a ``full`` row of their sampler and step count, FID or GFLOPs (or with zero GFLOPs) are left out.

    Example:
        >>> rows = [dict(method="full", sampler="ddim", num_steps=n, fid=f, gflops_per_image=g)
        ...         for n, f, g in [(16, 57.55, 27.16), (20, 55.20, 33.95)]]
        >>> rows.append(dict(method="extrapolate", sampler="ddim", num_steps=20, fid=56.82, gflops_per_image=29.86,
        ...                  key_steps=list(range(0, 20, 2)), key_step_spec="uniform:10"))
        >>> print(delta_sources_table(rows))  # ceiling 55.20 - 56.55; method 56.82 - 55.20; their sum: +0.27
        | method | sampler, steps | key steps | GFLOPs saved | FID of its full row | method's FID cost | ceiling vs DDIM |
        |---|---|---|---|---|---|---|
        | extrapolate | DDIM 20 | 10 (uniform:10) | 12.0% | 55.20 | +1.62 | -1.35 |
    """
    curves = plain_curves(rows)
    head = ["method", "sampler, steps", "key steps", "GFLOPs saved", "FID of its full row", "method's FID cost"]
    head += [f"ceiling vs {_sampler_name(s)}" for s in curves]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        full = _full_row(rows, r) if r["method"] != "full" else None
        if full is None or None in (r.get("fid"), r.get("gflops_per_image"), full.get("fid")) \
                or not full.get("gflops_per_image"):
            continue
        cells = [r["method"], f"{_sampler_name(r['sampler'])} {r['num_steps']}", _key_steps_text(r),
                 f"{100 * (1 - r['gflops_per_image'] / full['gflops_per_image']):.1f}%", _num(full["fid"]),
                 f"{r['fid'] - full['fid']:+.2f}"]
        for curve in curves.values():
            plain = fid_at_equal_cost(curve, r["gflops_per_image"])
            cells.append("outside the curve" if plain is None else f"{full['fid'] - plain:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fid_spread(rows: Sequence[dict]) -> dict[str, Any] | None:
    """The seed-to-seed spread of FID: the sample standard deviation (n - 1) of one plain row's FID over disjoint
    seed sets.

    ``rows``: ``full`` rows of runs with the same protocol (model, guidance, prompts, FID reference, images per row)
    and different ``settings.seed`` (images ``seed .. seed + num_images - 1``). They are grouped by sampler and step
    count; a row whose seeds overlap those of a row already in its group is left out; the group with the most seed
    sets (at least 2) gives the spread. None when no group has two.

    Example:
        >>> rows = [dict(method="full", sampler="ddim", num_steps=20, num_images=1000, fid=f, settings=dict(seed=s))
        ...         for s, f in [(0, 55.0), (1000, 56.0), (2000, 57.0), (500, 40.0)]]
        >>> fid_spread(rows)  # seeds 500..1499 overlap the first two sets: left out
        {'sampler': 'ddim', 'num_steps': 20, 'seeds': [0, 1000, 2000], 'fids': [55.0, 56.0, 57.0], 'spread': 1.0}
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r.get("method") != "full" or r.get("fid") is None:
            continue
        group = groups.setdefault((r["sampler"], r["num_steps"]), [])
        seed, n = r["settings"]["seed"], r["num_images"]
        if all(seed + n <= g["settings"]["seed"] or g["settings"]["seed"] + g["num_images"] <= seed for g in group):
            group.append(r)
    if not groups:
        return None
    (sampler, steps), group = max(groups.items(), key=lambda item: len(item[1]))
    if len(group) < 2:
        return None
    group = sorted(group, key=lambda g: g["settings"]["seed"])
    fids = [g["fid"] for g in group]
    return dict(sampler=sampler, num_steps=steps, seeds=[g["settings"]["seed"] for g in group], fids=fids,
                spread=statistics.stdev(fids))


def _kind(method: str) -> str:
    """``full``, ``tiec`` (encoder propagation, alone or with ToMe, or TIEC's estimator on DeepCache's cache),
    ``deepcache`` (as published) or ``other`` (ToMe alone)."""
    from .methods import parse_method

    m = parse_method(method)
    if m.name == "full":
        return "full"
    return "tiec" if m.estimator or m.deepcache_estimator else "deepcache" if m.deepcache else "other"


def _best_delta(rows: Sequence[dict], curve: Sequence[tuple[float, float]]) -> tuple[float, dict] | None:
    scored = [(equal_cost_delta(r, curve), r) for r in rows]
    return min(((d, r) for d, r in scored if d is not None), key=lambda item: item[0], default=None)


def _describe(row: dict, delta: float) -> str:
    from .methods import parse_method

    on_cache = ", TIEC's extrapolation on DeepCache's cache" if parse_method(row["method"]).deepcache_estimator else ""
    return (f"`{row['method']}@{row['schedule']}` (FID {_num(row.get('fid'))}, {_num(row.get('gflops_per_image'))} "
            f"GFLOPs/img{on_cache}): {delta:+.2f}")


REQUIRED_CURVES = ("ddim", "dpm")
"""The plain curves the frontier's goal is judged against: DDIM and DPM-Solver++."""
SPREAD_SETS = 3
"""Disjoint seed sets the seed-to-seed spread of FID needs before the verdict is given."""


def verdict(rows: Sequence[dict], spread: dict[str, Any] | None, missing: Sequence[str] = ()) -> list[str]:
    """The frontier's verdict, the report's first lines. The goal is met when one tiec row's equal-cost FID delta is
    below minus twice the seed-to-seed spread of FID against the plain DDIM curve and against the plain DPM-Solver++
    curve, and tiec's best delta beats DeepCache's best (both against the DDIM curve, on which DeepCache runs). Tiec
    rows are encoder propagation and TIEC's extrapolation on DeepCache's cache (``deepcache+extrapolate``, named as
    such where it is the best); DeepCache's are DeepCache as published. The verdict is pending, naming what is
    missing, without both curves, a DeepCache row within the DDIM curve's range, or a spread from ``SPREAD_SETS``
    disjoint seed sets. [] without any plain curve or tiec row.

    Args:
        rows: the run's rows.
        spread: ``fid_spread``'s result, or None when the spread is not measured.
        missing: how to measure the spread runs that are not there yet (always listed).

    Example:
        >>> rows = [dict(method="full", sampler=s, num_steps=n, fid=f, gflops_per_image=g, schedule=f"{s}{n}")
        ...         for s, n, f, g in [("ddim", 10, 60.0, 10.0), ("ddim", 20, 50.0, 20.0), ("dpm", 5, 58.0, 5.0),
        ...                            ("dpm", 20, 49.0, 20.0)]]
        >>> rows += [dict(method="extrapolate", sampler="ddim", num_steps=20, fid=47.0, gflops_per_image=15.0,
        ...               schedule="ddim20:auto:5"),
        ...          dict(method="deepcache", sampler="ddim", num_steps=20, fid=53.0, gflops_per_image=12.0,
        ...               schedule="ddim20:every:2")]
        >>> print("\\n".join(verdict(rows, dict(sampler="ddim", num_steps=20, seeds=[0, 1000, 2000],
        ...                                      fids=[50.0, 50.5, 51.0], spread=0.5))))  # doctest: +NORMALIZE_WHITESPACE
        **Goal met**: `extrapolate@ddim20:auto:5` has an equal-cost FID delta below -2 x spread = -1.00 against both
        plain curves (DDIM -7.15, DPM -3.87), and tiec's best beats DeepCache's best.
        - Seed-to-seed spread of FID: 0.50 (sample standard deviation of plain DDIM 20 on seeds 0, 1000, 2000: 50.00,
        50.50, 51.00).
        - Best tiec row against the plain DDIM curve: `extrapolate@ddim20:auto:5` (FID 47.00, 15.00 GFLOPs/img): -7.15
        - Best tiec row against the plain DPM curve: `extrapolate@ddim20:auto:5` (FID 47.00, 15.00 GFLOPs/img): -3.87
        - Best DeepCache row against the plain DDIM curve: `deepcache@ddim20:every:2` (FID 53.00, 12.00 GFLOPs/img):
        -4.37; tiec's best beats it at equal GFLOPs.
    """
    curves = plain_curves(rows)
    tiec_rows = [r for r in rows if _kind(r["method"]) == "tiec"]
    if not curves or not tiec_rows:
        return []
    details, pending = [], []
    if spread is not None:
        details.append(f"- Seed-to-seed spread of FID: {spread['spread']:.2f} (sample standard deviation of plain "
                       f"{_sampler_name(spread['sampler'])} {spread['num_steps']} on seeds "
                       f"{', '.join(str(s) for s in spread['seeds'])}: {', '.join(f'{f:.2f}' for f in spread['fids'])}).")
    if spread is None or len(spread["seeds"]) < SPREAD_SETS:
        pending.append(f"the seed-to-seed spread of FID needs {SPREAD_SETS} disjoint seed sets of one plain row"
                       + ("" if spread is None else f", it has {len(spread['seeds'])}"))
    details += [f"- Spread run missing: {m}." for m in missing]
    if not missing and spread is None:
        details.append("- Spread runs: `--spread-from DIR,...`, runs of the same plain row on other seeds.")
    tiec_best = {name: _best_delta(tiec_rows, curve) for name, curve in curves.items()}
    for name, best in tiec_best.items():
        details.append(f"- Best tiec row against the plain {_sampler_name(name)} curve: "
                       + ("none within its GFLOPs range" if best is None else _describe(best[1], best[0])))
    pending += [f"no plain {_sampler_name(n)} curve (`full` rows at two or more step counts)"
                for n in REQUIRED_CURVES if n not in curves]
    beats_deepcache = None
    if "ddim" in curves:
        deepcache_best = _best_delta([r for r in rows if _kind(r["method"]) == "deepcache"], curves["ddim"])
        if deepcache_best is None:
            pending.append("no DeepCache row within the DDIM curve's GFLOPs range")
        else:
            beats_deepcache = tiec_best["ddim"] is not None and tiec_best["ddim"][0] < deepcache_best[0]
            details.append(f"- Best DeepCache row against the plain DDIM curve: "
                           f"{_describe(deepcache_best[1], deepcache_best[0])}; tiec's best "
                           f"{'beats' if beats_deepcache else 'does not beat'} it at equal GFLOPs.")
    if pending:
        return [f"**Verdict pending**: {'; '.join(pending)}.", *details]
    margin = 2 * spread["spread"]
    judged = [curves[n] for n in REQUIRED_CURVES]
    winners = []
    for r in tiec_rows:
        deltas = [equal_cost_delta(r, c) for c in judged]
        if all(d is not None and d < -margin for d in deltas):
            winners.append((max(deltas), r, deltas))
    if not winners:
        head = (f"**Goal not met**: no tiec row has an equal-cost FID delta below -2 x spread = {-margin:.2f} against "
                f"both plain curves (DDIM and DPM)" + ("" if beats_deepcache else
                                                      "; nor does tiec's best beat DeepCache's best") + ".")
        return [head, *details]
    _, r, deltas = min(winners, key=lambda w: w[0])
    against = ", ".join(f"{_sampler_name(n)} {d:+.2f}" for n, d in zip(REQUIRED_CURVES, deltas))
    if not beats_deepcache:
        head = (f"**Goal not met**: `{r['method']}@{r['schedule']}` beats both plain curves by more than 2 x spread "
                f"= {margin:.2f} ({against}), but DeepCache's best beats tiec's best.")
    else:
        head = (f"**Goal met**: `{r['method']}@{r['schedule']}` has an equal-cost FID delta below -2 x spread "
                f"= {-margin:.2f} against both plain curves ({against}), and tiec's best beats DeepCache's best.")
    return [head, *details]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the bench plots need matplotlib: pip install matplotlib (or tiec[eval])") from None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def write_grid(path: str | os.PathLike, rows: Sequence[dict], out_dir: str | os.PathLike, prompts: Sequence[str],
               seed: int = 0, columns: int = 8) -> None:
    """``grid.png``: one line per result row (method and schedule), one column per seed, labelled.

    Example:
        >>> from tiec.eval.results import save_images
        >>> rows = [dict(method="full", schedule="ddim20"), dict(method="reuse", schedule="ddim20:uniform:5")]
        >>> for r in rows:
        ...     save_images(images_path("runs/bench", r["schedule"], r["method"]), np.zeros((2, 28, 28, 1), np.uint8))
        >>> write_grid("runs/bench/grid.png", rows, "runs/bench", ["sneaker", "bag"])
        >>> Path("runs/bench/grid.png").is_file()
        True
    """
    strips = []
    for r in rows:
        images = load_images(images_path(out_dir, r["schedule"], r["method"]), r.get("run_key"))
        if images is not None:
            strips.append((f"{r['method']}\n{r['schedule']}", images[:columns]))
    if not strips:
        warnings.warn(f"no images under {out_dir}/images: grid.png not written", stacklevel=2)
        return
    cols = min(columns, max(len(s[1]) for s in strips))
    cell = 1.3 if strips[0][1].shape[1] <= 64 else 2.0
    margin = 1.5  # inches for the row labels
    fig = _figure(margin + cell * cols, 0.45 + cell * len(strips))
    axes = fig.subplots(len(strips), cols, squeeze=False)
    for i, (label, images) in enumerate(strips):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(images):
                image = images[j]
                if image.shape[-1] == 1:
                    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
                else:
                    ax.imshow(image)
            if i == 0:
                ax.set_title(f"seed {seed + j}\n{prompts[j][:16]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=margin / fig.get_figwidth(), right=0.99, top=1 - 0.45 / fig.get_figheight(), bottom=0.01, wspace=0.05,
                        hspace=0.05)
    fig.savefig(path, dpi=100)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better), by the first one.

    Example:
        >>> pareto_front([(1, 5), (2, 3), (3, 4)])
        [0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def place_labels(points: Sequence[tuple[float, float]], widths: Sequence[float], height: float,
                 max_shift: int = 12, marker: float = 0.015) -> list[tuple[float, float]]:
    """Lower-left corners for labels of ``widths`` x ``height`` beside ``points`` (all in axes fractions,
    0..1) so that no label overlaps another label or a point's marker (a square of side ``marker``):
    each label starts at ``LABEL_OFFSET`` from its point (just right of it) and is moved up or down in steps of ``height`` (at most
    ``max_shift``) until it is free. Points are placed from the bottom up. A label that finds no free
    place keeps its first position.

    Example:
        >>> place_labels([(0.5, 0.5), (0.5, 0.5)], [0.2, 0.2], 0.05)
        [(0.51, 0.49), (0.51, 0.54)]
    """
    def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:  # boxes (x, y, width, height)
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    taken = [(x - marker / 2, y - marker / 2, marker, marker) for x, y in points]
    spots: list[tuple[float, float]] = [(0.0, 0.0)] * len(points)
    shifts = [0] + [d for k in range(1, max_shift + 1) for d in (k, -k)]
    for i in sorted(range(len(points)), key=lambda k: (points[k][1], points[k][0])):
        x, y = points[i][0] + LABEL_OFFSET[0], points[i][1] + LABEL_OFFSET[1]
        candidates = [(x, y + d * height, widths[i], height) for d in shifts
                      if 0.0 <= y + d * height <= 1.0 - height]
        own = taken[i]
        spot = next((c for c in candidates if not any(overlaps(c, q) for q in taken if q is not own)),
                    (x, y, widths[i], height))
        taken.append(spot)
        spots[i] = (round(spot[0], 6), round(spot[1], 6))
    return spots


def write_pareto(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """``pareto.png``: seconds per image against FID, one labelled point per row (colour: schedule; label:
    method, moved where labels would overlap, with a line to its point), the Pareto front drawn.

    Example:
        >>> rows = [dict(method="full", schedule="ddim20", fid=50.0, s_per_image=0.2),
        ...         dict(method="reuse", schedule="ddim20:uniform:5", fid=60.0, s_per_image=0.1)]
        >>> write_pareto("pareto.png", rows)
        >>> Path("pareto.png").is_file()
        True
    """
    usable = [r for r in rows if r.get("fid") is not None and r.get("s_per_image") is not None]
    fig = _figure(8, 5.5)
    ax = fig.subplots()
    ax.set_xlabel("seconds per image (lower is better)")
    ax.set_ylabel("FID (lower is better)")
    if not usable:
        ax.text(0.5, 0.5, "no row has both FID and timing", ha="center", va="center", transform=ax.transAxes)
    else:
        schedules = sorted({r["schedule"] for r in usable})
        colours = {s: f"C{i % 10}" for i, s in enumerate(schedules)}
        points = [(r["s_per_image"], r["fid"]) for r in usable]
        for r, (x, y) in zip(usable, points):
            ax.scatter(x, y, color=colours[r["schedule"]], s=30, zorder=3)
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="0.6", lw=1, ls="--",
                zorder=1, label="Pareto front")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_span, y_span = (max(xs) - min(xs)) or max(xs) or 1.0, (max(ys) - min(ys)) or max(ys) or 1.0
        ax.set_xlim(min(xs) - 0.05 * x_span, max(xs) + 0.35 * x_span)  # room for labels on the right
        ax.set_ylim(min(ys) - 0.08 * y_span, max(ys) + 0.08 * y_span)
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        fractions = [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in points]
        width_per_char = 0.0095 * 8 / fig.get_figwidth()
        spots = place_labels(fractions, [width_per_char * len(r["method"]) for r in usable], 0.032)
        for r, point, spot, fraction in zip(usable, points, spots, fractions):
            moved = abs(spot[1] - (fraction[1] + LABEL_OFFSET[1])) > 1e-4  # spots are rounded to 6 digits
            ax.annotate(r["method"], point, xytext=spot, textcoords="axes fraction", fontsize=7,
                        color=colours[r["schedule"]], va="bottom",
                        arrowprops=dict(arrowstyle="-", color="0.7", lw=0.5) if moved else None)
        for s in schedules:
            ax.scatter([], [], color=colours[s], label=s)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _row_label(row: dict) -> str:
    return f"{row['method']} {row.get('schedule') or row['sampler'] + str(row['num_steps'])}"


def _frontier_panel(fig, ax, rows: Sequence[dict], value: str, lower_is_better: bool, colours: dict[str, str]) -> None:
    """One frontier panel: ``value`` against GFLOPs (log x), plain curves as lines, other rows as labelled points
    (``colours``: by sampler for the curves, by method for the points)."""
    from matplotlib.ticker import FuncFormatter

    usable = [r for r in rows if r.get("gflops_per_image") and r.get(value) is not None
              and math.isfinite(r[value])]  # PSNR of a row against itself is inf: no point to draw
    samplers = sorted({r["sampler"] for r in usable if r["method"] == "full"})
    ax.set_xscale("log")
    plain_number = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 30, 50 rather than 2x10^1
    ax.xaxis.set_major_formatter(plain_number)
    ax.xaxis.set_minor_formatter(plain_number)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("UNet GFLOPs per image (log scale, lower is better)")
    ax.set_ylabel(f"{value.upper()} ({'lower' if lower_is_better else 'higher'} is better)")
    if not usable:
        ax.text(0.5, 0.5, f"no row has both {value.upper()} and GFLOPs", ha="center", va="center",
                transform=ax.transAxes)
        return
    for s in samplers:
        curve = sorted((r["gflops_per_image"], r[value]) for r in usable if r["method"] == "full" and r["sampler"] == s)
        ax.plot([p[0] for p in curve], [p[1] for p in curve], color=colours[f"sampler {s}"], marker="o", ms=4,
                lw=1.5, zorder=2, label=f"plain {_sampler_name(s)}")
    others = [r for r in usable if r["method"] != "full"]
    for r in others:
        ax.scatter(r["gflops_per_image"], r[value], color=colours[r["method"]], s=30, zorder=3)
    points = [(r["gflops_per_image"], r[value]) for r in usable]
    front = pareto_front([(x, y if lower_is_better else -y) for x, y in points])
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="0.4", lw=1, ls="--", zorder=1,
            label="Pareto front")
    xs, ys = [math.log(p[0]) for p in points], [p[1] for p in points]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or abs(max(ys)) or 1.0
    ax.set_xlim(math.exp(min(xs) - 0.05 * x_span), math.exp(max(xs) + 0.35 * x_span))  # room for labels on the right
    ax.set_ylim(min(ys) - 0.08 * y_span, max(ys) + 0.08 * y_span)
    if others:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        fractions = [((math.log(r["gflops_per_image"]) - math.log(x0)) / (math.log(x1) - math.log(x0)),
                      (r[value] - y0) / (y1 - y0)) for r in others]
        labels = [_row_label(r) for r in others]
        width_per_char = 0.0095 * 8 / (fig.get_figwidth() / 2)
        spots = place_labels(fractions, [width_per_char * len(t) for t in labels], 0.032)
        for r, label, spot, fraction in zip(others, labels, spots, fractions):
            moved = abs(spot[1] - (fraction[1] + LABEL_OFFSET[1])) > 1e-4  # spots are rounded to 6 digits
            ax.annotate(label, (r["gflops_per_image"], r[value]), xytext=spot, textcoords="axes fraction", fontsize=6,
                        color=colours[r["method"]], va="bottom",
                        arrowprops=dict(arrowstyle="-", color="0.7", lw=0.5) if moved else None)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")


def write_frontier(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """``frontier.png``: FID against UNet GFLOPs per image (log x), each sampler's plain (``full``) curve as a line,
    every other row a labelled point, the Pareto front dashed; a second panel, PSNR against GFLOPs, where rows
    have PSNR.

    Example:
        >>> rows = [dict(method="full", sampler="ddim", num_steps=n, schedule=f"ddim{n}", fid=f, gflops_per_image=g)
        ...         for n, f, g in [(16, 57.55, 27.16), (20, 55.20, 33.95)]]
        >>> rows.append(dict(method="reuse", sampler="ddim", num_steps=20, schedule="ddim20:uniform:10", fid=64.76,
        ...                  gflops_per_image=29.86))
        >>> write_frontier("frontier.png", rows)
        >>> Path("frontier.png").is_file()
        True
    """
    with_psnr = any(r.get("psnr") is not None and math.isfinite(r["psnr"]) and r.get("gflops_per_image")
                    for r in rows)
    panels = [("fid", True)] + ([("psnr", False)] if with_psnr else [])
    samplers = sorted({r["sampler"] for r in rows if r["method"] == "full"})
    methods = sorted({r["method"] for r in rows if r["method"] != "full"})
    colours = {**{f"sampler {s}": f"C{i % 10}" for i, s in enumerate(samplers)},  # the same in both panels
               **{m: f"C{(len(samplers) + i) % 10}" for i, m in enumerate(methods)}}
    fig = _figure(8 * len(panels), 5.5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (value, lower_is_better) in zip(axes, panels):
        _frontier_panel(fig, ax, rows, value, lower_is_better, colours)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))


def write_report(out_dir: str | os.PathLike, rows: Sequence[dict], prompts: Sequence[str], seed: int = 0,
                 columns: int = 8, notes: Sequence[str] = (), spread: dict[str, Any] | None = None,
                 missing_spread: Sequence[str] = ()) -> Path:
    """Write ``report.md``, ``grid.png`` and ``pareto.png`` into ``out_dir``; returns the report's path.

    When the rows hold ``full`` rows of a sampler at two or more step counts, the report gains the equal-cost
    comparison (``equal_cost_table``) and ``frontier.png`` is written too, and with tiec rows it opens with the
    ``verdict`` (``spread``: ``fid_spread``'s result; ``missing_spread``: how to measure it when it is None).

    Example:
        >>> from tiec.eval.results import save_images
        >>> save_images("runs/bench/images/ddim20/full.npy", np.zeros((1, 28, 28, 1), np.uint8))
        >>> rows = [dict(method="full", sampler="ddim", num_steps=20, schedule="ddim20", fid=50.0, s_per_image=0.2)]
        >>> write_report("runs/bench", rows, ["sneaker"])
        PosixPath('runs/bench/report.md')
        >>> sorted(p.name for p in Path("runs/bench").glob("*.png"))
        ['grid.png', 'pareto.png']
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {}
    text = ["# tiec bench report", ""]
    goal = verdict(rows, spread, missing_spread)
    if goal:
        text += [*goal, ""]
    if first:
        text += [f"tiec {first.get('tiec')}, torch {first.get('torch')}, diffusers {first.get('diffusers')}; "
                 f"device {first.get('settings', {}).get('device')}, "
                 f"{first.get('settings', {}).get('processes', 1)} process(es).", ""]
    text += [f"- {n}" for n in notes] + ["", "## Results", "", results_table(rows) if rows else "_no rows_", "",
             "## Share of the reuse -> full FID gap recovered by each estimator", "",
             "`(FID_reuse - FID_est) / (FID_reuse - FID_full)`: 100% = as good as the full sampler, 0% = no better "
             "than reuse, negative = worse than reuse. Extra time is per image, against the matching reuse row. "
             "Noise injection (`reuse+noise`) is measured the same way against `reuse`.", "",
             gap_table(rows), ""]
    curves = plain_curves(rows)
    if curves:
        text += ["## Equal-cost comparison", "",
                 "What a user decides by: each sampler's `full` rows at several step counts draw its plain FID-GFLOPs "
                 "curve; every other row is judged by its equal-cost FID delta, its FID minus the plain curve's FID at "
                 "the row's UNet GFLOPs/img (interpolated linearly in log GFLOPs between the neighbouring plain rows). "
                 "Negative: the row beats the plain sampler at its cost. A row whose GFLOPs lie outside a curve's range shows "
                 "\"outside the curve\": it is not compared with that sampler, since the curve is not extrapolated.", "",
                 equal_cost_table(rows), "",
                 "### Where the delta comes from", "",
                 "Each delta is the sum of a ceiling and the method's FID cost. The ceiling is the delta the row "
                 "would have with the images of its own `full` row (same sampler and step count): that row's FID minus "
                 "the plain curve's at this row's GFLOPs. Against the row's own sampler it is set by the cost saved "
                 "(for encoder propagation: the encoder's share of the UNet's FLOPs times the share of steps without "
                 "a key step) and by the curve's slope there; against another sampler it also holds the gap between "
                 "the two samplers. At or above zero, the row can win only where the method lowers FID below its "
                 "`full` row's. The method's FID cost is the row's FID minus its `full` row's.", "",
                 delta_sources_table(rows), ""]
    text += ["## Figures", "", "![grid](grid.png)", "", "![pareto](pareto.png)", ""]
    text += ["![frontier](frontier.png)", ""] if curves else []
    path = out_dir / "report.md"
    atomic_write(path, lambda f: f.write("\n".join(text).encode("utf-8")))
    try:
        write_grid(out_dir / "grid.png", rows, out_dir, prompts, seed, columns)
        write_pareto(out_dir / "pareto.png", rows)
        if curves:
            write_frontier(out_dir / "frontier.png", rows)
    except ImportError as e:
        warnings.warn(f"{e}; report.md written without figures", stacklevel=2)
    return path
