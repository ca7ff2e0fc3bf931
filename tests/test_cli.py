"""The command line: user errors are one line and exit 2, found before anything is loaded; Ctrl-C, outputs,
key-step lists, image size, and the demo trainer's run-folder rules, all through ``tiec.cli.main``."""

from __future__ import annotations

import shlex
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import tiec.demo
import tiec.demo.train
import tiec.eval.bench
import tiec.eval.fid
from tiec.cli import main
from tiec.demo.data import write_idx
from tiec.eval.results import read_rows


def one_line_error(capsys, code: int, *needles: str) -> str:
    """Assert exit status 2 and a single line on stderr, without a traceback, that holds every needle."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("tiec ") and ": error: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run_to_exit(argv: list[str]) -> int:
    """``main(argv)``; a Ctrl-C escaping it fails the test instead of stopping the whole pytest session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped tiec.cli.main")


def forbid(monkeypatch, target, name: str):
    """Make ``target.name`` fail the test if called: the check must come before loading anything."""
    def called(*args, **kwargs):
        raise AssertionError(f"{name} was called before the arguments were checked")
    monkeypatch.setattr(target, name, called)


class FakeFeatures:
    """A cheap stand-in for the FID network: a few pixel statistics per image."""

    name = "fake-pixel-stats-v1"

    def __call__(self, images):
        x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
        return np.stack([x.mean(1), x.std(1), (x > 0.5).mean(1), x[:, : x.shape[1] // 2].mean(1)], axis=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny Fashion-MNIST folder: 16 train and 16 test images in the IDX format."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (16, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, 16))
    return folder


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def train(out, data_dir, *extra: str) -> list[str]:
    return ["train-demo", "--steps", "2", "--batch-size", "2", "--threads", "1", "--out", str(out),
            "--data-dir", str(data_dir), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A demo training run of 2 steps (batch 2): its folder holds checkpoint.pt."""
    out = tmp_path_factory.mktemp("run") / "demo"
    assert main(train(out, data_dir)) == 0
    assert (out / "checkpoint.pt").is_file()
    return out


# -- 16: user errors are one line, exit 2 ----------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "bench", "train-demo"])
def test_cuda_without_a_gpu_is_refused_before_loading(command, no_cuda, monkeypatch, capsys, tmp_path, data_dir):
    forbid(monkeypatch, tiec.demo, "load_pipeline")
    forbid(monkeypatch, tiec.eval.bench, "load_model")
    forbid(monkeypatch, tiec.demo.train, "load_fashion_mnist")
    argv = {"generate": ["generate", "--prompt", "bag", "--out", str(tmp_path / "x.png")],
            "bench": ["bench", "--model", "demo-random", "--out", str(tmp_path / "b")],
            "train-demo": train(tmp_path / "t", data_dir)}[command]
    one_line_error(capsys, main([*argv, "--device", "cuda"]), "--device 'cuda'", "no CUDA GPU")
    assert not (tmp_path / "t").exists()


def test_unknown_device_is_named(capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.demo, "load_pipeline")
    code = main(["generate", "--prompt", "bag", "--device", "banana", "--out", str(tmp_path / "x.png")])
    one_line_error(capsys, code, "'banana'", "cpu", "cuda")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_model_folder_without_a_pipeline(command, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = (["generate", "--prompt", "a cat", "--out", str(tmp_path / "x.png")] if command == "generate"
            else ["bench", "--out", str(tmp_path / "b")])
    one_line_error(capsys, main([*argv, "--model", str(empty)]), str(empty), "model_index.json")


def test_generate_out_at_or_under_a_file(capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.demo, "load_pipeline")
    afile = tmp_path / "a.png"
    afile.write_bytes(b"not an image")
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--out", str(afile)]), str(afile), "--force")
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--out", str(afile / "x.png")]),
                   f"{afile} is a file")
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--out", str(afile / "sub" / "x.png")]),
                   f"{afile} is a file")
    assert afile.read_bytes() == b"not an image"


def test_bench_out_at_or_under_a_file(capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.eval.bench, "load_model")
    afile = tmp_path / "results"
    afile.write_text("x")
    base = ["bench", "--model", "demo-random", "--quick"]
    one_line_error(capsys, main([*base, "--out", str(afile)]), f"{afile} is a file, not a folder")
    one_line_error(capsys, main([*base, "--out", str(afile / "run")]), f"{afile} is a file")


def test_train_demo_empty_data_dir(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, main(train(tmp_path / "run", empty)), "missing data file", str(empty))


def test_train_demo_batch_size_zero(capsys, tmp_path, data_dir):
    one_line_error(capsys, main([*train(tmp_path / "run", data_dir), "--batch-size", "0"]), "batch_size=0")


# -- 17: outputs are checked before the work -------------------------------------------------------------

def test_generate_out_folder_or_unknown_extension_fails_before_sampling(capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.demo, "load_pipeline")
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--out", str(tmp_path)]), "is a folder",
                   "tiec-generate.png")
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--out", str(tmp_path / "img.xyz")]), "'.xyz'",
                   ".png")
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--out", str(tmp_path / "img")]), "extension")


def test_generate_refuses_to_overwrite_without_force(capsys, tmp_path):
    out = tmp_path / "bag.png"
    argv = ["generate", "--prompt", "bag", "--steps", "2", "--key-steps", "uniform:1", "--out", str(out)]
    assert main(argv) == 0
    first = out.read_bytes()
    out.write_bytes(b"keep me")
    one_line_error(capsys, main(argv), str(out), "--force")
    assert out.read_bytes() == b"keep me"
    assert main([*argv, "--force"]) == 0 and out.read_bytes() == first


def test_force_and_native_size_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--force overwrite --out if it exists" in text and "--native-size" in text


# -- 18: non-finite numbers -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (["generate", "--prompt", "bag", "--guidance", "nan"], "--guidance"),
    (["generate", "--prompt", "bag", "--guidance", "inf"], "--guidance"),
    (["generate", "--prompt", "bag", "--noise-injection=-inf"], "--noise-injection"),
    (["train-demo", "--lr", "nan"], "--lr"),
    (["bench", "--model", "demo-random", "--guidance", "inf"], "--guidance"),
    (["bench", "--model", "demo-random", "--noise-injection", "nan"], "--noise-injection"),
])
def test_non_finite_floats_are_refused(argv, option, capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.demo, "load_pipeline")
    forbid(monkeypatch, tiec.eval.bench, "run_bench")
    forbid(monkeypatch, tiec.demo.train, "train_unet")
    one_line_error(capsys, main([*argv, "--out", str(tmp_path / "out.png")]), option, "finite")


# -- 19: reference size, key-step lists, Ctrl-C, prompts and data paths -----------------------------------

def test_reference_size_above_the_data_set_is_refused(capsys, monkeypatch, tmp_path, data_dir):
    forbid(monkeypatch, tiec.eval.bench, "load_model")
    code = main(["bench", "--model", "demo-random", "--quick", "--data-dir", str(data_dir), "--reference-size",
                 "50000", "--out", str(tmp_path / "b"), "--no-progress", "--threads", "1"])
    one_line_error(capsys, code, "50000", "holds 16 images", "at most 16")


def test_generate_takes_a_key_step_list(capsys, tmp_path):
    for key_steps in ("0,2", "0/2"):
        out = tmp_path / f"{key_steps.replace('/', '-')}.png"
        assert main(["generate", "--prompt", "bag", "--method", "reuse", "--steps", "4", "--key-steps", key_steps,
                     "--out", str(out)]) == 0
        assert "encoder runs 2/4" in capsys.readouterr().out
    one_line_error(capsys, main(["generate", "--prompt", "bag", "--steps", "4", "--key-steps", "0,9",
                                 "--out", str(tmp_path / "x.png")]), "out of range")


def test_flops_takes_a_key_step_list(capsys, monkeypatch):
    import tiec.flops

    seen = []
    monkeypatch.setattr(tiec.flops, "build_sd15_unet", lambda device: None)
    monkeypatch.setattr(tiec.flops, "decoder_share", lambda *a: 0.5)
    monkeypatch.setattr(tiec.flops, "loop_flops", lambda unet, configs=(), **k: seen.append(configs) or
                        {"total": 1e12, "encoder_runs": 1, "decoder_runs": 1})
    assert main(["flops", "--steps", "4", "--key-steps", "0,2", "--estimators", "reuse"]) == 0
    assert [c.key_steps for c in seen[1]] == [(0, 2)]
    capsys.readouterr()
    one_line_error(capsys, main(["flops", "--steps", "4", "--key-steps", "0,9"]), "out of range")
    assert len(seen) == 2  # the bad list failed before any counting


def test_bench_takes_key_step_lists_in_schedules(capsys, monkeypatch, tmp_path, data_dir):
    monkeypatch.setattr(tiec.eval.fid, "InceptionFeatures", lambda *a, **k: FakeFeatures())
    out = tmp_path / "b"
    code = main(["bench", "--model", "demo-random", "--methods", "full,reuse", "--schedules", "ddim4:0,3,ddim4:0/2",
                 "--num-images", "2", "--batch-size", "2", "--data-dir", str(data_dir), "--reference-size", "8",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    rows = read_rows(out / "results.jsonl")
    assert [(r["method"], r["schedule"], r["key_steps"]) for r in rows] == [
        ("full", "ddim4", [0, 1, 2, 3]), ("reuse", "ddim4:0/3", [0, 3]), ("reuse", "ddim4:0/2", [0, 2])]
    assert "subset of 8 images" in (out / "report.md").read_text()


def test_ctrl_c_in_bench_is_one_line_with_the_resume_command(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tiec.eval.bench, "run_bench", interrupted)
    argv = ["bench", "--model", "demo-random", "--quick", "--out", str(tmp_path / "my run")]
    assert run_to_exit(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.endswith(shlex.join(["tiec", *argv])) and "interrupted" in err


def test_ctrl_c_in_generate_is_one_line(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tiec.demo, "load_pipeline", interrupted)
    assert run_to_exit(["generate", "--prompt", "bag", "--out", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err.strip() == "tiec generate: interrupted"


def test_ctrl_c_in_train_demo_prints_a_resume_command_that_works(capsys, monkeypatch, tmp_path, data_dir):
    batch_indices = tiec.demo.train._batch_indices

    def interrupt_at_step_1(seed, step, n, batch_size):
        if step == 1:
            raise KeyboardInterrupt
        return batch_indices(seed, step, n, batch_size)
    monkeypatch.setattr(tiec.demo.train, "_batch_indices", interrupt_at_step_1)
    out = tmp_path / "run"
    assert run_to_exit(train(out, data_dir, "--checkpoint-every", "5")) == 130
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the lines above are the training progress bar
    assert "Traceback" not in err and last.startswith("tiec train-demo: interrupted")
    resume = shlex.split(last.split(": ", 2)[-1])
    assert resume[0] == "tiec" and resume[-1] == "--resume"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
    monkeypatch.setattr(tiec.demo.train, "_batch_indices", batch_indices)
    assert main(resume[1:]) == 0
    assert "resumed from" in capsys.readouterr().out and (out / "unet.safetensors").is_file()


def test_ctrl_c_in_train_demo_before_any_checkpoint_says_it_starts_over(capsys, monkeypatch, tmp_path, data_dir):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tiec.demo.train, "_batch_indices", interrupted)
    assert run_to_exit(train(tmp_path / "run", data_dir)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "tiec train-demo: interrupted before the first checkpoint; the same command starts over"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_binary_prompts_file_is_named(capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.eval.bench, "run_bench")
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    one_line_error(capsys, main(["bench", "--model", "demo-random", "--prompts", str(prompts),
                                 "--out", str(tmp_path / "b")]), str(prompts), "UTF-8")


@pytest.mark.parametrize("command", ["train-demo", "bench"])
def test_data_dir_at_a_file_says_it_is_a_file(command, capsys, monkeypatch, tmp_path):
    forbid(monkeypatch, tiec.eval.bench, "run_bench")
    afile = tmp_path / "data.gz"
    afile.write_bytes(b"x")
    argv = train(tmp_path / "run", afile) if command == "train-demo" else [
        "bench", "--model", "demo-random", "--data-dir", str(afile), "--out", str(tmp_path / "b")]
    one_line_error(capsys, main(argv), f"--data-dir {afile} is a file")


# -- 15: the demo trainer's run folder ------------------------------------------------------------------------

def test_train_demo_refuses_to_rerun_into_a_run_without_resume(capsys, trained, data_dir):
    one_line_error(capsys, main(train(trained, data_dir, "--steps", "4")), "checkpoint.pt", "--resume")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_demo_refuses_steps_below_one(steps, capsys, tmp_path, data_dir):
    one_line_error(capsys, main([*train(tmp_path / "run", data_dir), "--steps", steps]), f"steps={steps}")


@pytest.mark.parametrize("change, named", [(["--batch-size", "4"], "batch_size"), (["--lr", "0.001"], "lr")])
def test_train_demo_resume_with_another_recipe_is_refused(change, named, capsys, trained, data_dir):
    one_line_error(capsys, main([*train(trained, data_dir, "--steps", "4", "--resume"), *change]),
                   "another recipe", named)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_train_demo_damaged_checkpoint(damage, capsys, tmp_path, trained, data_dir):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2] if damage == "truncated" else b"garbage" * 99)
    one_line_error(capsys, main(train(out, data_dir, "--steps", "4", "--resume")), str(ckpt), "cannot be read")
    assert not (out / "checkpoint.pt.tmp").exists()


# -- image size and grid -----------------------------------------------------------------------------------

def test_generate_enlarges_small_images_unless_native_size(tmp_path):
    base = ["generate", "--prompt", "bag", "--steps", "2", "--method", "full"]
    assert main([*base, "--out", str(tmp_path / "big.png")]) == 0
    assert main([*base, "--native-size", "--out", str(tmp_path / "native.png")]) == 0
    big, native = np.asarray(Image.open(tmp_path / "big.png")), np.asarray(Image.open(tmp_path / "native.png"))
    assert native.shape[:2] == (28, 28) and big.shape[:2] == (140, 140)  # 28 * 5 >= 128
    np.testing.assert_array_equal(big, np.repeat(np.repeat(native, 5, axis=0), 5, axis=1))  # nearest neighbour


def test_generate_grid_layout(tmp_path):
    base = ["generate", "--prompt", "sneaker", "--steps", "2", "--method", "full", "--native-size"]
    assert main([*base, "--num-images", "3", "--out", str(tmp_path / "three.png")]) == 0
    assert Image.open(tmp_path / "three.png").size == (3 * 28, 28)
    assert main([*base, "--num-images", "9", "--out", str(tmp_path / "nine.png")]) == 0
    nine = np.asarray(Image.open(tmp_path / "nine.png"))
    assert nine.shape[:2] == (2 * 28, 8 * 28)  # 8 a row; the rest of the second row is blank
    assert nine[28:, 28:].max() == 0 and nine[28:, :28].max() > 0


def test_train_demo_cooldown_on_resume_lowers_the_learning_rate(tmp_path, trained, data_dir, capsys):
    """A constant-rate run resumed with --cooldown: the rate of the last step is lr * (steps - step) / cooldown
    (step 3 of 4, cooldown 2: half of lr * 4/200, the warm-up factor still applying)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert main([*train(out, data_dir, "--steps", "4", "--resume"), "--cooldown", "2"]) == 0
    groups = torch.load(out / "checkpoint.pt", weights_only=False)["opt"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(5e-4 * 4 / 200 * 0.5, rel=1e-12)
    capsys.readouterr()
    one_line_error(capsys, main([*train(tmp_path / "other", data_dir, "--steps", "4"), "--cooldown", "5"]),
                   "cooldown=5")
