"""Several processes, one per device (``torchrun``): rank, world size and the few collectives the
pipeline needs.

    torchrun --standalone --nproc_per_node=N -m deeplab_v1 run EXPERIMENT.yaml
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT -m deeplab_v1 run ...

The process group is started from torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (NCCL on CUDA,
gloo on CPU); without them the run is the single process (rank 0 of 1) and nothing here does anything.
Roles: every rank trains (DDP; global batch = batch_size x iter_size x world size), tests its shard of
the images and takes part in the CRF search (``crf.search.dist``); rank 0 alone holds the run folder's
lock, writes the log, checkpoints, records, the CRF outputs and the report (``DISTRIBUTED_STAGES``). A
multi-node run needs ``output_dir`` on a file system every node sees.

Failures: a rank that raises leaves the process (``deeplab`` exits with status 2); its sockets close, the
other ranks' pending gloo collective fails at once and torchrun stops every rank, so nobody waits for
a timeout. Work that only rank 0 does before the others go on (the data check, the stage plan) goes
through ``on_main``, which hands rank 0's error to every rank.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import DeepLabError

__all__ = ["DISTRIBUTED_STAGES", "DistInfo", "RankError", "init_from_env", "current", "barrier", "broadcast",
           "on_main", "all_sum", "shard"]

T = TypeVar("T")

#: Stages every rank runs; the others run on rank 0 alone.
DISTRIBUTED_STAGES: frozenset[str] = frozenset({"train", "test", "crf_search"})


class RankError(DeepLabError, RuntimeError):
    """Another rank failed; the message is that rank's error."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world``, ``local_rank`` of ``local_world`` on its
    machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1


def current() -> DistInfo:
    """The job of the started process group, or the single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                    int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))


def init_from_env(device: str = "cpu", timeout_s: float | None = None, *, uses_cuda: bool = False) -> DistInfo:
    """Start the process group torchrun describes (``WORLD_SIZE`` > 1), once; NCCL for ``device: cuda``,
    gloo for ``cpu``. Where the run uses CUDA at all (``device: cuda``, or ``uses_cuda``: the CRF or the
    search on ``cuda`` beside a CPU network), each rank's current CUDA device is ``cuda:LOCAL_RANK``, so
    that a device named ``"cuda"`` is this rank's GPU, never every rank's ``cuda:0`` (issue #20).

    Args:
        timeout_s: collective timeout (default ``DEEPLAB_DIST_TIMEOUT_S`` or 1800 s); only a rank that
            hangs without dying waits for it.
        uses_cuda: some part of the run other than the network runs on CUDA.

    Raises:
        RankError: the run uses CUDA and a machine has more ranks than CUDA devices.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return current()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda" or uses_cuda:
            if local >= torch.cuda.device_count():
                raise RankError(f"local rank {local} has no CUDA device ({torch.cuda.device_count()} visible); "
                                "start at most one process per GPU (--nproc_per_node)")
            torch.cuda.set_device(local)
        backend = "nccl" if device == "cuda" else "gloo"
        timeout = timedelta(seconds=float(timeout_s or os.environ.get("DEEPLAB_DIST_TIMEOUT_S", 1800)))
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(_destroy)
    return current()


@contextmanager
def _peers() -> Iterator[None]:
    """A collective's failure because a peer died, as a one-line ``RankError``."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise RankError(f"another rank stopped (its error comes first in the output): {first}") from exc


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for one process).

    Raises:
        RankError: another rank died.
    """
    if current().active:
        with _peers():
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's picklable ``obj`` on every rank."""
    if not current().active:
        return obj
    box = [obj]
    with _peers():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result on every rank. Rank 0's error is raised on every rank: there as it
    was, on the others as a ``RankError`` with its message (so every rank stops with it).

    One process: just ``fn()``.
    """
    info = current()
    if not info.active:
        return fn()
    result: Any = None
    error: str | None = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # handed to every rank below, then re-raised here as it was
            failure, error = exc, f"{type(exc).__name__}: {exc}" if not isinstance(exc, DeepLabError) else str(exc)
    ok, result, error = broadcast((failure is None, result, error))
    if failure is not None:
        raise failure
    if not ok:
        raise RankError(f"rank 0 failed: {error}")
    return result


def all_sum(value: float | int | torch.Tensor) -> Any:
    """``value`` summed over the ranks (float64 / int64 on the CPU for scalars; tensors in place, on their
    device). One process: ``value``."""
    if not current().active:
        return value
    with _peers():
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value)
            return value
        dtype = torch.int64 if isinstance(value, int) else torch.float64
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=dtype, device=device)
        dist.all_reduce(t)
        return t.item()


def shard(items: Sequence[T], info: DistInfo | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from ``rank`` (a fixed split of the full
    list, whatever is already done)."""
    info = info or current()
    return list(items[info.rank::info.world])
