"""Sharding the benchmark's images across processes (``accelerate launch -m tiec bench``) and merging them back.

Launch, e.g. ``accelerate launch --num_processes 4 -m tiec bench ...`` on a GPU machine. On CPUs, accelerate's
``--cpu`` with several processes goes through ``mpirun`` (an MPI hostfile is needed); without MPI use
``accelerate launch --multi_gpu --num_processes 2 -m tiec bench --device cpu ...`` (torchrun underneath) or
``torchrun --nproc_per_node 2 -m tiec bench --device cpu ...``.

Image ``i`` always has generator seed ``seed + i``; process ``r`` of ``w`` makes images ``r, r + w, ...``;
the main process gathers every shard and puts the images back in index order, so the merged result
does not depend on the number of processes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch


def shard(count: int, rank: int, world: int) -> list[int]:
    """The image indices process ``rank`` of ``world`` generates (strided, so shards differ by at most one).

    Example:
        >>> shard(5, 1, 2)
        [1, 3]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}: need world >= 1 and 0 <= rank < world")
    return list(range(rank, count, world))


def merge(parts: Sequence[tuple[Sequence[int], np.ndarray]], count: int) -> np.ndarray:
    """Put gathered shards ``(indices, images)`` back in index order; every index ``0..count-1`` exactly once.

    Example:
        >>> merge([([0, 2], np.array([0, 2])), ([1], np.array([1]))], 3)
        array([0, 1, 2])
    """
    indices = [i for idx, _ in parts for i in idx]
    if sorted(indices) != list(range(count)):
        raise RuntimeError(f"gathered shards hold indices {sorted(indices)[:10]}...; expected each of 0..{count - 1} once")
    arrays = [np.asarray(images) for idx, images in parts if len(idx)]
    stacked = np.concatenate(arrays)
    out = np.empty_like(stacked)
    out[np.asarray(indices)] = stacked
    return out


class Dist:
    """The processes of one benchmark run: rank, world size, device, and gather/broadcast/barrier.

    One process: everything is local. Under ``accelerate launch`` (more than one process and accelerate
    importable): ``accelerate.PartialState``.

    Example:
        >>> dist = Dist.create("auto")
        >>> dist.rank, dist.world
        (0, 1)
    """

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, state: Any = None):
        self.rank, self.world, self.state = rank, world, state
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls, device: str = "auto") -> "Dist":
        """One process, or the accelerate process group when launched with several processes."""
        # torchrun / accelerate (WORLD_SIZE) or MPI (accelerate's multi-CPU launcher)
        names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
        world = max(int(os.environ.get(n) or 1) for n in names)
        if world > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                PartialState = None
            if PartialState is not None:
                state = PartialState(cpu=device == "cpu")
                chosen = state.device if device in ("auto", None) else torch.device(device)
                return cls(state.process_index, state.num_processes, chosen, state)
        return cls(0, 1, resolve_device(device))

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj``, on every process."""
        if self.state is None:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; other values as given.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (timers must not stop before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
