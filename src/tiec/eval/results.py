"""Crash-safe storage of benchmark results: an append-only JSON-lines file and the generated images.

Every finished row is one ``os.write`` of a whole line to a file opened for appending, followed by
``fsync``: an interrupted run loses no finished row. A line that does not parse (a crash mid-write, a
hand edit) is reported with a warning naming the file and line, and ignored; the good rows around it
are kept, and the bad line is left in place for inspection (a later row starts on a fresh line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every well-formed row of a results file, in file order ([] if the file does not exist).

    Example:
        >>> read_rows("runs/bench/results.jsonl")  # no such file yet
        []
        >>> append_row("runs/bench/results.jsonl", {"method": "full", "fid": 12.3})
        >>> read_rows("runs/bench/results.jsonl")
        [{'method': 'full', 'fid': 12.3}]
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as e:
            last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            where = "the last line" if last else "a line"
            warnings.warn(f"{path}: line {number} ({where}) is corrupt and is ignored: {e}", RuntimeWarning,
                          stacklevel=2)
            continue
        rows.append(row)
    return rows


def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one row as a single JSON line, atomically (one write, then fsync).

    If the file does not end with a newline (a torn last line), the row starts on a new line so the
    torn line stays alone and is reported as corrupt, never merged with this row.

    Example:
        >>> append_row("runs/bench/results.jsonl", {"method": "full", "fid": 12.3})
        >>> append_row("runs/bench/results.jsonl", {"method": "reuse", "fid": 15.0})
        >>> [row["method"] for row in read_rows("runs/bench/results.jsonl")]
        ['full', 'reuse']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=False, default=_json_default) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # only on a full disk or similar: make the torn tail visible as one bad line
            raise OSError(f"{path}: wrote {written} of {len(data)} bytes of a results row")
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


def digest(obj: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able object (keys sorted, other values as ``str``): cache and resume keys.

    Example:
        >>> digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def array_digest(array: np.ndarray, length: int = 24) -> str:
    """A hash of an array's contents, dtype and shape: identifies data by what it holds, not where it lives.

    Example:
        >>> array_digest(np.zeros((2, 3), np.uint8)) == array_digest(np.zeros((3, 2), np.uint8))
        False
    """
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()[:length]


def safe_name(text: str) -> str:
    """A file-name-safe form of a method or schedule label (``ddim20:uniform:5`` -> ``ddim20-uniform-5``).

    Example:
        >>> safe_name("reuse+noise")
        'reuse+noise'
    """
    return re.sub(r"[^A-Za-z0-9+._-]+", "-", text).strip("-") or "_"


def images_path(out_dir: str | os.PathLike, schedule: str, method: str) -> Path:
    """Where the images of one (method, schedule) row live: ``OUT/images/<schedule>/<method>.npy``."""
    return Path(out_dir) / "images" / safe_name(schedule) / f"{safe_name(method)}.npy"


def partial_path(out_dir: str | os.PathLike, schedule: str, method: str, rank: int = 0) -> Path:
    """Where process ``rank`` keeps the batches of an unfinished row: ``OUT/partial/<schedule>/<method>-<rank>.npz``."""
    return Path(out_dir) / "partial" / safe_name(schedule) / f"{safe_name(method)}-{rank}.npz"


def drop_partial(path: str | os.PathLike) -> None:
    """Delete a ``partial_path`` file, and its folders once they are empty."""
    path = Path(path)
    path.unlink(missing_ok=True)
    for folder in (path.parent, path.parent.parent):  # OUT/partial/<schedule>, then OUT/partial
        try:
            folder.rmdir()
        except OSError:  # not empty: another row's (or process's) batches are still there
            return


def save_images(path: str | os.PathLike, images: np.ndarray, run_key: str | None = None) -> None:
    """Write an image array atomically (temporary file, fsync, rename), then a sidecar naming its run.

    The sidecar ``<name>.json`` records ``run_key`` and the shape, so images left by a run with other
    settings in the same folder are never mistaken for this run's.

    Example:
        >>> save_images("runs/bench/images/ddim20/full.npy", np.zeros((2, 28, 28, 1), np.uint8), run_key="4f53cda1")
        >>> sorted(p.name for p in Path("runs/bench/images/ddim20").iterdir())
        ['full.json', 'full.npy']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(images)))
    meta = json.dumps({"run_key": run_key, "shape": list(np.shape(images))}).encode()
    atomic_write(path.with_suffix(".json"), lambda f: f.write(meta))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(f)`` on a temporary file, fsync, then rename: never a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_images(path: str | os.PathLike, run_key: str | None = None) -> np.ndarray | None:
    """The saved images, or None if missing, unreadable, or (with ``run_key``) written by another run.

    Example:
        >>> save_images("runs/bench/images/ddim20/full.npy", np.zeros((2, 28, 28, 1), np.uint8), run_key="4f53cda1")
        >>> load_images("runs/bench/images/ddim20/full.npy", run_key="4f53cda1").shape
        (2, 28, 28, 1)
        >>> print(load_images("runs/bench/images/ddim20/full.npy", run_key="another run"))
        None
    """
    path = Path(path)
    if run_key is not None:
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("run_key") != run_key:
            return None
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if run_key is not None and list(images.shape) != meta.get("shape"):
        return None
    return images


def latest(rows: Iterable[dict[str, Any]], run_key: str) -> dict[str, dict[str, Any]]:
    """The last row of each ``row_key`` written under ``run_key`` (later rows win)."""
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("run_key") == run_key and "row_key" in row:
            found[row["row_key"]] = row
    return found
