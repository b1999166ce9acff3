"""Fully connected CRF inference on one image (DeepLab v1 Sec. 4.2, Eq. 1-2; Krähenbühl & Koltun 2011).

``dense_crf`` is the single entry point for every backend:

- ``"pydensecrf"`` (default): the authors' C++ implementation of Krähenbühl & Koltun, through the
  ``pydensecrf`` binding (package ``pydensecrf2``). CPU only.
- ``"torch"``: the permutohedral-lattice implementation in ``crf.torch_backend`` (CPU or CUDA),
  imported on first use so that this module never needs torch (``crf.torch_backend`` imports
  ``crf.inputs``, never this module: no cycle).

Unary term: ``-log(P)`` with P the DCNN's class probabilities (paper Eq. 1). The Caffe release passed
the raw fc8 scores instead (``-fc8``); since ``-log softmax(fc8) = -fc8 + logsumexp(fc8)`` differs from
``-fc8`` only by a per-pixel constant, which mean-field inference ignores (it normalises over labels at
each pixel), both give the same result. Probabilities are clipped at ``PROB_EPSILON`` before the log so
that a class with probability 0 costs a finite 18.4 instead of infinity; a unary gap that large already
exceeds anything the pairwise terms can overturn (the messages are bounded by about w1 + w2), so the
clipping does not change the labelling in practice.

Every input is checked first (``crf.inputs``, shared with the torch backend), and every error names the
argument, what was expected and what was given.
"""

from __future__ import annotations

import numpy as np

from .inputs import BACKENDS, PROB_EPSILON, SUM_TOLERANCE, check_backend, check_inputs
from .params import CRFParams
from .errors import CRFInputError

# BACKENDS, PROB_EPSILON, SUM_TOLERANCE and check_inputs are defined in crf.inputs (the floor both backends
# share) and re-exported here, where callers have always found them.
__all__ = ["BACKENDS", "PROB_EPSILON", "SUM_TOLERANCE", "dense_crf", "dense_crf_pydensecrf", "scores_to_probs",
           "check_inputs", "check_compatibility", "unary_from_probs"]


def scores_to_probs(scores: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over classes.

    Args:
        scores: (C, H, W) real scores (fc8 outputs, any float or integer dtype).

    Returns:
        (C, H, W) float32 probabilities summing to 1 over C at every pixel.

    Raises:
        CRFInputError (a ValueError): ``scores`` is not 3-D or holds NaN/inf.
    """
    s = np.asarray(scores)
    if s.ndim != 3:
        raise CRFInputError(f"scores must be (C, H, W), got shape {s.shape}")
    s = s.astype(np.float32, copy=False)
    if not np.isfinite(s).all():
        raise CRFInputError("scores hold NaN or inf values")
    # subtracting the per-pixel maximum keeps exp() in range (no overflow; at least one term is 1)
    e = np.exp(s - s.max(axis=0, keepdims=True))
    e /= e.sum(axis=0, keepdims=True)
    return e


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """Unary energy ``-log(max(P, PROB_EPSILON))`` as float32 (C, H*W), C-contiguous (pydensecrf's layout)."""
    c = probs.shape[0]
    u = -np.log(np.maximum(probs, PROB_EPSILON, dtype=np.float32))
    return np.ascontiguousarray(u.reshape(c, -1), dtype=np.float32)


def check_compatibility(compatibility: object, num_classes: int) -> np.ndarray:
    """A ``(C, C)`` label compatibility in densecrf's matrix convention, checked and symmetrised.

    The convention is densecrf's ``MatrixCompatibility`` (and :class:`crf.layer.DenseCRFLayer`'s): the
    message of kernel k is ``w_k mu K~_k(Q)``, subtracted from ``-U``, so ``-I`` is Potts with weight 1 and
    a negative entry attracts. A learned one comes from :func:`crf.learn.fit_crf` (issue #24).

    Returns:
        ``(mu + mu^T) / 2`` as C-contiguous float32 ``(C, C)`` (densecrf symmetrises the same way).

    Raises:
        CRFInputError (a ValueError): not a ``(C, C)`` matrix of finite real numbers for ``C = num_classes``.
    """
    try:
        mu = np.asarray(compatibility, dtype=np.float64)
    except (TypeError, ValueError):
        raise CRFInputError(f"compatibility must be a ({num_classes}, {num_classes}) matrix of real numbers, "
                            f"got {type(compatibility).__name__}") from None
    if mu.shape != (num_classes, num_classes):
        raise CRFInputError(f"compatibility must be ({num_classes}, {num_classes}) for C={num_classes} classes, "
                            f"got shape {mu.shape}")
    if not np.isfinite(mu).all():
        raise CRFInputError("compatibility holds NaN or infinite values")
    return np.ascontiguousarray((mu + mu.T) / 2, dtype=np.float32)


def _kernel_compat(weight: float, compatibility: np.ndarray | None) -> float | np.ndarray:
    """What ``addPairwise*(compat=...)`` takes: the Potts weight, or the weight times the matrix."""
    return weight if compatibility is None else np.ascontiguousarray(weight * compatibility, dtype=np.float32)


def dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams,
                         compatibility: np.ndarray | None = None, *, module=None, **construct) -> np.ndarray:
    """The pydensecrf backend on inputs already checked by :func:`crf.inputs.check_inputs` (C-contiguous
    uint8 image, float32 probs); no check is repeated, so callers that run many configurations on one
    checked image (the search) pay for the checks once. ``compatibility``: a checked ``(C, C)`` matrix
    (:func:`check_compatibility`) for both kernels, each scaled by its weight; None: Potts. ``module``: a
    module with pydensecrf's ``DenseCRF2D`` (default ``pydensecrf.densecrf``; ``crf.densecrf`` runs the same
    script on the torch lattice), ``construct`` its extra constructor arguments. Returns Q, (C, H, W) float32."""
    if module is None:
        import pydensecrf.densecrf as module

    c, h, w = probs.shape
    crf = module.DenseCRF2D(w, h, c, **construct)
    crf.setUnaryEnergy(unary_from_probs(probs))
    # the Gaussian (smoothness) kernel: position only (sigma_gamma pixels), weight w2
    crf.addPairwiseGaussian(sxy=params.sigma_gamma, compat=_kernel_compat(params.w2, compatibility))
    # the bilateral (appearance) kernel: position (sigma_alpha pixels) and RGB (sigma_beta), weight w1
    crf.addPairwiseBilateral(sxy=params.sigma_alpha, srgb=params.sigma_beta, rgbim=image,
                             compat=_kernel_compat(params.w1, compatibility))
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(c, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams, backend: str = "pydensecrf",
              device: str = "cpu", *, memory_mb: float | None = None,
              compatibility: np.ndarray | None = None) -> np.ndarray:
    """Mean-field inference of the fully connected CRF (paper Sec. 4.2, Eq. 2) on one image.

    Args:
        image: (H, W, 3) uint8 RGB 0..255 (the colours I_i of the bilateral kernel). Any memory layout.
        probs: (C, H, W) float16/32/64 class probabilities of the DCNN, already upsampled to the image
            size (fc8 -> bilinear x8 -> crop) and softmaxed; summing to 1 over C.
        params: w1, sigma_alpha (pixels), sigma_beta (RGB units), w2, sigma_gamma (pixels), iterations.
        backend: ``"pydensecrf"`` (CPU), ``"torch"`` (``crf.torch_backend``) or ``"auto"`` (torch when it is
            installed and this image fits ``memory_mb``, else pydensecrf; ``crf.backend_choice``).
        device: ``"cpu"``; with ``backend="torch"`` or ``"auto"`` also ``"cuda"`` / ``"cuda:N"``.
        memory_mb: the torch backend's budget, MiB: it chooses the backend under ``"auto"`` (None:
            ``crf.backend_choice.default_memory_mb``) and bounds the torch backend's working memory when
            it runs (None with ``"torch"``: ``crf.torch_backend.DEFAULT_MEMORY_MB``). Results do not
            depend on it (larger problems run in chunks).
        compatibility: a ``(C, C)`` label compatibility for both kernels (:func:`check_compatibility`'s
            convention: ``-I`` is Potts; a fitted one from ``crf.fit_crf``, issue #24), None: Potts. The
            pydensecrf backend takes it as ``MatrixCompatibility``; the torch backend runs the same script
            through ``crf.densecrf`` (its drop-in on the same lattices; ``memory_mb`` is not used there).

    Returns:
        Q: (C, H, W) float32 marginals after ``params.iterations`` mean-field iterations, summing to 1
        over C. The labelling is ``Q.argmax(0)``.

    Raises:
        TypeError, ValueError: see :func:`check_inputs`; ValueError also for an unknown backend or a
            device the backend does not support, ``params`` that is not a ``CRFParams`` and a bad
            ``compatibility``.
        ImportError: ``backend="torch"`` and ``crf.torch_backend`` is not available.
    """
    check_backend(backend, device)
    if not isinstance(params, CRFParams):
        raise CRFInputError(f"params must be a crf.CRFParams, got {type(params).__name__}")
    image, probs = check_inputs(image, probs)
    mu = None if compatibility is None else check_compatibility(compatibility, probs.shape[0])
    if backend == "auto":
        from .backend_choice import resolve_backend

        choice = resolve_backend(backend, device, [probs.shape], memory_mb=memory_mb)
        backend, device, memory_mb = choice.backend, choice.device, choice.memory_mb
    if backend == "pydensecrf":
        return dense_crf_pydensecrf(image, probs, params, mu)
    if mu is not None:  # a matrix compatibility: the pydensecrf script on the torch lattice (crf.densecrf)
        from . import densecrf

        return dense_crf_pydensecrf(image, probs, params, mu, module=densecrf, device=device)
    from .torch_backend import DEFAULT_MEMORY_MB, dense_crf_torch

    budget = DEFAULT_MEMORY_MB if memory_mb is None else memory_mb
    return np.asarray(dense_crf_torch(image, probs, params, device=device, memory_mb=budget), dtype=np.float32)
