"""Fully connected CRF inference on one image (DeepLab v1 Sec. 4.2, Eq. 1-2; Krähenbühl & Koltun 2011).

``dense_crf`` is the single entry point for every backend:

- ``"pydensecrf"`` (default): the authors' C++ implementation of Krähenbühl & Koltun, through the
  ``pydensecrf`` binding (package ``pydensecrf2``). CPU only.
- ``"torch"``: the permutohedral-lattice implementation in ``crf.torch_backend`` (CPU or CUDA),
  imported lazily so that this module never needs torch.

Unary term: ``-log(P)`` with P the DCNN's class probabilities (paper Eq. 1). The Caffe release passed
the raw fc8 scores instead (``-fc8``); since ``-log softmax(fc8) = -fc8 + logsumexp(fc8)`` differs from
``-fc8`` only by a per-pixel constant, which mean-field inference ignores (it normalises over labels at
each pixel), both give the same result. Probabilities are clipped at ``PROB_EPSILON`` before the log so
that a class with probability 0 costs a finite 18.4 instead of infinity; a unary gap that large already
exceeds anything the pairwise terms can overturn (the messages are bounded by about w1 + w2), so the
clipping does not change the labelling in practice.

pydensecrf's binding fails silently or with an unhelpful Cython buffer error on wrong dtypes, shapes
or memory layouts; every input is therefore checked here first, and every error names the argument,
what was expected and what was given.
"""

from __future__ import annotations

import numpy as np

from .params import CRFParams

__all__ = ["BACKENDS", "PROB_EPSILON", "SUM_TOLERANCE", "dense_crf", "scores_to_probs", "check_inputs"]

#: Backends accepted by :func:`dense_crf`.
BACKENDS = ("pydensecrf", "torch")
#: Probabilities are clipped at this value before ``-log`` (unary at most -log(1e-8) = 18.4).
PROB_EPSILON = 1e-8
#: ``probs`` must sum to 1 over classes within this absolute tolerance at every pixel. float16 storage
#: (as the search's sample files use) rounds each value by at most half a unit in the last place,
#: i.e. the sum by at most 2**-11 ~ 4.9e-4, well inside the tolerance.
SUM_TOLERANCE = 1e-3


def scores_to_probs(scores: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over classes.

    Args:
        scores: (C, H, W) real scores (fc8 outputs, any float or integer dtype).

    Returns:
        (C, H, W) float32 probabilities summing to 1 over C at every pixel.

    Raises:
        ValueError: ``scores`` is not 3-D or holds NaN/inf.
    """
    s = np.asarray(scores)
    if s.ndim != 3:
        raise ValueError(f"scores must be (C, H, W), got shape {s.shape}")
    s = s.astype(np.float32, copy=False)
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or inf values")
    # subtracting the per-pixel maximum keeps exp() in range (no overflow; at least one term is 1)
    e = np.exp(s - s.max(axis=0, keepdims=True))
    e /= e.sum(axis=0, keepdims=True)
    return e


def _check_device(backend: str, device: str) -> None:
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
                         f"{err:.3g}; pass probabilities (see scores_to_probs), not raw scores")
    return np.ascontiguousarray(image), p


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """Unary energy ``-log(max(P, PROB_EPSILON))`` as float32 (C, H*W), C-contiguous (pydensecrf's layout)."""
    c = probs.shape[0]
    u = -np.log(np.maximum(probs, PROB_EPSILON, dtype=np.float32))
    return np.ascontiguousarray(u.reshape(c, -1), dtype=np.float32)


def _dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_from_probs(probs))
    # the Gaussian (smoothness) kernel: position only (sigma_gamma pixels), weight w2
    crf.addPairwiseGaussian(sxy=params.sigma_gamma, compat=params.w2)
    # the bilateral (appearance) kernel: position (sigma_alpha pixels) and RGB (sigma_beta), weight w1
    crf.addPairwiseBilateral(sxy=params.sigma_alpha, srgb=params.sigma_beta, rgbim=image, compat=params.w1)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(c, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams, backend: str = "pydensecrf",
              device: str = "cpu") -> np.ndarray:
    """Mean-field inference of the fully connected CRF (paper Sec. 4.2, Eq. 2) on one image.

    Args:
        image: (H, W, 3) uint8 RGB 0..255 (the colours I_i of the bilateral kernel). Any memory layout.
        probs: (C, H, W) float16/32/64 class probabilities of the DCNN, already upsampled to the image
            size (fc8 -> bilinear x8 -> crop) and softmaxed; summing to 1 over C.
        params: w1, sigma_alpha (pixels), sigma_beta (RGB units), w2, sigma_gamma (pixels), iterations.
        backend: ``"pydensecrf"`` (CPU) or ``"torch"`` (``crf.torch_backend``).
        device: ``"cpu"``; with ``backend="torch"`` also ``"cuda"`` / ``"cuda:N"``.

    Returns:
        Q: (C, H, W) float32 marginals after ``params.iterations`` mean-field iterations, summing to 1
        over C. The labelling is ``Q.argmax(0)``.

    Raises:
        TypeError, ValueError: see :func:`check_inputs`; ValueError also for an unknown backend or a
            device the backend does not support, and for ``params`` that is not a ``CRFParams``.
        ImportError: ``backend="torch"`` and ``crf.torch_backend`` is not available.
    """
    _check_device(backend, device)
    if not isinstance(params, CRFParams):
        raise ValueError(f"params must be a crf.CRFParams, got {type(params).__name__}")
    image, probs = check_inputs(image, probs)
    if backend == "pydensecrf":
        return _dense_crf_pydensecrf(image, probs, params)
    from .torch_backend import dense_crf_torch

    return np.asarray(dense_crf_torch(image, probs, params, device=device), dtype=np.float32)
