"""A fresh machine: no Debian `dataset-fashion-mnist`. `tiec bench` still runs to its report with FID, from the
Fashion-MNIST test split shipped in the package; a --data-dir the user names is never silently replaced, and
training still needs the train split."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import numpy as np
import pytest

import tiec.demo.data as D
import tiec.eval.fid
from tiec.cli import main

ROOT = Path(__file__).resolve().parents[1]


class FakeFeatures:
    """A cheap stand-in for the FID network (same constructor as ``InceptionFeatures``)."""

    name = "fake-pixel-stats-v1"

    def __init__(self, device=None, path=None, batch_size=50, progress=True):
        pass

    def __call__(self, images):
        x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
        return np.stack([x.mean(1), x.std(1), (x > 0.5).mean(1), x[:, : x.shape[1] // 2].mean(1)], 1)


@pytest.fixture(params=["absent", "empty"])
def no_debian_package(request, tmp_path, monkeypatch):
    """Debian's default folder made to look absent (or present but empty, a half-removed package)."""
    folder = tmp_path / "usr-share-datasets-fashion-mnist"
    if request.param == "empty":
        folder.mkdir()
    monkeypatch.setattr(D, "DEFAULT_DATA_DIR", folder)
    return folder


def bench_argv(tmp_path, *extra):
    return ["bench", "--quick", "--model", "demo-random", "--methods", "full,reuse", "--schedules", "ddim4:uniform:2",
            "--num-images", "4", "--batch-size", "2", "--reference-size", "30", "--no-progress",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


def test_bench_runs_to_its_report_with_fid_without_the_debian_package(no_debian_package, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr(tiec.eval.fid, "InceptionFeatures", FakeFeatures)
    assert D.resolve_data_dir("test") == D.SHIPPED_TEST_DIR
    assert main(bench_argv(tmp_path)) == 0, capsys.readouterr().err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "read from the copy shipped with tiec" in report
    full = next(line for line in report.splitlines() if line.startswith("| full |"))
    fid = float(full.split(" | ")[3])
    assert np.isfinite(fid) and fid > 0
    assert "real test images padded as in training" in report and "| speckle |" in report
    assert (tmp_path / "out" / "grid.png").is_file()


def test_an_empty_data_dir_given_by_the_user_is_an_error(no_debian_package, tmp_path, monkeypatch, capsys):
    """The user asked for that folder: its missing files are named, and nothing is generated."""
    monkeypatch.setattr(tiec.eval.fid, "InceptionFeatures", FakeFeatures)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(bench_argv(tmp_path, "--data-dir", str(empty))) == 2
    err = capsys.readouterr().err
    assert f"missing data file t10k-images-idx3-ubyte.gz in folder {empty}" in err
    assert "apt-get install dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "results.jsonl").exists()
    assert main(bench_argv(tmp_path, "--data-dir", str(tmp_path / "nowhere"))) == 2
    assert "does not exist" in capsys.readouterr().err


def test_training_still_needs_the_train_split(no_debian_package, tmp_path, capsys):
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist("train")
    assert main(["train-demo", "--steps", "1", "--out", str(tmp_path / "t"), "--device", "cpu"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_the_debian_folder_or_a_given_one_comes_before_the_shipped_copy(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    D.write_idx(debian / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    D.write_idx(debian / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    monkeypatch.setattr(D, "DEFAULT_DATA_DIR", debian)
    assert D.resolve_data_dir("test") == debian and len(D.load_fashion_mnist("test")[0]) == 3
    assert D.resolve_data_dir("test", tmp_path / "mine") == tmp_path / "mine"
    assert D.resolve_data_dir("train") == debian


def test_the_shipped_test_split_and_its_licence():
    images, labels = D.load_fashion_mnist("test", D.SHIPPED_TEST_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    licence = (D.SHIPPED_TEST_DIR / "LICENSE").read_text()
    assert "Copyright (c) 2017 Zalando SE" in licence and "Permission is hereby granted" in licence
    # the files are package data, so that a non-editable install carries them
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tiec.demo"]
    demo = D.SHIPPED_TEST_DIR.parent
    for path in D.SHIPPED_TEST_DIR.iterdir():
        if path.is_file():
            assert any(fnmatch.fnmatch(path.relative_to(demo).as_posix(), p) for p in patterns), path
