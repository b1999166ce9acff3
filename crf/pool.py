"""Worker processes for CRF work: the one pool builder of ``crf.parallel`` (many images, one configuration)
and ``crf.search`` (many configurations x images).

Workers are started with ``spawn`` (any platform; no inherited torch/OpenMP state) and load their own
inputs from files, so a task is a few bytes to pickle. N processes x M threads must not exceed the cores:
each worker gets ``cpu_count // (workers * processes_per_machine)`` threads (at least 1), set before the
fresh process imports torch so that torch's OpenMP runtime honours it too. pydensecrf itself is
single-threaded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Callable, Optional
from .errors import CRFInputError

__all__ = ["available_cores", "resolve_workers", "worker_threads", "default_workers", "LAYOUT_REASON",
           "watch_parent", "worker_init", "make_executor", "InlineExecutor"]

#: Why the torch backend on CPU runs as one single-threaded process per core, never in this process with
#: every core's threads (issue #21 item 9), measured by ``tools/bench_crf_search.py`` (VOC val images, the
#: paper's grid, 2 cores): idle, one process of 2 threads gave 4.74 configuration x image pairs per second
#: and two single-threaded processes 4.36 (8 % slower); busy, the threaded process fell far behind (crf-demo's
#: search: 72.5 s in-process at a load average of 2.65, 19.3 s as two processes at 3.9; 0.78x against 1.72x
#: pydensecrf at a load of 5-7; threads against processes, pairs per second, under other jobs: 0.92 against
#: 1.61 at a load average of 4.1-5.5, 0.35 against 0.98 at 7.7-8.0, 0.32 against 0.66 at 9.6-10.1): a busy
#: core stalls the other half of every op of the threaded process, while separate processes carry on.
#: The load average cannot pick between them in time (it lags by a minute and counts the run's own work),
#: so the layout that is never much slower is the only one.
LAYOUT_REASON = ("one single-threaded process per core (idle ~8 % slower than one process with every core's "
                 "threads, busy 1.7-3.7x faster)")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else ``os.cpu_count()``):
    the one count every default of the distribution (CRF workers, threads, loader and check workers)
    starts from."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """``None`` -> ``available_cores()``; otherwise an integer >= 1 (ValueError names a bad value)."""
    if workers is None:
        return available_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CRFInputError(f"workers must be None or an integer >= 1, got {workers!r}")
    return workers


def worker_threads(workers: int, processes_per_machine: int = 1) -> int:
    """Threads per worker: the cores shared among ``workers`` x ``processes_per_machine`` (e.g. torchrun's
    local ranks) processes, at least 1."""
    return max(1, available_cores() // max(1, workers * processes_per_machine))


def default_workers(backend: str, device: str = "cpu", processes_per_machine: int = 1) -> tuple[int, str]:
    """The CRF worker processes when none are configured, and why (for the records).

    pydensecrf (single-threaded C++): one process per core. torch on CUDA: 1 (this, the GPU-owning
    process). torch (or ``auto``) on CPU: one single-threaded process per core, whatever the load
    (:data:`LAYOUT_REASON`; issue #21 item 9: the in-process layout with every core's threads was 9 %
    faster idle and 1.7-3.7x slower on a busy machine). Cores are :func:`available_cores` shared among
    ``processes_per_machine`` (torchrun's local ranks). The layout never changes a result: every layout
    computes the same labels.

    Returns:
        (workers >= 1, a one-line reason; for torch on CPU it names the 1-minute load average and the cores).
    """
    total = available_cores()
    cores = max(1, total // max(1, processes_per_machine))
    if backend == "pydensecrf":
        return cores, "pydensecrf: one single-threaded process per core"
    if device.startswith("cuda"):
        return 1, "torch on CUDA: this process"
    if cores == 1:
        return 1, "one core"
    try:
        load = f"load average {os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):  # pragma: no cover - no load average on this OS
        load = "no load average"
    return cores, f"torch on CPU, {load} on {total} cores: {LAYOUT_REASON}"


def watch_parent(parent_pid: int, interval: float = 0.5) -> threading.Thread:
    """In a worker: a daemon thread that ends the process as soon as its parent ``parent_pid`` is gone
    (a ``kill -9`` of the run leaves no worker writing outputs behind it)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(1)

    t = threading.Thread(target=watch, name="watch-parent", daemon=True)
    t.start()
    return t


def worker_init(threads: int, backend: str, initializer: Optional[Callable[..., Any]] = None,
                initargs: tuple = (), parent_pid: Optional[int] = None) -> None:
    """Runs first in every worker: watches the parent (``watch_parent``), caps the threads
    (``OMP_NUM_THREADS``; torch's for the torch backend), then calls ``initializer(*initargs)`` if given (a
    module-level function, e.g. the search's cache budget)."""
    if parent_pid is not None:
        watch_parent(parent_pid)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if backend in ("torch", "auto"):
        import torch

        from .memory import reuse_freed_memory

        torch.set_num_threads(threads)
        reuse_freed_memory()  # glibc keeps freed blocks: this worker process is crf's own (crf.memory)
    if initializer is not None:
        initializer(*initargs)


def make_executor(workers: int, backend: str, *, processes_per_machine: int = 1,
                  initializer: Optional[Callable[..., Any]] = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A ``spawn`` pool of ``workers`` processes, each capped to :func:`worker_threads` threads.

    Args:
        workers: processes in the pool (>= 1).
        backend: ``"pydensecrf"``, ``"torch"`` or ``"auto"`` (torch and auto also get ``torch.set_num_threads``).
        processes_per_machine: other processes sharing the cores (torchrun's local ranks), 1 by default.
        initializer, initargs: run in every worker after the thread cap (must be picklable).

    Raises:
        CRFInputError (a ValueError): ``workers`` is not an integer >= 1.
    """
    workers = resolve_workers(workers)
    threads = worker_threads(workers, processes_per_machine)
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=worker_init,
                               initargs=(threads, backend, initializer, initargs, os.getpid()))


class InlineExecutor(Executor):
    """Runs a submitted call at once in this process (``workers=1``): the pool's code path, no pool and no
    thread cap (the caller's process keeps its settings)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed over to the caller through the future
            fut.set_exception(exc)
        return fut
