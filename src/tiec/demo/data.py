"""Fashion-MNIST from IDX files (the format of the original distribution and of Debian's package)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-dir "
    "pointing at a folder holding the four standard files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz; plain or gzipped)."
)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(RuntimeError):
    """Missing or unreadable data files; the message says which file and how to get it."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or plain) into a numpy array.

    Example:
        >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
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


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, "train" or "test".

    Example:
        >>> images, labels = load_fashion_mnist("test")
    """
    if split not in FILES:
        raise ValueError(f"split={split!r} is not known; use one of {sorted(FILES)}")
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
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
