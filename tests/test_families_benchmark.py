"""benchmarks/families.py --quick, run for real: every table row is there, with counted (not missing) numbers.

Only structure and exact-count invariants are checked (a ratio is a ratio of counted FLOPs, so it lies in (0, 1]
for methods that skip work; the plain row is 1); timings and PSNR values are not asserted.
"""

from __future__ import annotations

import importlib
import re

import pytest

from tiec import tiny

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from pathlib import Path
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(benchmarks))
        families = importlib.import_module("families")
    out = tmp_path_factory.mktemp("families") / "families.md"
    printed = families.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert text == printed
    return text


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after ``heading``, as lists of cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:end]]


def ratio(cell: str) -> float:
    return float(cell.strip("*"))


def test_header_gives_the_command(report):
    assert re.search(r"Reproduce: `.*python benchmarks/families\.py --quick --out \S+families\.md`", report)


def test_full_size_rows(report):
    rows = table_rows(report, "## 1a.")
    assert [r[0] for r in rows] == ["DiT-XL/2 (`DiTTransformer2DModel`)"]
    dit = rows[0]
    assert dit[2] == "28, k=18" and dit[3] == "64.3%"
    fd = ratio(dit[5])
    assert 0 < fd < 1 and dit[6] == "5/6"  # faster-diffusion at 6 steps: keys 0..4
    # exact counting: 5 full steps and one without the first 18 of 28 (equal-cost) blocks
    assert fd == pytest.approx((5 + (1 - 0.643)) / 6, abs=2e-3)


def test_every_tiny_family_has_a_row(report):
    rows = table_rows(report, "## 1b.")
    assert [r[0] for r in rows] == list(tiny.FAMILIES)
    for row in rows:
        assert not any(cell.startswith("failed") for cell in row), row
        assert 0 < ratio(row[6]) <= 1 and 0 < ratio(row[9]) < 1
    by_name = {r[0]: r for r in rows}
    assert by_name["t2v-zero"][8] == "0 (serial by design)"
    assert int(by_name["dit"][11]) >= 1  # elsewhere the steps between key steps decode as one batch


def test_cache_comparison_rows(report):
    rows = table_rows(report, "## 2.")
    labels = [(r[0], r[1].split(" (")[0]) for r in rows]
    for family in ("dit", "flux"):
        for method in ("plain", "tiec reuse", "tiec extrapolate", "tiec interpolate"):
            assert (family, method) in labels, (family, method)
    for method in ("FirstBlockCache", "TaylorSeer", "MagCache"):
        assert ("flux", method) in labels
        dit = [r for r in rows if r[0] == "dit" and r[1] == method]
        assert len(dit) == 1 and dit[0][3].startswith("not supported: AttributeError")
    for row in rows:
        if not row[3].startswith("not supported"):
            assert 0 < float(row[3]) <= 1, row
    plain = [r for r in rows if r[1] == "plain (reference)"]
    assert all(r[3] == "1.0000" and r[5] == "inf (bitwise equal)" for r in plain)
    assert "random-weight tiny models" in report
    assert "calibrated with `MagCacheConfig(calibrate=True" in report
