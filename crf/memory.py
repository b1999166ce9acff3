"""Memory accounting of the torch backend (issue #20): the free memory of a CUDA device as the caching
allocator sees it, the bytes held by cached lattices, and glibc's allocator setting for CPU runs.

``crf`` never changes process-wide state by itself: :func:`reuse_freed_memory` is called by the entry
points that own the process (the ``deeplab`` command, the benchmark tools) and by the CRF worker
processes that ``crf`` starts itself; each caller logs what it did.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator

import torch

from .errors import DeepLabError

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "CRFOutOfMemory", "reuse_freed_memory", "cuda_free_mb",
           "tensor_bytes", "LatticeCache", "out_of_memory_hint"]

#: ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` of ``mallopt(3)``; both are C ``int`` parameters, so the
#: values stay below 2**31 (``1 << 31`` wrapped to -2**31 when passed as an ``int``).
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_MALLOC_TUNED: list[bool] = []


def reuse_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse instead of unmapping them (Linux/glibc only).

    PyTorch's CPU allocator takes every tensor from ``malloc``; glibc serves blocks above its mmap
    threshold with fresh ``mmap`` pages and unmaps them on ``free``, so every new ``(N, C)`` tensor of a
    mean-field iteration page-faults anew. That costs more than the arithmetic: on a 2-core machine
    ``F.embedding_bag`` of a VOC-sized slice took 10 ms with fresh pages and 1.9 ms with reused ones.
    Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps the blocks in the heap; the process keeps
    its peak heap instead of returning it to the system. Process-wide: only an entry point calls it
    (once; later calls return the first answer). The results do not depend on it, only the speed.

    Returns:
        True when both settings were applied (now or earlier), False where they do not apply.
    """
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    applied = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
            applied = False
    _MALLOC_TUNED.append(applied)
    return applied


class CRFOutOfMemory(DeepLabError, RuntimeError):
    """The torch backend ran out of device memory within its ``memory_mb`` budget: the budget or its
    per-pixel estimate (``crf.backend_choice``, measured as CPU peak RSS) is too large for this device."""


@contextmanager
def out_of_memory_hint(device: torch.device, memory_mb: float) -> Iterator[None]:
    """Turn torch's out-of-memory error on ``device`` into a one-line :class:`CRFOutOfMemory` that names
    the budget and what to lower (the CUDA footprint of the backend has not been measured on a GPU yet)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CRFOutOfMemory(
            f"the torch CRF backend ran out of memory on {device} within a budget of {memory_mb:.0f} MiB (the "
            f"per-pixel estimate of crf.backend_choice was measured on CPU): set crf.memory_mb / "
            f"crf_search.memory_mb lower or backend: pydensecrf ({first})") from exc


def cuda_free_mb(device: str | torch.device) -> float:
    """Memory a new CUDA allocation on ``device`` can get, MiB: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (e.g. the test net's freed activations), which
    ``torch.cuda.mem_get_info`` counts as taken.

    Raises:
        RuntimeError: CUDA is not available (from torch).
    """
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    idle = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return (free + max(0, idle)) / 2**20


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors an object holds: a tensor, a tuple/list of objects, or an object whose
    attributes are tensors or tuples of tensors (a ``PermutohedralLattice``); storage shared between views
    is counted per view (an upper bound)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v) for v in vars(obj).values() if isinstance(v, (torch.Tensor, tuple, list)))
    return 0


class LatticeCache:
    """The last ``entries`` values built by ``build()`` under their keys (least recently used dropped
    first), with the bytes they hold (:func:`tensor_bytes`), so that a caller counts them against its
    memory budget and trims them when they take too much of it.

    Args:
        entries: the most values kept (>= 1).
    """

    def __init__(self, entries: int) -> None:
        self.entries = max(1, int(entries))
        self._items: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value of ``key``, built (and kept) when it is not cached."""
        hit = self._items.get(key)
        if hit is None:
            value = build()
            hit = self._items[key] = (value, tensor_bytes(value))
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return hit[0]

    def nbytes(self) -> int:
        """Bytes held by the cached values."""
        return sum(size for _, size in self._items.values())

    def trim(self, max_bytes: float) -> None:
        """Drop the least recently used values until at most ``max_bytes`` are held (the most recent one
        stays: it is in use)."""
        while len(self._items) > 1 and self.nbytes() > max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every value."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
