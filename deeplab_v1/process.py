"""Process-wide settings a run decides once, at its start, and logs (issue #20 item 9).

Library code (``crf``, ``deeplab_v1.data``, ``deeplab_v1.engine``) never changes the state of the process
that calls it; the run's start (``RunContext.create``, which every ``deeplab`` stage command, ``deeplab
run`` and every torchrun rank goes through) calls :func:`configure_process`. A program that uses the
library without a run context keeps its own settings (and can call this function itself).
"""

from __future__ import annotations

from typing import Callable, Optional

from crf.pool import available_cores  # the one core count (the CPUs this process may run on)

__all__ = ["configure_process", "available_cores"]

_DONE: dict[str, object] = {}


def configure_process(log: Optional[Callable[[str], None]] = None) -> dict[str, object]:
    """Apply the run's process settings (once per process) and log them (every call with a ``log``, so
    that each run's log states them):

    * OpenCV on one thread (``cv2.setNumThreads(1)``): the DataLoader's worker processes are the data
      parallelism (each runs OpenCV on one thread, ``data.loader``), and no OpenCV thread pool is
      running when they are forked (a pool some OpenCV builds do not restore in a forked child).
    * glibc keeps freed large blocks (``crf.memory.reuse_freed_memory``): the torch CRF on CPU runs
      several times faster without the page faults of fresh ``mmap`` blocks; the process keeps its peak
      heap. No result depends on it.

    Args:
        log: called with one line naming the settings (the run's logger).

    Returns:
        ``{"opencv_threads": 1, "glibc_reuse_freed_memory": bool}`` (False where glibc is not the C
        library).
    """
    if not _DONE:
        import cv2

        from crf.memory import reuse_freed_memory

        cv2.setNumThreads(1)
        _DONE.update(opencv_threads=1, glibc_reuse_freed_memory=reuse_freed_memory())
    if log is not None:
        reuse = "on" if _DONE["glibc_reuse_freed_memory"] else "not available (no glibc)"
        log(f"process settings: OpenCV 1 thread (data workers are the parallelism); glibc keeps freed "
            f"memory for reuse: {reuse}")
    return dict(_DONE)
