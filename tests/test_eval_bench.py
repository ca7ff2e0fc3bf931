"""The bench runner: method/schedule parsing, prompts, crash-safe results, sharding, end-to-end runs and the report."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tiec import DeepCacheConfig
from tiec.eval import bench as B
from tiec.eval import methods as M
from tiec.eval.dist import Dist, merge, shard
from tiec.eval.prompts import cycle, load_prompts
from tiec.eval.report import gap_recovery, gap_table, pareto_front, place_labels, results_table
from tiec.eval.results import append_row, read_rows


class FakeFeatures:
    """A cheap stand-in for the FID network: a few pixel statistics per image."""

    name = "fake-pixel-stats-v1"

    def __call__(self, images):
        rows = []
        for im in images:
            x = np.asarray(im, np.float64) / 255.0
            rows.append([x.mean(), x.std(), x[: x.shape[0] // 2].mean(), x[:, : x.shape[1] // 2].mean(),
                         (x > 0.5).mean()])
        return np.array(rows)


def tiny_demo_pipeline(seed: int = 0):
    """The demo pipeline class with a much smaller UNet (same code paths, milliseconds per step)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from tiec.demo.model import SCHEDULER_CONFIG, ClassEmbedder, FashionPipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    pipe = FashionPipeline(unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG), embedder=ClassEmbedder(dim=16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    from tiec.demo.data import write_idx

    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    return folder


def settings(tmp_path, fmnist_dir, **over):
    base = dict(model="tiny", methods="full,reuse,extrapolate,interpolate", schedules="ddim4:uniform:2",
                num_images=4, batch_size=2, out=str(tmp_path / "out"), data_dir=str(fmnist_dir),
                cache_dir=str(tmp_path / "cache"), grid_columns=3)
    base.update(over)
    return B.BenchSettings.create(**base)


# -- methods, schedules, prompts --------------------------------------------------------------------

def test_method_names_parse_and_bad_ones_are_named():
    assert M.parse_method("tome+reuse").name == "reuse+tome"
    assert M.parse_method("extrapolate+noise").noise
    assert M.parse_method("serial+noise+interpolate").name == "interpolate+noise+serial"
    assert [m.name for m in M.parse_methods("reuse,full,reuse")] == ["full", "reuse"]
    for bad, match in [("warp", "unknown part"), ("full+tome", "combines with nothing"),
                       ("noise", "needs an estimator"), ("serial", "needs an estimator"),
                       ("deepcache+serial", "needs an estimator"), ("reuse+deepcache", "cannot be combined"),
                       ("reuse+extrapolate", "several estimators"), ("deepcache+interpolate", "cannot be combined"),
                       ("deepcache+extrapolate+noise", r"takes no \+noise")]:
        with pytest.raises(ValueError, match=match):
            M.parse_method(bad)


def test_deepcache_extrapolate_is_deepcache_with_the_tiec_estimator():
    method = M.parse_method("extrapolate+deepcache")
    assert (method.name, method.estimator, method.deepcache, method.deepcache_estimator) == \
        ("deepcache+extrapolate", None, True, "extrapolate")
    assert not method.uses_key_steps  # no encoder propagation: DeepCache's full steps
    (config,) = M.build_configs(method, "ddim50:every:5", deepcache_interval=5)
    assert config == DeepCacheConfig(cache_interval=5, estimator="extrapolate")
    (plain,) = M.build_configs(M.parse_method("deepcache"), "ddim50:every:5", deepcache_interval=5)
    assert plain == DeepCacheConfig(cache_interval=5)
    keys = [item.row_key for item in B.plan(B.BenchSettings(rows=("deepcache@ddim50:every:5",
                                                                    "deepcache+extrapolate@ddim50:every:5")))]
    assert [k.split("#")[0] for k in keys] == ["full@ddim50", "deepcache@ddim50:every:5",
                                               "deepcache+extrapolate@ddim50:every:5"]
    assert keys[1] == "deepcache@ddim50:every:5#a26949c4"  # the frontier's stored row: key unchanged by the field


def test_noise_methods_carry_the_injection_weight():
    (config,) = M.build_configs(M.parse_method("reuse+noise"), "uniform:5", noise_injection=0.003)
    assert config.noise_injection == 0.003 and config.estimator == "reuse"
    (plain,) = M.build_configs(M.parse_method("reuse"), "uniform:5", noise_injection=0.003)
    assert plain.noise_injection == 0.0


def test_serial_methods_decode_step_by_step():
    (serial,) = M.build_configs(M.parse_method("extrapolate+serial"), "uniform:5")
    (batched,) = M.build_configs(M.parse_method("extrapolate"), "uniform:5")
    assert serial.parallel is False and batched.parallel is True
    assert serial.estimator == batched.estimator == "extrapolate"


def test_schedules_parse():
    s = M.parse_schedule("dpm20:uniform:5")
    assert (s.sampler, s.num_steps, s.key_steps, s.base) == ("dpm", 20, "uniform:5", "dpm20")
    assert M.key_steps_of(M.parse_method("reuse"), M.parse_schedule("ddim10:0/3/7")) == [0, 3, 7]
    assert M.key_steps_of(M.parse_method("full"), s) == list(range(20))
    for bad, match in [("ddim", "malformed"), ("heun20:uniform:5", "sampler 'heun'"), ("ddim4:uniform:9", "at most")]:
        with pytest.raises(ValueError, match=match):
            M.parse_schedule(bad)
    assert type(M.make_scheduler("dpm", tiny_demo_pipeline().scheduler.config)).__name__ == "DPMSolverMultistepScheduler"


def test_quick_settings_and_plan():
    s = B.BenchSettings.create(quick=True, num_images=12)
    assert s.methods == M.CORE_METHODS and s.schedules == ("ddim20:uniform:5",) and s.num_images == 12
    s = B.BenchSettings.create(methods="reuse,tome", schedules="ddim20:uniform:10,ddim20:uniform:5")
    keys = [item.row_key.split("#")[0] for item in B.plan(s)]
    # full and tome (no key steps) once per sampler and step count
    assert keys == ["full@ddim20", "reuse@ddim20:uniform:10", "tome@ddim20", "reuse@ddim20:uniform:5"]
    with pytest.raises(ValueError, match="num_images"):
        B.BenchSettings.create(num_images=0)


def test_prompts_from_text_and_coco_json(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red bus\n\n  a cat  \n")
    assert load_prompts(text) == ["a red bus", "a cat"]
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "A dog. "},
                                                              {"image_id": 2, "caption": "Two birds"}]}))
    assert load_prompts(coco) == ["A dog.", "Two birds"]
    assert cycle(["x", "y"], 5) == ["x", "y", "x", "y", "x"]
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="annotations"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


# -- results file ---------------------------------------------------------------------------------------

def test_results_append_and_corrupt_trailing_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, {"row_key": "a", "fid": 1.0})
    append_row(path, {"row_key": "b", "psnr": float("inf")})
    with open(path, "ab") as f:
        f.write(b'{"row_key": "c", "fid": 1')  # a torn write
    with pytest.warns(RuntimeWarning, match=r"results.jsonl: line 3 \(the last line\) is corrupt"):
        rows = read_rows(path)
    assert [r["row_key"] for r in rows] == ["a", "b"] and rows[1]["psnr"] == float("inf")
    append_row(path, {"row_key": "d"})  # starts on a fresh line, the torn one stays alone
    with pytest.warns(RuntimeWarning, match="line 3"):
        assert [r["row_key"] for r in read_rows(path)] == ["a", "b", "d"]


def test_saved_images_belong_to_their_run(tmp_path):
    from tiec.eval.results import images_path, load_images, save_images

    path = images_path(tmp_path, "ddim20:uniform:5", "reuse+tome")
    assert path == tmp_path / "images" / "ddim20-uniform-5" / "reuse+tome.npy"
    images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    save_images(path, images, run_key="A")
    np.testing.assert_array_equal(load_images(path, "A"), images)
    assert load_images(path, "B") is None  # another configuration's images are never used
    assert load_images(tmp_path / "missing.npy", "A") is None


# -- sharding -------------------------------------------------------------------------------------------

def test_shard_and_merge_round_trip():
    n, world = 7, 3
    parts = [(shard(n, r, world), np.array(shard(n, r, world)) * 10) for r in range(world)]
    assert sorted(i for idx, _ in parts for i in idx) == list(range(n))
    np.testing.assert_array_equal(merge(parts, n), np.arange(n) * 10)
    with pytest.raises(RuntimeError, match="expected each"):
        merge(parts[:2], n)


def test_sharded_generation_equals_single_process():
    pipe = tiny_demo_pipeline()
    prompts = cycle(["sneaker", "bag", "dress"], 5)
    config = M.build_configs(M.parse_method("extrapolate"), "uniform:2")
    single = B.generate(pipe, config, 4, prompts, range(5), seed=3, batch_size=5, progress=False)
    parts = [B.generate(pipe, config, 4, prompts, shard(5, r, 2), seed=3, batch_size=2, progress=False)
             for r in range(2)]
    merged = merge([(g.indices, g.images) for g in parts], 5)
    assert np.abs(merged.astype(int) - single.images.astype(int)).max() <= 1  # batch size: float round-off only
    assert single.gflops_per_image > 0 and single.stats["encoder_runs"] == 2  # key steps 0 and 2
    assert len(single.seconds_per_image) == 1 and len(parts[0].seconds_per_image) == 1


# -- end to end -----------------------------------------------------------------------------------------

def test_bench_end_to_end_resume_and_report(tmp_path, fmnist_dir, monkeypatch):
    pipe = tiny_demo_pipeline()
    s = settings(tmp_path, fmnist_dir)
    rows = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert [r["method"] for r in rows] == ["full", "reuse", "extrapolate", "interpolate"]
    full, reuse = rows[0], rows[1]
    for row in rows:
        for name in ("method", "num_steps", "key_steps", "num_images", "fid", "adherence", "clip_score", "psnr",
                     "ssim", "s_per_image", "gflops_per_image", "encoder_runs", "decoder_runs", "config",
                     "torch", "diffusers", "tiec"):
            assert name in row, name
        assert row["num_images"] == 4 and row["num_steps"] == 4 and row["clip_score"] is None
        assert np.isfinite(row["fid"]) and 0 <= row["adherence"] <= 1 and row["s_per_image"] > 0
        assert 0 <= row["speckle"] <= 1  # the demo pipeline class: its uncropped samples' frame
    assert full["key_steps"] == [0, 1, 2, 3] and full["psnr"] is None and full["encoder_runs"] == 4
    assert reuse["key_steps"] == [0, 2] and reuse["encoder_runs"] == 2 and reuse["decoder_runs"] == 4
    assert rows[3]["encoder_runs"] == 3  # interpolate: key steps 0, 2 and one look-ahead (step 0 -> 2)
    assert reuse["gflops_per_image"] < full["gflops_per_image"]
    assert 0 < reuse["ssim"] <= 1 and reuse["psnr"] > 0
    out = tmp_path / "out"
    for name in ("results.jsonl", "report.md", "grid.png", "pareto.png", "images/ddim4/full.npy",
                 "images/ddim4-uniform-2/reuse.npy"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| full | DDIM 4 | all |" in report and "gap recovered" in report
    assert "| speckle |" in report.splitlines()[report.splitlines().index("## Results") + 2]
    assert f"{100 * full['speckle']:.1f}% |" in report
    # the real figure, once, from the 40 reference images of the fixture padded as in training
    from tiec.demo.data import load_fashion_mnist

    real = B.padded_speckle(load_fashion_mnist("test", fmnist_dir)[0])
    assert report.count("real test images padded as in training") == 1
    assert f"**{100 * real:.1f}%** (the 40 reference images)" in report
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4

    # a rerun with the same arguments generates nothing and keeps every row
    calls = []
    original = B.generate
    monkeypatch.setattr(B, "generate", lambda *a, **k: calls.append(a) or original(*a, **k))
    again = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert calls == [] and [r["row_key"] for r in again] == [r["row_key"] for r in rows]

    # a torn last line (interrupted write) is reported, ignored, and only that row is redone
    text = "\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2]
    (out / "results.jsonl").write_text(text)
    with pytest.warns(RuntimeWarning, match=r"results.jsonl: line 4 .* corrupt"):
        redone = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert len(calls) == 1 and [r["method"] for r in redone] == ["full", "reuse", "extrapolate", "interpolate"]
    assert redone[:3] == rows[:3] and redone[3]["fid"] == pytest.approx(rows[3]["fid"])

    # full's images are needed by the other rows: a lost image file is regenerated, its row kept
    (out / "images/ddim4/full.npy").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert (out / "images/ddim4/full.npy").is_file()


def test_an_interrupted_row_resumes_at_its_next_batch(tmp_path, fmnist_dir, monkeypatch):
    """A stop inside a row keeps its finished batches: the rerun generates only the others, and its row and images
    equal those of a run that was never interrupted; the first batch after the resume is a warm-up, not timed."""
    from tiec.eval import generation as G

    pipe = tiny_demo_pipeline()
    kw = dict(methods="full,reuse", batch_size=1)
    whole = B.run_bench(settings(tmp_path / "whole", fmnist_dir, **kw), pipe=pipe, extractor=FakeFeatures(),
                        progress=False)
    s = settings(tmp_path / "stop", fmnist_dir, **kw)
    calls, original, stop_at = [], G._call, [7]

    class Stop(Exception):
        pass

    def stopping(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == stop_at[0]:
            raise Stop
        return original(*args, **kwargs)

    monkeypatch.setattr(G, "_call", stopping)
    with pytest.raises(Stop):  # at the reuse row's third image: images 0 (warm-up) and 1 (timed) are kept
        B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    partial = tmp_path / "stop/out/partial/ddim4-uniform-2/reuse-0.npz"
    assert partial.is_file()
    calls.clear()
    stop_at[0] = None
    resumed = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert calls == [[2], [3]]
    assert resumed[1]["settings"]["timed_batches"] == 2  # image 1 from the file, image 3; image 2 warmed up
    assert not (tmp_path / "stop/out/partial").exists()  # the row is stored: its batches are gone
    for a, b in zip(whole, resumed):
        for name in ("fid", "psnr", "ssim", "adherence", "gflops_per_image", "key_steps", "stats", "speckle"):
            assert a[name] == b[name], name
    for folder in ("ddim4/full", "ddim4-uniform-2/reuse"):
        np.testing.assert_array_equal(np.load(tmp_path / f"whole/out/images/{folder}.npy"),
                                      np.load(tmp_path / f"stop/out/images/{folder}.npy"))

    # batches of another run (here: seed 0, stopped) in the folder are never mixed into this one (seed 7)
    calls.clear()
    stop_at[0] = 7
    with pytest.raises(Stop):
        B.run_bench(settings(tmp_path / "mixed", fmnist_dir, **kw), pipe=pipe, extractor=FakeFeatures(),
                    progress=False)
    calls.clear()
    stop_at[0] = None
    B.run_bench(settings(tmp_path / "mixed", fmnist_dir, **kw, seed=7), pipe=pipe, extractor=FakeFeatures(),
                progress=False)
    assert calls == [[0], [1], [2], [3]] * 2  # every image of both rows generated: seed 0's batches ignored

    # timings from another thread count are dropped on resume, the images kept
    calls.clear()
    stop_at[0] = 7
    third = settings(tmp_path / "third", fmnist_dir, **kw)
    with pytest.raises(Stop):
        B.run_bench(third, pipe=pipe, extractor=FakeFeatures(), progress=False)
    calls.clear()
    stop_at[0] = None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)
    with warnings.catch_warnings():  # on a busy CPU: the warning that 99 threads stall each other
        warnings.simplefilter("ignore", UserWarning)
        rows = B.run_bench(third, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert calls == [[2], [3]] and rows[1]["settings"]["timed_batches"] == 1


def test_a_row_another_run_finishes_meanwhile_is_skipped(tmp_path, fmnist_dir, monkeypatch):
    """Two runs of one protocol on one OUT share the work: a row that the other run stores while this one is busy
    is not generated again, and this run's rows and report include it."""
    pipe = tiny_demo_pipeline()
    other = B.run_bench(settings(tmp_path / "other", fmnist_dir, methods="full,extrapolate"), pipe=pipe,
                        extractor=FakeFeatures(), progress=False)
    mine = settings(tmp_path / "mine", fmnist_dir, methods="full,reuse,extrapolate")
    out, labels, original = Path(mine.out), [], B.generate

    def generate(*args, **kwargs):
        labels.append(args[9])
        if len(labels) == 1:  # the other run stores its extrapolate row (images first, then the line)
            target = out / "images/ddim4-uniform-2"
            target.mkdir(parents=True)
            for name in ("extrapolate.npy", "extrapolate.json"):
                shutil.copy(tmp_path / "other/out/images/ddim4-uniform-2" / name, target / name)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(other[1]) + "\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(B, "generate", generate)
    rows = B.run_bench(mine, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert labels == ["full ddim4", "reuse ddim4:uniform:2"]
    assert [r["method"] for r in rows] == ["full", "reuse", "extrapolate"] and rows[2] == other[1]
    assert "| extrapolate |" in (out / "report.md").read_text()


def test_bench_verdict_reads_the_spread_runs(tmp_path, fmnist_dir):
    """The plain row on two other seed sets (their own runs) and this run's give the spread in the verdict; a
    folder with no row of the same protocol is named, and an explicit folder without results is refused."""
    import statistics

    pipe = tiny_demo_pipeline()
    for seed in (4, 8):
        B.run_bench(settings(tmp_path / f"s{seed}", fmnist_dir, rows="full@ddim4:all", seed=seed), pipe=pipe,
                    extractor=FakeFeatures(), progress=False)
    B.run_bench(settings(tmp_path / "other", fmnist_dir, rows="full@ddim4:all", seed=12, num_images=2), pipe=pipe,
                extractor=FakeFeatures(), progress=False)  # disjoint seeds, but 2 images per row: another protocol
    folders = [tmp_path / d / "out" for d in ("s4", "s8", "other")]
    s = settings(tmp_path, fmnist_dir, rows="full@ddim4:all;full@ddim2:all;reuse@ddim4:uniform:2",
                 spread_from=",".join(str(f) for f in folders))
    rows = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    fids = [rows[0]["fid"]] + [read_rows(f / "results.jsonl")[0]["fid"] for f in folders[:2]]
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    text = "\n".join(lines)
    assert lines[2].startswith("**Verdict pending**: no plain DPM curve")  # only DDIM rows in this run
    assert f"Seed-to-seed spread of FID: {statistics.stdev(fids):.2f}" in text
    assert "plain DDIM 4 on seeds 0, 4, 8" in text  # the 2-image run (seed 12) is not of this protocol
    assert f"no plain row of this protocol in {folders[2]}" in text
    s = settings(tmp_path / "pending", fmnist_dir, rows="full@ddim4:all;full@ddim2:all;reuse@ddim4:uniform:2",
                 spread_from=str(folders[2]))
    B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    pending = (tmp_path / "pending" / "out" / "report.md").read_text()
    assert pending.splitlines()[2].startswith("**Verdict pending**: the seed-to-seed spread of FID needs 3")
    assert f"no plain row of this protocol in {folders[2]}" in pending
    with pytest.raises(ValueError, match="--spread-from .*nowhere: no results.jsonl"):
        settings(tmp_path, fmnist_dir, spread_from=str(tmp_path / "nowhere"))


def test_default_guidance_is_part_of_the_run_by_value(tmp_path, fmnist_dir, monkeypatch):
    """A run with the pipeline's default guidance records its value, and is the same run as one asking for that
    value; a run asking for another guidance is another run (nothing of the first is reused)."""
    from tiec.demo.model import DEFAULT_GUIDANCE

    pipe = tiny_demo_pipeline()
    first = B.run_bench(settings(tmp_path, fmnist_dir, methods="full"), pipe=pipe, extractor=FakeFeatures(),
                        progress=False)
    assert first[0]["settings"]["guidance_scale"] == DEFAULT_GUIDANCE
    calls = []
    original = B.generate
    monkeypatch.setattr(B, "generate", lambda *a, **k: calls.append(a) or original(*a, **k))
    same = B.run_bench(settings(tmp_path, fmnist_dir, methods="full", guidance_scale=DEFAULT_GUIDANCE), pipe=pipe,
                       extractor=FakeFeatures(), progress=False)
    assert calls == [] and same[0]["run_key"] == first[0]["run_key"]
    other = B.run_bench(settings(tmp_path, fmnist_dir, methods="full", guidance_scale=DEFAULT_GUIDANCE + 1),
                        pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert len(calls) == 1 and other[0]["run_key"] != first[0]["run_key"]


def test_demo_fingerprint_follows_the_weights_content_not_the_file_date(tmp_path, monkeypatch):
    import os
    import shutil

    from tiec.demo import model
    from tiec.eval.generation import load_model

    shipped = load_model("demo", torch.device("cpu"))[1]
    copy = tmp_path / "weights"
    shutil.copytree(model.WEIGHTS_DIR, copy)
    os.utime(copy / "unet.safetensors", (0, 0))  # a reinstall: same bytes, another date
    monkeypatch.setattr(model, "WEIGHTS_DIR", copy)
    assert load_model("demo", torch.device("cpu"))[1] == shipped
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # other content
    assert load_model("demo", torch.device("cpu"))[1] != shipped


def test_bench_results_do_not_depend_on_batch_size(tmp_path, fmnist_dir):
    pipe = tiny_demo_pipeline()
    a = B.run_bench(settings(tmp_path / "a", fmnist_dir, methods="full,reuse", batch_size=4), pipe=pipe,
                    extractor=FakeFeatures(), progress=False)
    b = B.run_bench(settings(tmp_path / "b", fmnist_dir, methods="full,reuse", batch_size=1), pipe=pipe,
                    extractor=FakeFeatures(), progress=False)
    assert a[0]["run_key"] == b[0]["run_key"]  # batch size is not part of the result's identity
    for x, y in zip(a, b):
        assert x["fid"] == pytest.approx(y["fid"], abs=1e-3) and x["adherence"] == y["adherence"]


def test_bench_two_fake_processes_merge_like_one(tmp_path, fmnist_dir):
    """Two ranks run in turn with a shared mailbox stand in for accelerate's gather/broadcast."""
    pipe = tiny_demo_pipeline()
    s = settings(tmp_path, fmnist_dir, methods="full,reuse", num_images=3)
    single = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)

    shards, answers = [], [FakeFeatures.name, {}, "run", "run"]  # what rank 0 broadcasts, in order

    class Rank1(Dist):
        def broadcast(self, obj):
            return answers.pop(0)

        def gather(self, obj):
            shards.append(obj)
            return []

    assert B.run_bench(s, pipe=pipe, dist=Rank1(1, 2), progress=False) == []
    assert answers == [] and [g.indices for g in shards] == [[1], [1]]

    class Rank0(Dist):
        def gather(self, obj):
            return [obj, shards.pop(0)]

    s2 = settings(tmp_path / "sharded", fmnist_dir, methods="full,reuse", num_images=3)
    sharded = B.run_bench(s2, pipe=pipe, extractor=FakeFeatures(), dist=Rank0(0, 2), progress=False)
    for x, y in zip(single, sharded):
        assert x["fid"] == pytest.approx(y["fid"], abs=1e-3) and x["adherence"] == y["adherence"]
        assert y["settings"]["processes"] == 2
    np.testing.assert_allclose(np.load(tmp_path / "out/images/ddim4/full.npy"),
                               np.load(tmp_path / "sharded/out/images/ddim4/full.npy"), atol=1)


def test_bench_with_the_demo_architecture(tmp_path, fmnist_dir):
    """The real (random-weight) demo pipeline, DPM-Solver++ and noise injection: a short but complete run."""
    from tiec.demo.model import build_pipeline

    pipe = build_pipeline(0)
    s = settings(tmp_path, fmnist_dir, methods="full,reuse+noise", schedules="dpm3:0/2", num_images=2,
                 noise_injection=0.003)
    rows = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False, model_fingerprint="demo-random")
    assert [r["method"] for r in rows] == ["full", "reuse+noise"]
    assert rows[1]["noise_injection"] == 0.003 and rows[1]["config"][0]["noise_injection"] == 0.003
    assert rows[1]["sampler"] == "dpm" and rows[1]["key_steps"] == [0, 2]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # restored after the run


def test_kept_samples_are_the_uncropped_images():
    pipe = tiny_demo_pipeline()
    prompts = ["sneaker", "bag", "dress"]
    config = M.build_configs(M.parse_method("reuse"), "uniform:2")
    g = B.generate(pipe, config, 4, prompts, range(3), seed=0, batch_size=2, progress=False, keep_samples=True)
    assert g.samples.shape == (3, 32, 32, 1) and g.samples.dtype == np.uint8
    np.testing.assert_array_equal(g.samples[:, 2:30, 2:30], g.images)  # the pipeline's crop of the same latents
    plain = B.generate(pipe, config, 4, prompts, range(3), seed=0, batch_size=2, progress=False)
    assert plain.samples is None
    np.testing.assert_array_equal(plain.images, g.images)  # keeping them changes nothing


def test_padded_speckle_pads_like_training():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0] = 255  # padded to 32x32: the 2-pixel pad is background, the image's edge ring (108 px) is bright
    images[1, 1:27, 1:27] = 255  # nothing on the edge ring
    assert B.padded_speckle(images) == pytest.approx((108 / 348 + 0) / 2)
    assert B.row_metrics(images, ["bag", "bag"], None, demo=False, extractor=None, reference=None,
                         clip_scorer=None)["speckle"] is None  # no samples (not the demo model): no figure


# -- report ---------------------------------------------------------------------------------------------

def test_results_table_reads_rows_without_speckle():
    old = {**_row("full", 10.0, 2.0), "key_steps": list(range(20))}  # written before the field existed
    new = {**_row("reuse", 12.0, 1.0), "key_steps": [0, 5, 10, 15], "speckle": 0.179}
    table = results_table([old, new]).splitlines()
    assert "| speckle |" in table[0]
    assert table[2].split(" | ")[4] == "–" and table[3].split(" | ")[4] == "17.9%"
    assert "speckle" not in results_table([old])  # no row has it: no column

def _row(method, fid, s, schedule="ddim20:uniform:5"):
    return {"method": method, "schedule": schedule if method != "full" else "ddim20", "sampler": "ddim",
            "num_steps": 20, "fid": fid, "s_per_image": s}


def test_gap_recovery_including_negative_values():
    rows = [_row("full", 10.0, 2.0), _row("reuse", 20.0, 1.0), _row("extrapolate", 17.0, 1.01),
            _row("interpolate", 22.0, 1.2), _row("reuse+noise", 18.0, 1.0), _row("extrapolate+noise", 14.0, 1.0)]
    gaps = {g["estimator"]: g for g in gap_recovery(rows)}
    assert gaps["extrapolate"]["recovered"] == pytest.approx(0.3)
    assert gaps["extrapolate"]["extra_s"] == pytest.approx(0.01)
    assert gaps["interpolate"]["recovered"] == pytest.approx(-0.2)  # worse than reuse: reported, not hidden
    assert gaps["extrapolate+noise"]["baseline"] == "reuse+noise"
    assert gaps["extrapolate+noise"]["recovered"] == pytest.approx(0.5)
    assert gaps["reuse+noise"]["baseline"] == "reuse"
    assert gaps["reuse+noise"]["recovered"] == pytest.approx(0.2)
    assert "reuse" not in gaps and "full" not in gaps
    # reuse no worse than full (as at DDIM 20 uniform:10 on the demo model, 25.97 against 26.77): no gap to recover
    rows[1]["fid"] = 9.5
    assert {g["estimator"]: g["recovered"] for g in gap_recovery(rows)}["extrapolate"] is None
    assert "n/a (no gap: reuse not worse than full)" in gap_table(rows)


def test_pareto_front():
    assert pareto_front([(1, 5), (2, 3), (3, 4), (0.5, 9)]) == [3, 0, 1]


def test_pareto_labels_do_not_overlap():
    rng = np.random.default_rng(0)
    points = [(0.3 + 0.01 * x, 0.4 + 0.01 * y) for x, y in rng.random((8, 2))] + [(0.9, 0.1)]  # a cluster, one apart
    widths, height = [0.15] * len(points), 0.03
    spots = place_labels(points, widths, height)
    boxes = [(x, y, w, height) for (x, y), w in zip(spots, widths)]
    for i, a in enumerate(boxes):
        assert 0.0 <= a[1] <= 1.0 - height
        for b in boxes[i + 1:]:
            assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + height and b[1] < a[1] + height)
    assert spots[-1] == (0.91, 0.09)  # alone: right beside its point


def test_cli_bench_parses_and_reports_bad_values(capsys):
    from tiec.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--quick", "--model", "demo-random", "--num-images", "8"])
    assert args.quick and args.num_images == 8 and args.func.__name__ == "_bench"
    assert main(["bench", "--methods", "full,warp", "--out", "/nonexistent/x"]) == 2
    assert "warp" in capsys.readouterr().err


def test_schedules_with_model_chosen_key_steps_parse():
    from tiec.eval import methods as M

    for text in ("ddim20:auto:5", "ddim50:adaptive:0.1"):
        schedule = M.parse_schedule(text)
        method = next(m for m in M.parse_methods("full,extrapolate") if m.name == "extrapolate")
        assert M.key_steps_of(method, schedule) is None
    full = next(m for m in M.parse_methods("full,extrapolate") if m.name == "full")
    assert M.key_steps_of(full, M.parse_schedule("ddim20:auto:5")) == list(range(20))
    with pytest.raises(ValueError, match="auto:30"):
        M.parse_schedule("ddim20:auto:30")


def test_explicit_rows_psnr_against_and_deepcache_intervals(tmp_path, fmnist_dir):
    """Rows run as given (with each sampler's ``full`` added), PSNR against one reference sampler for all."""
    pipe = tiny_demo_pipeline()
    s = settings(tmp_path, fmnist_dir, rows="deepcache@ddim6:every:2;full@ddim3:all;extrapolate+order2@ddim6:0/2/4",
                 psnr_against="ddim6")
    rows = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    assert [(r["method"], r["schedule"]) for r in rows] == [
        ("full", "ddim6"), ("deepcache", "ddim6:every:2"), ("full", "ddim3"), ("extrapolate+order2", "ddim6:0/2/4")]
    assert rows[0]["psnr"] is None  # the reference itself
    assert rows[1]["key_steps"] == [0, 2, 4] and rows[1]["config"][0]["cache_interval"] == 2
    assert rows[3]["config"][0]["extrapolation_order"] == 2
    full3 = np.load(tmp_path / "out/images/ddim3/full.npy").astype(np.float64)
    full6 = np.load(tmp_path / "out/images/ddim6/full.npy").astype(np.float64)
    mse = ((full3 - full6) ** 2).reshape(len(full3), -1).mean(axis=1)
    assert rows[2]["psnr"] == pytest.approx(float(np.mean(10 * np.log10(255.0 ** 2 / mse))), rel=1e-6)


def test_a_row_stored_with_another_psnr_reference_is_run_again(tmp_path, fmnist_dir, monkeypatch):
    """PSNR is not part of the run key: a row whose PSNR compared with other images is not taken as done, while
    rows written before the reference was recorded still are."""
    pipe = tiny_demo_pipeline()
    labels, original = [], B.generate
    monkeypatch.setattr(B, "generate", lambda *a, **k: labels.append(a[9]) or original(*a, **k))
    own = B.run_bench(settings(tmp_path, fmnist_dir, rows="reuse@ddim4:uniform:2"), pipe=pipe,
                      extractor=FakeFeatures(), progress=False)
    assert [r["psnr_reference"] for r in own] == [None, "ddim4"]
    labels.clear()
    other = B.run_bench(settings(tmp_path, fmnist_dir, rows="reuse@ddim4:uniform:2", psnr_against="ddim6"), pipe=pipe,
                        extractor=FakeFeatures(), progress=False)
    assert labels == ["full ddim6", "full ddim4", "reuse ddim4:uniform:2"]  # ddim4's full row now has a PSNR too
    assert [r["psnr_reference"] for r in other] == [None, "ddim6", "ddim6"]
    assert other[2]["psnr"] != own[1]["psnr"]
    results = Path(tmp_path / "out/results.jsonl")
    legacy = [{k: v for k, v in json.loads(line).items() if k != "psnr_reference"}
              for line in results.read_text().splitlines()]
    results.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    labels.clear()
    again = B.run_bench(settings(tmp_path, fmnist_dir, rows="reuse@ddim4:uniform:2"), pipe=pipe,
                        extractor=FakeFeatures(), progress=False)
    assert labels == [] and again[1]["psnr"] == other[2]["psnr"]  # unrecorded: the last line is taken


def test_a_partial_save_survives_its_folder_vanishing(tmp_path, monkeypatch):
    """Another run's ``drop_partial`` may remove the empty folder between mkdir and the write: the save retries."""
    from tiec.eval import generation as G

    path, original, vanished = tmp_path / "partial/ddim4/reuse-0.npz", G.atomic_write, []

    def write(target, fn):
        if not vanished:
            vanished.append(True)
            target.parent.rmdir()
        return original(target, fn)

    monkeypatch.setattr(G, "atomic_write", write)
    G._save_partial(path, "key", G._Partial(images=[np.zeros((1, 2, 2, 1), np.uint8)], samples=[None]))
    assert vanished and G._load_partial(path, "key").images[0].shape == (1, 2, 2, 1)


def test_frontier_preset_and_row_errors():
    s = B.BenchSettings.create(frontier=True)
    keys = [i.row_key.split("#")[0] for i in B.plan(s)]
    assert keys[0] == "full@ddim50" and len(keys) == len(set(keys)) == 71
    for needed in ("full@dpm6", "deepcache@ddim50:every:5", "deepcache+extrapolate@ddim50:every:7", "tome@ddim50",
                   "extrapolate+order2@ddim20:auto:5",
                   "interpolate@dpm20:uniform:5", "reuse@ddim50:adaptive:0.3", "reuse@ddim50:faster-diffusion",
                   "reuse+noise@ddim50:faster-diffusion", "extrapolate+noise@dpm20:auto:5", "full@dpm10",
                   "extrapolate@dpm10:auto:3", "reuse+noise@ddim12:auto:6"):
        assert needed in keys
    with pytest.raises(ValueError, match="expected <method>@"):
        B.BenchSettings(rows=("reuse",))
    with pytest.raises(ValueError, match="separated by ';'"):
        B.BenchSettings(rows="full@ddim20:all,reuse@ddim20:uniform:5")
    with pytest.raises(ValueError, match="order2"):
        M.parse_method("reuse+order2")
    with pytest.raises(ValueError, match="sampler"):
        B.BenchSettings(rows=("full@ddim4:all",), psnr_against="plms50")


def test_auto_rows_record_the_key_steps_their_calibration_chose(tmp_path, fmnist_dir, monkeypatch):
    from tiec import calibrate as C

    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path / "cache"))
    real = C.measure
    monkeypatch.setattr(C, "measure", lambda *a, **k: real(*a, **dict(k, num_samples=1, progress=False)))
    pipe = tiny_demo_pipeline()
    s = settings(tmp_path, fmnist_dir, rows="reuse@ddim6:auto:3;reuse@ddim6:adaptive:0.1;reuse@ddim6:uniform:3")
    rows = B.run_bench(s, pipe=pipe, extractor=FakeFeatures(), progress=False)
    auto, adaptive, uniform = rows[1], rows[2], rows[3]
    # the calibration, measured in the auto row's first call, is not counted in its cost: 3 key steps of 6 either way
    assert auto["gflops_per_image"] == pytest.approx(uniform["gflops_per_image"], rel=1e-9)
    (stored,) = (tmp_path / "cache" / "calibration").glob("calibration-*.json")
    chosen = C.Calibration.from_json(json.loads(stored.read_text())).solve(3)
    assert auto["key_steps"] == list(chosen) and auto["encoder_runs"] == 3
    assert adaptive["key_steps"] is None and adaptive["encoder_runs"] >= 1
    table = results_table(rows)
    assert "| 3 (auto:3) |" in table and f"| {adaptive['encoder_runs']} (adaptive:0.1) |" in table
