"""``backend: auto``: which CRF backend runs, and in how much memory (issue #14).

The torch backend (``crf.torch_backend``) gives the same labels as pydensecrf (the reference; see
``tests/test_crf_torch.py``) and is faster per configuration, so ``auto`` picks it when torch is installed
and the largest input fits its memory budget, and pydensecrf (the authors' C++ code, which needs no more
than a few hundred bytes per pixel) otherwise. The choice and its reason are recorded by every caller
(``best.json``, ``results.jsonl``, the crf stage's record).

Nothing here imports torch at import time: whether it is installed is asked of ``importlib`` only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import CRFInputError
from .inputs import check_backend

__all__ = ["TORCH_BYTES_PER_PIXEL", "TORCH_BYTES_PER_CHANNEL_PIXEL", "MAX_DEFAULT_MEMORY_MB", "BackendChoice",
           "torch_available", "torch_memory_mb", "default_memory_mb", "resolve_backend"]

#: Working memory of the torch backend per pixel, independent of the labels: the two lattices' indices and
#: weights and their construction (measured peak RSS on VOC val images, 366 x 500, sigma_alpha 50,
#: sigma_beta 3: about 360-420 MiB for 21 labels and one configuration, i.e. ~2.2 KiB per pixel).
TORCH_BYTES_PER_PIXEL = 1600
#: ... and per pixel and channel (labels x configurations filtered together): Q, energies, splat/blur buffers.
TORCH_BYTES_PER_CHANNEL_PIXEL = 48
#: Upper bound of the default budget of one CPU process, MiB.
MAX_DEFAULT_MEMORY_MB = 4096


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs: ``backend`` (``"pydensecrf"`` or ``"torch"``), its ``device``, ``reason`` (one
    line for logs and records) and the ``memory_mb`` budget the choice was made for."""

    backend: str
    device: str
    reason: str
    memory_mb: float

    def to_dict(self) -> dict:
        return {"backend": self.backend, "device": self.device, "reason": self.reason, "memory_mb": self.memory_mb}


_TORCH: list[bool] = []


def torch_available() -> bool:
    """True when ``torch`` can be imported (asked of ``importlib``; cached)."""
    if not _TORCH:
        _TORCH.append(importlib.util.find_spec("torch") is not None)
    return _TORCH[0]


def torch_memory_mb(pixels: int, classes: int, configs: int = 1) -> float:
    """Estimated peak working memory of one torch-backend call, MiB.

    Args:
        pixels: H x W of the input (or the sum over a batch of images).
        classes: C labels.
        configs: configurations filtered together (``mean_field``'s group; 1 for the crf stage).

    Returns:
        MiB: ``pixels * (TORCH_BYTES_PER_PIXEL + TORCH_BYTES_PER_CHANNEL_PIXEL * classes * configs) / 2**20``.
    """
    return pixels * (TORCH_BYTES_PER_PIXEL + TORCH_BYTES_PER_CHANNEL_PIXEL * classes * configs) / 2**20


def default_memory_mb(device: str = "cpu", processes: int = 1) -> float:
    """The budget when none is given, MiB: on CPU half the physical memory shared among ``processes``
    (at most :data:`MAX_DEFAULT_MEMORY_MB`); on CUDA half the device's free memory, counting what
    PyTorch's caching allocator holds unused as free (``crf.memory.cuda_free_mb``: the test net's freed
    blocks are still reserved when the CRF starts), 4096 where it cannot be asked.

    The per-pixel estimate it is compared with (:func:`torch_memory_mb`) was measured as CPU peak RSS;
    on CUDA an estimate that is too low ends in ``crf.memory.CRFOutOfMemory`` (a one-line error naming
    the budget), never in another result (issue #20)."""
    if device.startswith("cuda"):
        try:
            from .memory import cuda_free_mb

            return cuda_free_mb(device) / 2
        except Exception:  # noqa: BLE001 - no CUDA here: the torch backend will say so when it runs
            return 4096.0
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return float(min(MAX_DEFAULT_MEMORY_MB, total / 2**20 / 2 / max(1, processes)))


def resolve_backend(backend: str, device: str, shapes: Iterable[Sequence[int]], *, memory_mb: float | None = None,
                    processes: int = 1, configs: int = 1) -> BackendChoice:
    """The backend that runs for ``backend`` (``"auto"``, ``"pydensecrf"`` or ``"torch"``).

    Args:
        backend, device: as checked by :func:`crf.inputs.check_backend`.
        shapes: the (C, H, W) shapes of the probabilities that will run (the largest decides).
        memory_mb: the torch backend's budget per process in MiB; None -> :func:`default_memory_mb`.
        processes: processes sharing the machine's memory (for the default budget).
        configs: configurations per call (the search's lattice group).

    Returns:
        A :class:`BackendChoice`. ``"auto"`` gives torch (on ``device``) when torch is installed and
        :func:`torch_memory_mb` of the largest shape is within the budget; pydensecrf on CPU otherwise (its
        reason names the largest input as width x height pixels).
        An explicit backend is returned as it is.

    Raises:
        CRFInputError (a ValueError): a bad backend or device, a budget that is not a positive number.
    """
    check_backend(backend, device)
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float))
                                  or not memory_mb > 0):
        raise CRFInputError(f"memory_mb must be None or a number > 0 (MiB), got {memory_mb!r}")
    budget = float(memory_mb) if memory_mb is not None else default_memory_mb(device, processes)
    if backend != "auto":
        return BackendChoice(backend, device, f"backend {backend!r} requested", budget)
    if not torch_available():
        return BackendChoice("pydensecrf", "cpu", "auto: torch is not installed", budget)
    largest = max((tuple(int(x) for x in s) for s in shapes), key=lambda s: s[1] * s[2], default=None)
    if largest is None:
        return BackendChoice("torch", device, "auto: torch (no inputs to size)", budget)
    need = torch_memory_mb(largest[1] * largest[2], largest[0], configs)
    if need > budget:
        return BackendChoice("pydensecrf", "cpu", f"auto: the largest input, {largest[2]}x{largest[1]} pixels x "
                             f"{largest[0]} labels, needs ~{need:.0f} MiB in torch, over the {budget:.0f} MiB budget",
                             budget)
    return BackendChoice("torch", device, f"auto: torch fits ({need:.0f} of {budget:.0f} MiB for "
                         f"{largest[2]}x{largest[1]} pixels x {largest[0]} labels)", budget)
