"""benchmarks/frontier_redraw.py: which rows a replacement takes, and the configs a redrawn row runs."""

from __future__ import annotations

import json

import pytest
from test_gpu_speed_script import load_benchmark

from tiec import EncoderPropagationConfig
from tiec.eval.bench import BenchSettings, plan


@pytest.fixture(scope="module")
def fr():
    return load_benchmark("frontier_redraw")


def _row(row_key, run_key="A", fid=1.0):
    return {"row_key": row_key, "run_key": run_key, "fid": fid}


def test_replacement_takes_only_rows_of_the_same_run_and_known_keys(fr, tmp_path):
    rows = {"a#1": _row("a#1"), "b#1": _row("b#1")}
    lines = [_row("a#1", fid=2.0), _row("b#1", run_key="other", fid=3.0), _row("c#1", fid=4.0)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert fr._replaced(rows, path) == ["a#1"]
    assert [(k, r["fid"]) for k, r in rows.items()] == [("a#1", 2.0), ("b#1", 1.0)]  # order kept, nothing added


def test_auto_rows_run_their_recorded_key_steps(fr):
    auto, uniform = plan(BenchSettings(rows=("extrapolate+order2@ddim20:auto:5", "reuse@ddim20:uniform:5")))[1:]
    configs = fr._configs(auto, {"key_steps": [0, 6, 9, 12, 17]})
    (config,) = [c for c in configs if isinstance(c, EncoderPropagationConfig)]
    assert config.key_steps == (0, 6, 9, 12, 17) and config.extrapolation_order == 2
    assert auto.configs[0].key_steps == "auto:5"  # the planned item is left as it was
    assert fr._configs(uniform, {"key_steps": [0, 4, 8, 12, 16]}) is uniform.configs
