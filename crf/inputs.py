"""What every CRF backend takes, checked in one place: the backend and device, the image and the class
probabilities, and the unary convention (DeepLab v1 Sec. 4.2, Eq. 1: ``U = -log P``).

Both backends (``crf.dense``'s pydensecrf and ``crf.torch_backend``) import this module, and neither imports
the other at import time: this is the floor they share. pydensecrf's binding fails silently or with an
unhelpful Cython buffer error on wrong dtypes, shapes or memory layouts; every input is therefore checked
here first, and every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numpy as np
from .errors import CRFInputError

__all__ = ["BACKENDS", "BACKEND_CHOICES", "PROB_EPSILON", "SUM_TOLERANCE", "check_backend", "check_inputs"]

#: The backends that run a CRF (``crf.dense.dense_crf``, ``crf.parallel``, ``crf.search``).
BACKENDS = ("pydensecrf", "torch")
#: What a caller may ask for: a backend, or ``"auto"`` (``crf.backend_choice.resolve_backend``: the torch
#: backend when it is installed and the inputs fit its memory budget, pydensecrf otherwise).
BACKEND_CHOICES = ("auto", *BACKENDS)
#: The unary convention of both backends: probabilities are clipped at this value before ``-log`` (unary at
#: most -log(1e-8) = 18.4; see ``crf.dense`` for why the clipping does not change the labelling).
PROB_EPSILON = 1e-8
#: ``probs`` must sum to 1 over classes within this absolute tolerance at every pixel. float16 storage
#: (as the search input files use) rounds each value by at most half a unit in the last place,
#: i.e. the sum by at most 2**-11 ~ 4.9e-4, well inside the tolerance.
SUM_TOLERANCE = 1e-3


def check_backend(backend: str, device: str) -> None:
    """Check that ``backend`` is one of :data:`BACKEND_CHOICES` and ``device`` is one it supports.

    ``"pydensecrf"`` runs on ``"cpu"`` only; ``"torch"`` and ``"auto"`` take ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` (whether CUDA is present is checked when the torch backend runs,
    ``crf.torch_backend.resolve_device``).

    Raises:
        CRFInputError (a ValueError): an unknown backend, a device that is not a string, or a device the backend does not
            support; the message names the value and what is accepted.
    """
    if backend not in BACKEND_CHOICES:
        raise CRFInputError(f"backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")
    if not isinstance(device, str):
        raise CRFInputError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    if backend == "pydensecrf":
        if device != "cpu":
            raise CRFInputError(f"device {device!r} is not available for backend 'pydensecrf' (CPU only); "
                             "use device='cpu' or backend='torch'")
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise CRFInputError(f"device must be 'cpu', 'cuda' or 'cuda:N' for backend {backend!r}, got {device!r}")


def check_inputs(image: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate an image and its class probabilities for the CRF; return C-contiguous copies if needed.

    Args:
        image: (H, W, 3) uint8 RGB, 0..255.
        probs: (C, H, W) floating point class probabilities (float16/32/64), C >= 2, finite,
            non-negative, summing to 1 over C within ``SUM_TOLERANCE``.

    Returns:
        ``(image, probs)``: image as C-contiguous uint8, probs as C-contiguous float32.

    Raises:
        TypeError: ``image`` is not uint8 (a float image is refused rather than silently cast, since
            it may be 0..1 or mean-subtracted BGR), or ``probs`` is not a floating point array.
        CRFInputError (a ValueError): a wrong number of dimensions or channels, H, W that differ between image and
            probs, C < 2, NaN/inf, negative values, or probabilities that do not sum to 1.
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise CRFInputError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 RGB 0..255, got dtype {image.dtype} (shape {image.shape}); "
                        "convert it explicitly (a float image is never cast silently)")
    if probs.ndim != 3:
        raise CRFInputError(f"probs must be (C, H, W), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point class probabilities, got dtype {probs.dtype}")
    if probs.shape[0] < 2:
        raise CRFInputError(f"probs must have C >= 2 classes, got shape {probs.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise CRFInputError(f"probs (C, H, W) = {probs.shape} and image (H, W, 3) = {image.shape} differ in H, W")
    p = np.ascontiguousarray(probs, dtype=np.float32)
    if not np.isfinite(p).all():
        raise CRFInputError(f"probs hold NaN or inf values (shape {probs.shape}, dtype {probs.dtype})")
    low = float(p.min())
    if low < 0:
        raise CRFInputError(f"probs must be non-negative, got a minimum of {low:g}")
    err = float(np.abs(p.sum(axis=0, dtype=np.float64) - 1.0).max())
    if err > SUM_TOLERANCE:
        raise CRFInputError(f"probs must sum to 1 over C (axis 0) within {SUM_TOLERANCE:g}, largest deviation is "
                         f"{err:.3g}; pass probabilities (see crf.dense.scores_to_probs), not raw scores")
    return np.ascontiguousarray(image), p
