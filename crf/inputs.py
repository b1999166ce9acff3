"""What every CRF backend takes, checked in one place: the backend and device, the image and the class
probabilities, and the unary convention (DeepLab v1 Sec. 4.2, Eq. 1: ``U = -log P``).

Both backends (``crf.dense``'s pydensecrf and ``crf.torch_backend``) import this module, and neither imports
the other at import time: this is the floor they share. pydensecrf's binding fails silently or with an
unhelpful Cython buffer error on wrong dtypes, shapes or memory layouts; every input is therefore checked
here first, and every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BACKENDS", "PROB_EPSILON", "SUM_TOLERANCE", "check_backend", "check_inputs"]

#: Backends accepted by ``crf.dense.dense_crf`` (and the search, ``crf.search``).
BACKENDS = ("pydensecrf", "torch")
#: The unary convention of both backends: probabilities are clipped at this value before ``-log`` (unary at
#: most -log(1e-8) = 18.4; see ``crf.dense`` for why the clipping does not change the labelling).
PROB_EPSILON = 1e-8
#: ``probs`` must sum to 1 over classes within this absolute tolerance at every pixel. float16 storage
#: (as the search input files use) rounds each value by at most half a unit in the last place,
#: i.e. the sum by at most 2**-11 ~ 4.9e-4, well inside the tolerance.
SUM_TOLERANCE = 1e-3


def check_backend(backend: str, device: str) -> None:
    """Check that ``backend`` is one of :data:`BACKENDS` and ``device`` is one it supports.

    ``"pydensecrf"`` runs on ``"cpu"`` only; ``"torch"`` takes ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (whether
    CUDA is present is checked when the torch backend runs, ``crf.torch_backend.resolve_device``).

    Raises:
        ValueError: an unknown backend, a device that is not a string, or a device the backend does not
            support; the message names the value and what is accepted.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    if backend == "pydensecrf":
        if device != "cpu":
            raise ValueError(f"device {device!r} is not available for backend 'pydensecrf' (CPU only); "
                             "use device='cpu' or backend='torch'")
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' for backend 'torch', got {device!r}")


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
        ValueError: a wrong number of dimensions or channels, H, W that differ between image and
            probs, C < 2, NaN/inf, negative values, or probabilities that do not sum to 1.
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 RGB 0..255, got dtype {image.dtype} (shape {image.shape}); "
                        "convert it explicitly (a float image is never cast silently)")
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point class probabilities, got dtype {probs.dtype}")
    if probs.shape[0] < 2:
        raise ValueError(f"probs must have C >= 2 classes, got shape {probs.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs (C, H, W) = {probs.shape} and image (H, W, 3) = {image.shape} differ in H, W")
    p = np.ascontiguousarray(probs, dtype=np.float32)
    if not np.isfinite(p).all():
        raise ValueError(f"probs hold NaN or inf values (shape {probs.shape}, dtype {probs.dtype})")
    low = float(p.min())
    if low < 0:
        raise ValueError(f"probs must be non-negative, got a minimum of {low:g}")
    err = float(np.abs(p.sum(axis=0, dtype=np.float64) - 1.0).max())
    if err > SUM_TOLERANCE:
        raise ValueError(f"probs must sum to 1 over C (axis 0) within {SUM_TOLERANCE:g}, largest deviation is "
                         f"{err:.3g}; pass probabilities (see crf.dense.scores_to_probs), not raw scores")
    return np.ascontiguousarray(image), p
