"""Pure image-quality metrics: PSNR, SSIM, frame speckle, Gaussian feature statistics and the Frechet distance.

Images are numpy arrays ``(N, H, W)`` or ``(N, H, W, C)``, either ``uint8`` (read as ``x / 255``) or
floats in ``[0, 1]``; every function returns per-image values (or one number) as plain numpy/float.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SPECKLE_FRAME, SPECKLE_THRESHOLD = 3, 0.25


def as_unit_float(images: np.ndarray) -> np.ndarray:
    """``uint8`` -> ``x / 255``, floats unchanged; always ``(N, H, W, C)`` float64.

    Example:
        >>> as_unit_float(np.full((2, 4, 4), 255, np.uint8)).shape
        (2, 4, 4, 1)
    """
    array = np.asarray(images)
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    else:
        array = array.astype(np.float64)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"images of shape {np.shape(images)}: expected (N, H, W) or (N, H, W, C)")
    return array


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_unit_float(a), as_unit_float(b)
    if x.shape != y.shape:
        raise ValueError(f"image sets differ in shape: {np.shape(a)} vs {np.shape(b)}; compare the same images")
    return x, y


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image pair (``inf`` where the images are identical).

    Args:
        a, b: image sets of equal shape, uint8 or floats in [0, 1].
        data_range: the value range of the (float) images; 1 for [0, 1].

    Example:
        >>> a = np.zeros((1, 8, 8)); psnr(a, a + 0.1)  # 10 * log10(1 / 0.01)
        array([20.])
    """
    x, y = _pair(a, b)
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-300)))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of each image pair, averaged over pixels and channels.

    An 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``, computed over the "valid" part of
    the image (no padding), as in the reference implementation. Images smaller than the window use a
    window of their size.

    Example:
        >>> a = np.random.default_rng(0).random((2, 28, 28)); ssim(a, a)
        array([1., 1.])
    """
    x, y = _pair(a, b)
    n, h, w, c = x.shape
    size = min(SSIM_WINDOW, h, w)
    g = _gaussian_window(size)
    # channels become batch entries; the 2-D Gaussian filter is separable
    to_t = lambda arr: torch.from_numpy(arr).permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    tx, ty = to_t(x), to_t(y)

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.conv2d(t, g.view(1, 1, size, 1))
        return torch.nn.functional.conv2d(t, g.view(1, 1, 1, size))

    mu_x, mu_y = blur(tx), blur(ty)
    var_x = blur(tx * tx) - mu_x ** 2
    var_y = blur(ty * ty) - mu_y ** 2
    cov = blur(tx * ty) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.reshape(n, -1).mean(dim=1).numpy()


def frame_speckle(images: np.ndarray, frame: int = SPECKLE_FRAME, threshold: float = SPECKLE_THRESHOLD) -> np.ndarray:
    """Per image, the share of values in its outer ``frame``-pixel border that are above ``threshold``.

    On images whose border should be background (the demo model's 32x32 samples, whose outer 2 pixels are
    padding in training), this counts bright specks where there should be none; caching errors show up
    there too. Every channel value counts as one value; the border is the image minus its inner
    ``(H - 2 frame) x (W - 2 frame)`` rectangle.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, C)``, uint8 (read as ``x / 255``) or floats in [0, 1].
        frame: the border's width in pixels, at least 1 and at most half the smaller side.
        threshold: values strictly above it count (0.25 lies between uint8 levels 63 and 64).

    Example:
        >>> images = np.zeros((1, 32, 32)); images[0, 0, :4] = 1.0  # 4 bright pixels of the 348 in the frame
        >>> frame_speckle(images)
        array([0.01149425])
    """
    x = as_unit_float(images)
    n, h, w, _ = x.shape
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 1 or 2 * frame > min(h, w):
        raise ValueError(f"frame={frame!r}: give an integer from 1 to {min(h, w) // 2} (half the smaller side "
                         f"of {h}x{w} images)")
    border = np.ones((h, w), dtype=bool)
    border[frame:h - frame, frame:w - frame] = False
    return (x[:, border, :] > threshold).reshape(n, -1).mean(axis=1)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``N - 1`` normalised) of a feature matrix ``(N, D)``, in float64.

    Example:
        >>> mu, sigma = gaussian_stats(np.random.default_rng(0).normal(size=(100, 8)))
        >>> mu.shape, sigma.shape
        ((8,), (8, 8))
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features of shape {feats.shape}: need a (N, D) matrix with N >= 2 to estimate a covariance")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about (near-)singular input; we check the result ourselves
        return scipy.linalg.sqrtm(sigma1 @ sigma2)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``.

    The matrix square root is scipy's ``sqrtm``. Covariances estimated from fewer samples than
    dimensions are singular; if the root is not finite, ``eps`` is added to both diagonals and it is
    taken again. Round-off leaves small imaginary parts, which are dropped; a large one (the product
    is then far from positive semi-definite) is warned about and dropped as well.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> mu, sigma = gaussian_stats(rng.normal(size=(500, 4)))
        >>> abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
        True
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both need mu (D,) and sigma (D, D) of one feature network")
    diff = mu1 - mu2
    root = _sqrtm_product(sigma1, sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(len(mu1)) * eps
        root = _sqrtm_product(sigma1 + offset, sigma2 + offset)
    if np.iscomplexobj(root):
        imag = np.abs(root.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(root.real).max()):
            warnings.warn(f"frechet_distance: sqrt(S1 S2) has an imaginary part of {imag:.3g}; it is dropped "
                          f"(too few samples for the feature dimension?)", RuntimeWarning, stacklevel=2)
        root = root.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def frechet_distance_to_features(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Frechet distance between the Gaussian of a feature set ``(N, D)`` and reference statistics ``(mu, sigma)``.

    With fewer samples than dimensions (``N - 1 < D``, the usual case for a few dozen images and 2048-d
    Inception features) the set's covariance is ``A^T A`` with ``A`` the centred features over
    ``sqrt(N - 1)``; the non-zero eigenvalues of ``A^T A sigma`` are those of the small symmetric matrix
    ``A sigma A^T``, so ``tr sqrt(S1 sigma) = tr sqrtm(A sigma A^T)``: exact, no regularisation, and an
    ``N x N`` instead of a ``D x D`` scipy ``sqrtm``. Otherwise this is ``frechet_distance``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> mu, sigma = gaussian_stats(rng.normal(size=(500, 64)))
        >>> round(frechet_distance_to_features(rng.normal(size=(20, 64)), mu, sigma), 1) > 0
        True
    """
    import scipy.linalg

    feats = np.asarray(features, dtype=np.float64)
    mu1, sigma1 = gaussian_stats(feats)
    n, dim = feats.shape
    if n - 1 >= dim:
        return frechet_distance(mu1, sigma1, mu, sigma)
    sigma = np.asarray(sigma, np.float64)
    if np.shape(mu) != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"statistics do not match: features (N, {dim}) vs mu {np.shape(mu)}, sigma {sigma.shape}")
    a = (feats - mu1) / np.sqrt(n - 1)
    small = a @ sigma @ a.T
    small = (small + small.T) / 2  # symmetric up to round-off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(small)
    trace_root = float(np.real(np.trace(root)))
    diff = mu1 - np.asarray(mu, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma) - 2.0 * trace_root)
