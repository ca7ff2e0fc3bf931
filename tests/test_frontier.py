"""The equal-cost comparison: the plain sampler's FID-GFLOPs curve, reading it at a row's cost, the Pareto front,
and their place in the bench report (``report.md`` section and ``frontier.png``)."""

from __future__ import annotations

import math

import pytest

from tiec.eval.report import (delta_sources_table, equal_cost_delta, equal_cost_table, fid_at_equal_cost, fid_spread,
                              pareto_front, plain_curve, plain_curves, verdict, write_report)

pytestmark = pytest.mark.filterwarnings("ignore:no images under:UserWarning")  # these reports have no grid images

# The demo model's DDIM numbers from issue 13 (FID, UNet GFLOPs/img).
PLAIN = [(16, 57.55, 27.16), (20, 55.20, 33.95), (40, 52.59, 67.91), (50, 51.65, 84.89)]


def _row(method, num_steps, fid, gflops, sampler="ddim", spec=None, psnr=None):
    schedule = f"{sampler}{num_steps}" + (f":{spec}" if spec else "")
    return {"method": method, "schedule": schedule, "sampler": sampler, "num_steps": num_steps, "fid": fid,
            "gflops_per_image": gflops, "s_per_image": 0.1, "psnr": psnr,
            "key_steps": list(range(num_steps)) if spec is None else [0, 2, 4, 6, 8, 10, 12, 14, 16, 18],
            "key_step_spec": spec}


def _rows():
    rows = [_row("full", n, f, g, psnr=None if n != 50 else math.inf) for n, f, g in PLAIN]
    rows += [_row("full", 8, 60.0, 20.0, sampler="dpm"), _row("full", 20, 54.0, 50.0, sampler="dpm")]
    rows += [_row("reuse", 20, 64.76, 29.86, spec="uniform:10", psnr=20.0),
             _row("extrapolate", 20, 56.82, 29.86, spec="uniform:10", psnr=24.0),
             _row("interpolate", 20, 55.01, 33.55, spec="uniform:10", psnr=25.0)]
    return rows


def test_plain_curve_is_the_full_rows_of_one_sampler_sorted_by_gflops():
    rows = _rows()[::-1]
    assert plain_curve(rows, "ddim") == [(g, f) for _, f, g in PLAIN]
    assert plain_curve(rows, "dpm") == [(20.0, 60.0), (50.0, 54.0)]
    assert plain_curve(rows + [_row("full", 30, None, 50.0)], "ddim") == plain_curve(rows, "ddim")  # no FID: no point
    assert plain_curve(rows, "euler") == []


def test_fid_at_equal_cost_interpolates_in_log_gflops():
    curve = plain_curve(_rows(), "ddim")
    # by hand: between (27.16, 57.55) and (33.95, 55.20), t = ln(29.86 / 27.16) / ln(33.95 / 27.16)
    t = math.log(29.86 / 27.16) / math.log(33.95 / 27.16)
    assert fid_at_equal_cost(curve, 29.86) == pytest.approx(57.55 + t * (55.20 - 57.55))
    assert fid_at_equal_cost(curve, 29.86) == pytest.approx(56.55, abs=0.005)  # the table
    assert fid_at_equal_cost(curve, 68.09) == pytest.approx(52.58, abs=0.005)
    # log, not linear: the midpoint in log GFLOPs (geometric mean) gives the mean FID
    assert fid_at_equal_cost(curve, math.sqrt(67.91 * 84.89)) == pytest.approx((52.59 + 51.65) / 2)
    assert fid_at_equal_cost(curve, 33.95) == pytest.approx(55.20)  # on a plain point: its FID
    assert fid_at_equal_cost(curve, 27.16) == pytest.approx(57.55)  # both ends are in range
    assert fid_at_equal_cost(curve, 84.89) == pytest.approx(51.65)


def test_fid_at_equal_cost_is_none_outside_the_curve():
    curve = plain_curve(_rows(), "ddim")
    assert fid_at_equal_cost(curve, 27.0) is None
    assert fid_at_equal_cost(curve, 85.0) is None
    assert fid_at_equal_cost(curve, None) is None
    assert fid_at_equal_cost([], 30.0) is None


def test_equal_cost_delta_sign():
    curve = plain_curve(_rows(), "ddim")
    worse = equal_cost_delta(_row("reuse", 20, 64.76, 29.86, spec="uniform:10"), curve)
    better = equal_cost_delta(_row("interpolate", 20, 55.01, 33.55, spec="uniform:10"), curve)
    assert worse == pytest.approx(64.76 - fid_at_equal_cost(curve, 29.86)) and worse > 0
    assert better == pytest.approx(55.01 - fid_at_equal_cost(curve, 33.55)) and better < 0  # beats plain DDIM
    assert equal_cost_delta(_row("reuse", 20, 64.76, 10.0, spec="uniform:10"), curve) is None  # outside: not judged
    assert equal_cost_delta(_row("reuse", 20, None, 29.86, spec="uniform:10"), curve) is None


def test_pareto_front_of_a_hand_made_set():
    points = [(10, 50), (20, 40), (15, 55), (30, 40), (40, 30), (25, 45), (5, 70)]
    # (15, 55) is beaten by (10, 50); (30, 40) by (20, 40); (25, 45) by (20, 40)
    assert sorted(pareto_front(points)) == [0, 1, 4, 6]
    assert pareto_front([]) == []


def test_plain_curves_need_two_step_counts():
    rows = _rows()
    assert set(plain_curves(rows)) == {"ddim", "dpm"}
    assert set(plain_curves([r for r in rows if r["sampler"] == "ddim" or r["num_steps"] != 8])) == {"ddim"}


def test_equal_cost_table_rows_and_out_of_range():
    rows = _rows() + [_row("reuse", 20, 88.39, 21.0, spec="uniform:5")]
    lines = equal_cost_table(rows).splitlines()
    assert "plain DDIM at equal GFLOPs" in lines[0] and "equal-cost FID delta vs DPM" in lines[0]
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert len(body) == 4 and not any(line.startswith("| full ") for line in body)  # non-full rows only
    extrapolate = next(line for line in body if line.startswith("| extrapolate "))
    assert "| 56.55 | +0.27 |" in extrapolate
    interpolate = next(line for line in body if line.startswith("| interpolate "))
    assert "| 55.32 | -0.31 |" in interpolate  # the 55.33 / -0.32 came from unrounded GFLOPs
    cheap = next(line for line in body if "21.000" in line)
    assert cheap.count("outside the curve") == 1  # below DDIM's range, inside DPM's (20 to 50)
    assert "- Plain DDIM curve: 4 `full` rows, 27.160 to 84.890 GFLOPs/img" in equal_cost_table(rows)


def test_delta_sources_split_each_delta_into_ceiling_and_method_cost():
    rows = _rows() + [_row("reuse", 20, 88.39, 21.0, spec="uniform:5"), _row("reuse", 12, 70.0, 20.0, spec="x")]
    lines = delta_sources_table(rows).splitlines()
    assert lines[0].endswith("| ceiling vs DDIM | ceiling vs DPM |")
    body = {line.split(" | ")[0][2:] + line.split(" | ")[2]: line for line in lines[2:]}
    assert len(body) == 4  # the DDIM-12 row has no full row of its own: left out
    # by hand, interpolate (FID 55.01, 33.55 GFLOPs) against its full row DDIM 20 (55.20, 33.95):
    ddim = 57.55 + math.log(33.55 / 27.16) / math.log(33.95 / 27.16) * (55.20 - 57.55)
    dpm = 60.0 + math.log(33.55 / 20.0) / math.log(50.0 / 20.0) * (54.0 - 60.0)
    cells = body["interpolate10 (uniform:10)"].strip("| ").split(" | ")
    assert cells[3:] == ["1.2%", "55.20", "-0.19", f"{55.20 - ddim:+.2f}", f"{55.20 - dpm:+.2f}"]
    # ceiling + method cost = the equal-cost delta (to rounding)
    delta = equal_cost_delta(rows[-3], plain_curve(rows, "ddim"))
    assert rows[-3]["method"] == "interpolate"
    assert float(cells[5]) + float(cells[6]) == pytest.approx(delta, abs=0.011)
    cheap = body["reuse10 (uniform:5)"].strip("| ").split(" | ")  # _row gives every spec 10 key steps
    dpm = 60.0 + math.log(21.0 / 20.0) / math.log(50.0 / 20.0) * (54.0 - 60.0)
    assert cheap[3:] == ["38.1%", "55.20", "+33.19", "outside the curve", f"{55.20 - dpm:+.2f}"]
    zero = [{**r, "gflops_per_image": 0.0} if r["method"] == "full" and r["num_steps"] == 20 else r for r in rows]
    assert len(delta_sources_table(zero).splitlines()) == 2  # no cost to save against: every row left out


def test_report_has_the_equal_cost_section_and_frontier(tmp_path):
    path = write_report(tmp_path, _rows(), ["sneaker"])  # no images saved: grid.png is skipped with a warning
    text = path.read_text()
    assert "## Equal-cost comparison" in text and "![frontier](frontier.png)" in text
    assert "### Where the delta comes from" in text
    assert "| +0.27 |" in text
    png = tmp_path / "frontier.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind


def test_frontier_without_psnr_is_one_panel(tmp_path):
    from PIL import Image

    rows = _rows()
    write_report(tmp_path / "with", rows, ["sneaker"])
    write_report(tmp_path / "without", [{**r, "psnr": None} for r in rows], ["sneaker"])
    wide, narrow = (Image.open(tmp_path / d / "frontier.png").size for d in ("with", "without"))
    assert wide[0] > 1.5 * narrow[0]


def test_report_without_a_curve_has_no_section_and_no_frontier(tmp_path):
    rows = [_row("full", 20, 55.20, 33.95), _row("reuse", 20, 64.76, 29.86, spec="uniform:10"),
            _row("full", 20, 55.0, 34.0, sampler="dpm")]  # one step count per sampler: no curve
    text = write_report(tmp_path, rows, ["sneaker"]).read_text()
    assert "Equal-cost" not in text and "frontier" not in text
    assert not (tmp_path / "frontier.png").exists()
    assert (tmp_path / "pareto.png").is_file()


def _plain(seed, fid, steps=20, n=1000):
    return {**_row("full", steps, fid, 33.95), "num_images": n, "settings": {"seed": seed}}


def test_fid_spread_is_the_sample_deviation_over_disjoint_seed_sets():
    rows = [_plain(0, 55.2), _plain(1000, 55.9), _plain(2000, 54.8), _plain(1500, 40.0),  # 1500: overlaps
            _plain(0, 57.0, steps=16), _plain(1000, 58.0, steps=16)]  # two sets only: the larger group wins
    spread = fid_spread(rows)
    fids = [55.2, 55.9, 54.8]
    mean = sum(fids) / 3
    assert spread["seeds"] == [0, 1000, 2000] and spread["fids"] == fids and spread["num_steps"] == 20
    assert spread["spread"] == pytest.approx(math.sqrt(sum((f - mean) ** 2 for f in fids) / 2))
    assert fid_spread([_plain(0, 55.2), _plain(500, 56.0)]) is None  # overlapping sets: one usable
    assert fid_spread([_plain(0, 55.2)]) is None


def test_verdict_opens_the_report_and_judges_against_twice_the_spread(tmp_path):
    rows = _rows() + [_row("extrapolate", 20, 50.0, 40.0, spec="auto:5"), _row("deepcache", 50, 53.0, 60.0)]
    # by hand: DDIM at 40 GFLOPs 55.20 + ln(40/33.95)/ln(67.91/33.95) * (52.59 - 55.20) = 54.58: delta -4.58;
    # DPM at 40: 60 + ln(2)/ln(2.5) * (54 - 60) = 55.46: delta -5.46; DeepCache at 60 GFLOPs: 53.0 - 53.06 = -0.06
    spread = dict(sampler="ddim", num_steps=20, seeds=[0, 1000, 2000], fids=[55.0, 56.0, 57.0], spread=1.0)
    met = verdict(rows, spread)
    assert met[0].startswith("**Goal met**: `extrapolate@ddim20:auto:5`") and "DDIM -4.58, DPM -5.46" in met[0]
    assert any("tiec's best beats it" in line and "-0.06" in line for line in met)
    assert verdict(rows, {**spread, "spread": 2.5})[0].startswith("**Goal not met**: no tiec row")  # -4.58 > -5
    beaten = rows[:-1] + [_row("deepcache", 50, 45.0, 60.0)]  # DeepCache's delta -8.06 beats tiec's -4.58
    assert "DeepCache's best beats tiec's best" in verdict(beaten, spread)[0]
    pending = verdict(rows, None, ["run X"])
    assert pending[0] == "**Verdict pending**: the seed-to-seed spread of FID needs 3 disjoint seed sets of one plain row."
    assert "- Spread run missing: run X." in pending
    two = {**spread, "seeds": [0, 1000], "fids": [55.0, 56.0]}
    assert verdict(rows, two)[0].startswith("**Verdict pending**: the seed-to-seed spread of FID needs 3 disjoint "
                                            "seed sets of one plain row, it has 2")
    no_dpm = [r for r in rows if r["sampler"] != "dpm"]
    assert verdict(no_dpm, spread)[0] == ("**Verdict pending**: no plain DPM curve (`full` rows at two or more step "
                                          "counts).")
    no_deepcache = [r for r in rows if r["method"] != "deepcache"] + [_row("deepcache", 50, 40.0, 90.0)]  # too dear
    assert verdict(no_deepcache, spread)[0] == ("**Verdict pending**: no DeepCache row within the DDIM curve's "
                                                "GFLOPs range.")
    assert verdict([r for r in rows if r["method"] in ("full", "deepcache")], spread) == []  # no tiec row: none
    # TIEC's estimator on DeepCache's cache is a tiec row; plain DeepCache stays the peer it is compared with
    on_cache = [r for r in rows if r["method"] != "extrapolate"] + [_row("deepcache+extrapolate", 50, 48.0, 40.0)]
    judged = verdict(on_cache, spread)
    assert judged[0].startswith("**Goal met**: `deepcache+extrapolate@ddim50`")
    assert "(FID 48.00, 40.00 GFLOPs/img, TIEC's extrapolation on DeepCache's cache)" in judged[2]
    with_tome = [r for r in rows if r["method"] != "deepcache"] + [_row("deepcache+tome", 50, 53.0, 60.0)]
    assert not any("TIEC's extrapolation" in line for line in verdict(with_tome, spread))  # DeepCache with ToMe
    text = write_report(tmp_path, rows, ["sneaker"], spread=spread).read_text().splitlines()
    assert text[0] == "# tiec bench report" and text[2] == met[0]
