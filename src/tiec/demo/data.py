"""Fashion-MNIST from IDX files (the format of the original distribution and of Debian's package).

Where each split comes from:

- ``data_dir`` given (``--data-dir``): that folder, and only that folder. The user asked for it, so a
  folder that lacks the split's files is an error (``DataError``), never a silent fallback.
- no ``data_dir``: Debian's ``dataset-fashion-mnist`` (``DEFAULT_DATA_DIR``). For the **test** split only,
  when that package is not installed, the copy shipped inside tiec (``SHIPPED_TEST_DIR``, 4.4 MB, MIT
  licence, see the ``LICENSE`` file there) is used, so the FID reference of ``tiec bench`` works on a
  fresh machine. The train split (``tiec train-demo``) is not shipped: it needs the package or ``--data-dir``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED_TEST_DIR = Path(__file__).resolve().parent / "fashion_mnist"  # the test split only, with its LICENSE
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-dir "
    "pointing at a folder holding the four standard files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz; plain or gzipped). Only the test split ships with tiec; it is used when "
    "no --data-dir is given and the Debian package is absent."
)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(RuntimeError):
    """Missing or unreadable data files; the message says which file and how to get it."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or plain) into a numpy array.

    Example:
        >>> labels = read_idx(resolve_data_dir("test") / "t10k-labels-idx1-ubyte.gz")
        >>> labels.shape, labels[:3]
        ((10000,), array([9, 2, 1], dtype=uint8))
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"missing data file {path} (folder {path.parent}). {HOW_TO_GET}") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read data file {path} (folder {path.parent}): {e}. {HOW_TO_GET}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"data file {path} (folder {path.parent}) is not an IDX file (bad magic number). {HOW_TO_GET}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"data file {path} (folder {path.parent}) is truncated in its header. {HOW_TO_GET}")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"data file {path} (folder {path.parent}) is truncated or corrupt: header announces shape "
            f"{tuple(shape)} ({expected} bytes), found {len(raw) - header} bytes. {HOW_TO_GET}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / name.removesuffix(".gz")):
        if candidate.exists():
            return candidate
    raise DataError(f"missing data file {name} in folder {data_dir}. {HOW_TO_GET}")


def _has_split(folder: Path, split: str) -> bool:
    return all((folder / name).is_file() or (folder / name.removesuffix(".gz")).is_file() for name in FILES[split])


def resolve_data_dir(split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder a split is read from: ``data_dir`` when given (checked when read, not here); otherwise
    ``DEFAULT_DATA_DIR`` (Debian's package), except that the test split falls back to ``SHIPPED_TEST_DIR``
    when the package does not hold it.

    Example:
        >>> resolve_data_dir("test", "/data/fashion-mnist")
        PosixPath('/data/fashion-mnist')
    """
    if split not in FILES:
        raise ValueError(f"split={split!r} is not known; use one of {sorted(FILES)}")
    if data_dir is not None:
        return Path(data_dir)
    if split == "test" and not _has_split(DEFAULT_DATA_DIR, "test") and _has_split(SHIPPED_TEST_DIR, "test"):
        return SHIPPED_TEST_DIR
    return DEFAULT_DATA_DIR


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, "train" or "test".

    ``data_dir`` None: Debian's package, or for the test split the copy shipped with tiec when the package
    is absent (see ``resolve_data_dir``). A given ``data_dir`` that lacks the split's files is a ``DataError``.

    Example:
        >>> images, labels = load_fashion_mnist("test")
        >>> images.shape, images.dtype, labels[:3]
        ((10000, 28, 28), dtype('uint8'), array([9, 2, 1]))
    """
    data_dir = resolve_data_dir(split, data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Fashion-MNIST folder {data_dir} does not exist. {HOW_TO_GET}")
    image_file, label_file = (_find(data_dir, name) for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"files {image_file.name} and {label_file.name} in {data_dir} do not match: "
                        f"images {images.shape}, labels {labels.shape}. {HOW_TO_GET}")
    return images, labels.astype(np.int64)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz); used by tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
