"""Metrics of the evaluation harness: PSNR, SSIM, Frechet distance, the FID network's input convention, caching."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tiec.eval import fid as F
from tiec.eval.metrics import (SSIM_K1, SSIM_K2, frame_speckle, frechet_distance, frechet_distance_to_features,
                               gaussian_stats, psnr, ssim)


# -- PSNR / SSIM -------------------------------------------------------------------------------------

def test_psnr_identical_is_inf_and_constant_offset_matches_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.8, size=(3, 16, 16, 1))
    assert np.all(np.isinf(psnr(a, a)))
    # an offset of 0.05 everywhere: MSE = 0.0025, PSNR = 10 log10(1 / 0.0025) = 26.0206 dB
    np.testing.assert_allclose(psnr(a, a + 0.05), 10 * np.log10(1 / 0.0025), rtol=1e-12)
    # uint8 input is read as x / 255: an offset of 51 levels is 0.2
    u = np.full((1, 8, 8), 100, np.uint8)
    np.testing.assert_allclose(psnr(u, u + 51), 10 * np.log10(1 / 0.04), rtol=1e-12)


def test_ssim_identical_is_one_and_constant_images_match_the_formula():
    rng = np.random.default_rng(1)
    a = rng.random((2, 28, 28))
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    # constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    x, y = np.full((1, 20, 20), 0.3), np.full((1, 20, 20), 0.7)
    c1 = SSIM_K1 ** 2
    np.testing.assert_allclose(ssim(x, y), (2 * 0.3 * 0.7 + c1) / (0.3 ** 2 + 0.7 ** 2 + c1), rtol=1e-10)


def test_ssim_matches_a_direct_window_by_window_computation():
    rng = np.random.default_rng(2)
    a = rng.random((1, 13, 13))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    values = []
    for i in range(3):
        for j in range(3):
            x, y = a[0, i:i + 11, j:j + 11], b[0, i:i + 11, j:j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
            cov = (w * x * y).sum() - mx * my
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(ssim(a, b), [np.mean(values)], rtol=1e-10)
    assert ssim(a, b)[0] < 1.0


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))


# -- frame speckle -------------------------------------------------------------------------------------

def test_frame_speckle_counts_bright_values_in_the_outer_frame_only():
    # 32x32 with a 3-pixel frame: 32^2 - 26^2 = 348 frame pixels
    images = np.zeros((3, 32, 32))
    images[1, 0, 0] = images[1, 2, 17] = images[1, 31, 29] = 1.0  # in the frame (row 2 and column 29 are its edge)
    images[1, 3, 3] = images[1, 16, 16] = images[1, 28, 28] = 1.0  # inside: not counted
    images[2] = 0.9
    np.testing.assert_allclose(frame_speckle(images), [0.0, 3 / 348, 1.0])
    # the default frame and threshold are the issue's: 3 pixels, 0.25
    np.testing.assert_allclose(frame_speckle(images, frame=1), [0.0, 2 / 124, 1.0])  # (2, 17) is not in a 1-px frame


def test_frame_speckle_threshold_is_strict_and_reads_uint8_as_x_over_255():
    u = np.zeros((2, 8, 8, 1), np.uint8)
    u[0, 0, :] = 64  # 0.251 > 0.25: counted
    u[1, 0, :] = 63  # 0.247: not
    np.testing.assert_allclose(frame_speckle(u, frame=2), [8 / 48, 0.0])  # 64 - 16 = 48 frame pixels
    f = np.full((1, 8, 8), 0.25)
    assert frame_speckle(f)[0] == 0.0  # exactly the threshold is not above it
    rgb = np.zeros((1, 6, 6, 3))
    rgb[0, 0, 0, 0] = 1.0  # each channel value counts once: 1 of 32 pixels x 3 channels
    np.testing.assert_allclose(frame_speckle(rgb, frame=1), [1 / 60])


def test_frame_speckle_rejects_a_bad_frame():
    for frame in (0, 5, 1.5):
        with pytest.raises(ValueError, match="frame="):
            frame_speckle(np.zeros((1, 8, 8)), frame=frame)
    np.testing.assert_allclose(frame_speckle(np.ones((1, 8, 8)), frame=4), [1.0])  # the whole image


# -- Frechet distance ---------------------------------------------------------------------------------

def _reference_fd(mu1, s1, mu2, s2):
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(3).normal(size=(300, 32))
    mu, sigma = gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_scipy_reference_and_closed_form():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(1.0, 2.0, size=(400, 24))
    s_a, s_b = gaussian_stats(a), gaussian_stats(b)
    np.testing.assert_allclose(frechet_distance(*s_a, *s_b), _reference_fd(*s_a, *s_b), rtol=1e-8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2, v1, v2 = np.zeros(3), np.array([1.0, 0, 2]), np.array([1.0, 4, 9]), np.array([4.0, 4, 1])
    expected = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_singular_covariances_is_finite():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))  # 10 samples in 64-d: rank 9 covariances
    value = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert np.isfinite(value) and value > 0


def test_frechet_distance_to_features_is_exact_for_few_samples():
    rng = np.random.default_rng(8)
    mu, sigma = gaussian_stats(rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48)))
    few = rng.normal(0.5, 1.5, size=(12, 48))  # 12 samples in 48-d: a rank-11 covariance
    mu1, sigma1 = gaussian_stats(few)
    # independent reference: tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), symmetric eigensolvers only
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(root1 @ sigma @ root1), 0, None)
    expected = ((mu1 - mu) ** 2).sum() + np.trace(sigma1) + np.trace(sigma) - 2 * np.sqrt(lam).sum()
    assert frechet_distance_to_features(few, mu, sigma) == pytest.approx(expected, rel=1e-8)
    many = rng.normal(size=(100, 48))  # enough samples: the plain sqrtm path
    assert frechet_distance_to_features(many, mu, sigma) == pytest.approx(
        frechet_distance(*gaussian_stats(many), mu, sigma), rel=1e-10)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -- the FID network's input convention ---------------------------------------------------------------

def test_inception_input_convention():
    gray = np.zeros((2, 28, 28), np.uint8)
    gray[:, :, 14:] = 255
    x = F.to_inception_input(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray replicated to RGB
    assert x.min().item() == -1.0 and x.max().item() == pytest.approx(255 / 128 - 1)  # (x - 128) / 128
    # floats in [0, 1] are quantised to 8 bits first: the same as their uint8 version
    assert torch.equal(F.to_inception_input(gray / 255.0), x)
    assert torch.equal(F.to_inception_input(np.full((1, 4, 4, 1), 0.5)), F.to_inception_input(np.full((1, 4, 4), 128, np.uint8)))


def test_tf_bilinear_resize_samples_at_j_times_scale():
    ramp = torch.arange(28, dtype=torch.float32).view(1, 1, 1, 28).expand(1, 1, 28, 28)
    out = F.tf_bilinear_resize(ramp)[0, 0, 0]
    src = np.arange(299) * 28 / 299
    np.testing.assert_allclose(out.numpy(), np.minimum(src, 27), atol=1e-3)  # edge clamped


def test_real_inception_features_on_a_few_images():
    extractor = F.InceptionFeatures(batch_size=2, progress=False)
    images = np.random.default_rng(6).integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    feats = extractor(images)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    assert feats.min() >= 0  # pool features after ReLU
    assert not np.allclose(feats[0], feats[1])
    assert "default_1.pt" in extractor.name


def test_reference_statistics_are_cached_by_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return gaussian_stats(np.random.default_rng(len(calls)).normal(size=(20, 4)))

    first = F.cached_stats({"data": "a"}, compute, tmp_path)
    second = F.cached_stats({"data": "a"}, compute, tmp_path)
    assert len(calls) == 1 and np.array_equal(first[1], second[1])
    F.cached_stats({"data": "b"}, compute, tmp_path)
    assert len(calls) == 2



def counting_network():
    """A stand-in FID network (3 features from pixel statistics) that counts its calls."""
    class Fake:
        name = "fake-mean"
        calls = 0

        def __call__(self, images):
            Fake.calls += 1
            arr = np.asarray(images, np.float64).reshape(len(images), -1)
            return np.stack([arr.mean(1), arr.std(1), arr[:, :10].mean(1)], 1)
    return Fake()

def test_fashion_mnist_reference_on_a_small_idx_set(tmp_path):
    from tiec.demo.data import write_idx

    rng = np.random.default_rng(7)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 30))

    network = counting_network()

    (mu, sigma), what = F.fashion_mnist_reference(network, count=20, data_dir=tmp_path, cache_dir=tmp_path / "c")
    assert mu.shape == (3,) and sigma.shape == (3, 3) and "20 images" in what
    F.fashion_mnist_reference(network, count=20, data_dir=tmp_path, cache_dir=tmp_path / "c")
    assert type(network).calls == 1  # second time from the cache


def test_fashion_mnist_reference_cache_is_keyed_by_the_images_not_the_folder(tmp_path):
    """The same images from two folders share one entry; other images in the same file (same name, size and
    date) are never served the old statistics."""
    import os

    from tiec.demo.data import write_idx

    network = counting_network()

    rng = np.random.default_rng(9)
    images, labels = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_idx(tmp_path / folder / "t10k-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / folder / "t10k-labels-idx1-ubyte.gz", labels)
    cache = tmp_path / "cache"
    (mu_a, _), what = F.fashion_mnist_reference(network, count=20, data_dir=tmp_path / "a", cache_dir=cache)
    (mu_b, _), _ = F.fashion_mnist_reference(network, count=20, data_dir=tmp_path / "b", cache_dir=cache)
    assert type(network).calls == 1 and np.array_equal(mu_a, mu_b) and f"read from folder {tmp_path / 'a'}" in what

    # other images in place of folder a's, keeping the file's size and date: new statistics
    target = tmp_path / "a" / "t10k-images-idx3-ubyte.gz"
    stat = target.stat()
    write_idx(target, 255 - images)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (mu_c, _), _ = F.fashion_mnist_reference(network, count=20, data_dir=tmp_path / "a", cache_dir=cache)
    assert type(network).calls == 2 and not np.array_equal(mu_a, mu_c)
    # a subset of another size is another entry
    F.fashion_mnist_reference(network, count=10, data_dir=tmp_path / "b", cache_dir=cache)
    assert type(network).calls == 3


def test_folder_reference_cache_is_keyed_by_file_contents(tmp_path):
    import os

    from PIL import Image

    class Fake:
        name = "fake-mean"
        calls = 0

        def __call__(self, images):
            Fake.calls += 1
            return np.stack([[np.mean(im), np.std(im), np.mean(im[:4])] for im in images])

    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.default_rng(10)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.bmp")  # fixed-size files
    cache = tmp_path / "cache"
    (mu_a, _), _ = F.folder_reference(Fake(), folder, cache_dir=cache)
    F.folder_reference(Fake(), folder, cache_dir=cache)
    assert Fake.calls == 1
    target = folder / "0.bmp"
    stat, size = target.stat(), target.stat().st_size
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == size  # same name, size and date: only the contents differ
    (mu_b, _), _ = F.folder_reference(Fake(), folder, cache_dir=cache)
    assert Fake.calls == 2 and not np.array_equal(mu_a, mu_b)


def test_packed_statistics_round_trip():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(50, 6))
    mu, sigma = gaussian_stats(features)
    mu32, sigma32 = F.unpack_stats(F.pack_stats(mu, sigma, "float32"))
    assert np.array_equal(sigma32, sigma32.T) and np.allclose(sigma32, sigma, rtol=1e-6)
    assert np.array_equal(mu32, mu.astype(np.float32).astype(np.float64))
    assert F.pack_stats(mu, sigma)["sigma_upper"].shape == (6 * 7 // 2,)


def test_shipped_statistics_are_used_only_for_their_exact_key(tmp_path, monkeypatch):
    """Statistics of the whole test set ship with tiec; a reference of other images or another network computes."""
    from tiec.demo.data import write_idx

    rng = np.random.default_rng(11)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 12))
    network = counting_network()
    from tiec.demo.data import load_fashion_mnist
    key = F.fashion_mnist_key(network.name, load_fashion_mnist("test", tmp_path)[0], None)
    shipped = tmp_path / "shipped.npz"
    F.write_shipped_stats(F.pack_stats(np.arange(3.0), np.eye(3), "float32"), key, shipped)
    monkeypatch.setattr(F, "SHIPPED_STATS", shipped)
    (mu, sigma), _ = F.fashion_mnist_reference(network, data_dir=tmp_path, cache_dir=tmp_path / "c")
    assert type(network).calls == 0 and mu.tolist() == [0.0, 1.0, 2.0] and np.array_equal(sigma, np.eye(3))
    F.fashion_mnist_reference(network, count=10, data_dir=tmp_path, cache_dir=tmp_path / "c")  # a subset: computed
    assert type(network).calls == 1
    assert F.read_shipped_stats(dict(key, network="another-network"), shipped) is None


def test_the_shipped_statistics_match_the_default_network_and_the_shipped_test_split():
    """Regenerate with benchmarks/reference_stats.py --write when the network, its convention or the data change."""
    from tiec.demo.data import SHIPPED_TEST_DIR, load_fashion_mnist

    images, _ = load_fashion_mnist("test", SHIPPED_TEST_DIR)
    key = F.fashion_mnist_key(F.InceptionFeatures().name, images, None)
    stats = F.read_shipped_stats(key)
    assert stats is not None
    mu, sigma = stats
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.array_equal(sigma, sigma.T)
    assert np.all(np.diag(sigma) >= 0) and np.isfinite(mu).all()
