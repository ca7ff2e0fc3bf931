"""benchmarks/gpu_speed.py, run for real on tiny CPU models: one row per method, honest failures, target logic.

Timings are only checked to be positive (no timed assertions): the point is that the script the GPU run
depends on works end to end, counts what it claims to count, and reports what fails.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

import tiec

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PROPAGATION = ("reuse-serial", "reuse-parallel", "extrapolate", "interpolate", "reuse+tome")
PEERS = ("deepcache", "tome", "reuse+tome")


def load_benchmark(name: str):
    """A module of benchmarks/, imported as running the script would: its folder on sys.path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module(name)


@pytest.fixture(scope="module")
def gs():
    return load_benchmark("gpu_speed")


@pytest.fixture(scope="module")
def measuring(gs):
    return load_benchmark("_gpu_measure")


@pytest.fixture(scope="module")
def reporting(gs):
    return load_benchmark("_gpu_report")


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--tiny", "--threads", "1", "--steps", "4", "--key-steps", "0,1", "--repeats", "1", "--warmup", "1",
            "--unet-repeats", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def report(gs, measuring, tmp_path_factory):
    """One tiny run of every method on both models, batch 1 and 2, with two failing methods slipped in."""
    out = tmp_path_factory.mktemp("gpu_speed") / "speed.md"
    methods = list(gs.METHODS)
    with pytest.MonkeyPatch.context() as mp:
        # a config tiec.apply rejects (fails when applied) and one that cannot be built (fails when built),
        # placed before the last methods so that the rows after them show the run went on
        mp.setitem(gs.METHODS, "broken", measuring.Method("broken", lambda args: (object(),)))
        mp.setitem(gs.METHODS, "unbuildable", measuring.Method(
            "unbuildable", lambda args: (tiec.EncoderPropagationConfig(key_steps="no-such-schedule"),)))
        methods = methods[:-2] + ["broken", "unbuildable"] + methods[-2:]
        code = gs.main(tiny_args(out, "--batches", "1,2", "--json", str(out.with_suffix(".json")),
                                 "--methods", ",".join(methods)))
    data = json.loads(out.with_suffix(".json").read_text())
    return dict(code=code, text=out.read_text(), data=data, methods=methods)


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The markdown tables of a report, by heading, as lists of {column: cell}."""
    tables, heading, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            heading, header = line[4:], None
            tables[heading] = []
        elif line.startswith("|") and heading is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                tables[heading].append(dict(zip(header, cells)))
    return tables


def test_run_succeeds_with_a_row_per_method_in_every_table(report):
    assert report["code"] == 0
    tables = md_tables(report["text"])
    assert len(tables) == 4  # two models x two batches
    assert [t["batch"] for t in report["data"]["tables"]] == [1, 2, 1, 2]
    for heading, rows in tables.items():
        assert [r["method"] for r in rows] == report["methods"], heading


def test_timings_are_positive_and_plain_ratio_is_one(report):
    for table, md in zip(report["data"]["tables"], md_tables(report["text"]).values()):
        for row, cells in zip(table["rows"], md):
            if row["status"] != "ok":
                continue
            assert row["times"] and min(row["times"]) > 0 and row["median"] > 0
            assert float(cells["median s"]) >= 0 and cells["vs plain"] != "-"
            assert row["unet_seconds"][0] > 0 and 0 < row["unet_shares"][0] <= 1
            assert row["unet_calls"] == 4  # one UNet call per step, whatever the method does inside
        plain = table["rows"][0]
        assert plain["method"] == "plain" and plain["status"] == "ok" and plain["ratio"] == 1.0
        assert md[0]["vs plain"] == "1.000"
        assert plain["stats"] == {"unet_calls": 4, "encoder_runs": 4, "decoder_runs": 4}


def test_encoder_propagation_rows_skip_encoders(report):
    for table in report["data"]["tables"]:
        rows = {r["method"]: r for r in table["rows"]}
        for name in PROPAGATION:
            row = rows[name]
            assert row["status"] == "ok", row
            # key steps (0, 1) of 4: steps 2 and 3 decode from cached features
            assert row["stats"]["encoder_runs"] == 2 < row["unet_calls"] == row["stats"]["unet_calls"]
            assert row["stats"]["decoder_runs"] == row["unet_calls"]
        assert rows["reuse-parallel"]["stats"]["batched_decoder_calls"] == 1
        assert rows["reuse-serial"]["stats"]["batched_decoder_calls"] == 0
        assert "batched_decoder_calls=1" in " ".join(rows["reuse-parallel"]["notes"])


def test_peers_run(report):
    for table in report["data"]["tables"]:
        rows = {r["method"]: r for r in table["rows"]}
        for name in PEERS:
            assert rows[name]["status"] == "ok", rows[name]


def test_tome_merges_at_each_models_first_attention_level(report):
    # SDXL's first level has no attention: ToMe's max_downsample=1 would merge nothing there
    for table in report["data"]["tables"]:
        rows = {r["method"]: r for r in table["rows"]}
        level = 2 if table["model"] == "sdxl" else 1
        for name in ("tome", "reuse+tome"):
            assert f"max_downsample={level}," in rows[name]["configs"]
            assert rows[name]["stats"]["merged_blocks"] > 0
    assert re.search(r"- `tome`: `TokenMergingConfig\(ratio=0.5, max_downsample=1,.*\(sd15\); "
                     r"`TokenMergingConfig\(ratio=0.5, max_downsample=2,.*\(sdxl\)", report["text"])


def test_failures_are_reported_in_their_rows_and_the_rest_still_runs(report):
    for heading, rows in md_tables(report["text"]).items():
        by_name = {r["method"]: r for r in rows}
        assert by_name["broken"]["status"].startswith("FAILED: TypeError: tiec.apply got object")
        assert by_name["unbuildable"]["status"].startswith(
            "FAILED building the config: ValueError: key_steps='no-such-schedule' is not a known schedule")
        for name in ("broken", "unbuildable"):
            assert by_name[name]["median s"] == "-" and by_name[name]["vs plain"] == "-"
        last = rows[-1]
        assert last["method"] == report["methods"][-1] and last["median s"] != "-", heading
    assert "WARNING" not in report["text"]  # every method left the pipeline exactly as it found it


def test_report_header_names_command_environment_and_untested_targets(report):
    text = report["text"]
    assert text.startswith("# GPU speed benchmark")
    assert "- Command: `python benchmarks/gpu_speed.py --tiny --threads 1 --steps 4" in text
    for key in ("- device: CPU", f"- torch: {torch.__version__}", "- diffusers: ", "- tiec: "):
        assert key in text
    assert "Incomplete" not in text
    assert "Not evaluated" in text and "reuse parallel <= 0.30x plain" in text
    assert "peak GiB" in text and "| n/a |" in text  # no CUDA memory figures on a CPU


def test_append_adds_a_run_and_replaces_foreign_files(gs, tmp_path):
    out = tmp_path / "speed.md"
    out.write_text("# placeholder, not written by the script\n")
    quick = ("--models", "sd15", "--batches", "1", "--methods", "plain", "--warmup", "0", "--unet-repeats", "0")
    assert gs.main(tiny_args(out, *quick, "--append")) == 0
    assert "placeholder" not in out.read_text() and out.read_text().count("## Run of") == 1
    assert gs.main(tiny_args(out, *quick, "--append")) == 0
    assert out.read_text().count("## Run of") == 2
    assert gs.main(tiny_args(out, *quick)) == 0
    assert out.read_text().count("## Run of") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["speed.md"]  # written in place of the old one, no leftovers


def test_bad_arguments_are_rejected(gs, tmp_path, capsys):
    assert gs.main(tiny_args(tmp_path / "x.md", "--steps", "0")) == 2
    assert gs.main(tiny_args(tmp_path / "x.md", "--key-steps", "1,2")) == 2
    with pytest.raises(SystemExit) as e:
        gs.main(tiny_args(tmp_path / "x.md", "--methods", "plain,fast"))
    assert e.value.code == 2
    assert "'fast'" in capsys.readouterr().err and not (tmp_path / "x.md").exists()


def test_targets_pass_and_fail_on_cuda_figures(gs, measuring, reporting):
    def table(model, **medians):
        t = measuring.Table(model, model, 1, False)
        t.rows = [measuring.Row(name.replace("_", "-"), times=[m]) for name, m in medians.items()]
        return t

    args = gs.build_parser().parse_args(["--dtype", "float16"])
    tables = [table("sd15", plain=1.0, reuse_parallel=0.29, extrapolate=0.30),
              table("sdxl", plain=1.0, reuse_parallel=0.60)]
    lines = "\n".join(reporting.evaluate_targets(tables, args, torch.device("cuda")))
    assert "| SD1.5 512 px batch 1: reuse parallel <= 0.30x plain | 0.290x plain | PASS |" in lines
    assert "extrapolate within 2% of reuse parallel | 1.034x reuse-parallel | FAIL |" in lines
    assert "| SDXL 1024 px batch 1: reuse parallel <= 0.55x plain | 0.600x plain | FAIL |" in lines
    tables[1].rows[1].status = "FAILED: OutOfMemoryError"
    assert "| SDXL 1024 px batch 1: reuse parallel <= 0.55x plain | failed | FAIL |" in \
        "\n".join(reporting.evaluate_targets(tables, args, torch.device("cuda")))
    assert "| not run |" in "\n".join(reporting.evaluate_targets(tables[:1], args, torch.device("cuda")))


def test_unet_timer_counts_outer_calls_and_restores_the_class(measuring):
    class Twice(torch.nn.Module):
        def forward(self, x, again=True):
            return self(x, again=False) if again else x * 2  # a nested call of the same module

    module = Twice()
    with measuring.UNetTimer(module, lambda: None) as timer:
        assert isinstance(module, Twice) and type(module) is not Twice
        module(torch.ones(1))
        module(torch.ones(1))
    assert timer.calls == 2 and timer.seconds > 0 and type(module) is Twice
