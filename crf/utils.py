"""pydensecrf.utils' helpers for ``crf.densecrf`` (issue #23): unaries from probabilities or labels, and
the features of Gaussian and bilateral kernels for data of any dimension.

Same names, arguments, defaults and results as pydensecrf's; arguments pydensecrf takes silently to a
wrong result or an IndexError (labels out of range, a uint8 label map whose 0 wraps to 255 under
``zero_unsure``, fewer scales than dimensions, a ``scale`` or ``gt_prob`` outside its
interval under ``python -O``) raise :class:`~crf.errors.CRFInputError` (a ``ValueError``) instead.
"""

from __future__ import annotations

from numbers import Real
from typing import Sequence

import numpy as np

from .errors import CRFInputError

__all__ = ["unary_from_softmax", "unary_from_labels", "create_pairwise_gaussian", "create_pairwise_bilateral"]


def unary_from_softmax(sm: np.ndarray, scale: float | None = None, clip: float | None = 1e-5) -> np.ndarray:
    """Unary energies ``-log P`` from class probabilities.

    Args:
        sm: ``(C, ...)`` probabilities (a softmax output), classes first; the other axes are flattened.
        scale: None, or a certainty in (0, 1]: ``P`` becomes ``scale * P + (1 - scale) / C``.
        clip: None, or the smallest probability kept (``log 0`` would be infinite).

    Returns:
        float32 C-contiguous ``(C, prod(...))``, ready for ``setUnaryEnergy``.

    Raises:
        CRFInputError: ``sm`` not a numeric array of >= 1 axes, ``scale`` outside (0, 1], ``clip`` outside (0, 1].
    """
    sm = np.asarray(sm)
    if sm.ndim < 1 or sm.dtype.kind not in "fiu":
        raise CRFInputError(f"unary_from_softmax: sm must be a numeric (C, ...) array, got {sm.dtype} {sm.shape}")
    classes = sm.shape[0]
    if scale is not None:
        if not isinstance(scale, Real) or not 0 < scale <= 1:
            raise CRFInputError(f"unary_from_softmax: scale must be in (0, 1], got {scale!r}")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / classes)
    if clip is not None:
        if not isinstance(clip, Real) or not 0 < clip <= 1:
            raise CRFInputError(f"unary_from_softmax: clip must be in (0, 1], got {clip!r}")
        sm = np.clip(sm, clip, 1.0)
    energy = -np.log(sm)
    return np.ascontiguousarray(energy.reshape(classes, -1), dtype=np.float32)


def unary_from_labels(labels: np.ndarray, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Unary energies of a classifier that believes a given label with probability ``gt_prob``.

    Args:
        labels: integer label map of any shape (flattened). With ``zero_unsure``, 0 means "unknown"
            (uniform energy) and 1..n_labels are the labels (label l is row l - 1); else 0..n_labels-1.
        n_labels: C, the number of labels (without the 0 of ``zero_unsure``).
        gt_prob: in (0, 1): energy ``-log gt_prob`` on the given label, ``-log((1 - gt_prob) / (C - 1))``
            on the others.

    Returns:
        float32 ``(C, labels.size)``.

    Raises:
        CRFInputError: ``gt_prob`` outside (0, 1), ``n_labels`` < 2, non-integer labels, or a label
            outside the range above (pydensecrf indexes with it: a negative label lands on another row).
    """
    if not isinstance(gt_prob, Real) or not 0 < gt_prob < 1:
        raise CRFInputError(f"unary_from_labels: gt_prob must be in (0, 1), got {gt_prob!r}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 2:
        raise CRFInputError(f"unary_from_labels: n_labels must be an integer >= 2, got {n_labels!r}")
    flat = np.asarray(labels).reshape(-1)
    if flat.dtype.kind not in "iub":
        raise CRFInputError(f"unary_from_labels: labels must be integers, got {flat.dtype}")
    flat = flat.astype(np.int64)
    low, high = (0, n_labels) if zero_unsure else (0, n_labels - 1)
    if flat.size and (flat.min() < low or flat.max() > high):
        bad = np.unique(flat[(flat < low) | (flat > high)])[:10].tolist()
        raise CRFInputError(f"unary_from_labels: labels {bad} are outside {low}..{high} "
                            f"(n_labels={n_labels}, zero_unsure={zero_unsure})")
    other = -np.log((1.0 - gt_prob) / (n_labels - 1))
    energy = np.full((n_labels, flat.size), other, dtype=np.float32)
    rows = flat - 1 if zero_unsure else flat
    given = rows >= 0
    energy[rows[given], np.nonzero(given)[0]] = -np.log(gt_prob)
    if zero_unsure:
        energy[:, ~given] = -np.log(1.0 / n_labels)
    return energy


def _scales(values: Sequence[float] | float, count: int, where: str) -> list[float]:
    scales = [values] * count if isinstance(values, Real) else list(values)
    if len(scales) != count or not all(isinstance(s, Real) and np.isfinite(s) and s > 0 for s in scales):
        raise CRFInputError(f"{where} must be {count} numbers > 0 (one per axis / channel), got {values!r}")
    return [float(s) for s in scales]


def create_pairwise_gaussian(sdims: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Features of a Gaussian kernel on the positions of a grid of any dimension.

    Args:
        sdims: one standard deviation per axis of ``shape`` (pixels). shape: the grid, e.g. ``(H, W)``.

    Returns:
        float32 ``(len(shape), prod(shape))``: row i is the index along axis i divided by ``sdims[i]``
        (for an image: ``(y / sy, x / sx)``, rows before columns, unlike ``DenseCRF2D``'s ``(x, y)``).

    Raises:
        CRFInputError: ``sdims`` not one positive number per axis (pydensecrf leaves the extra axes unscaled).
    """
    shape = tuple(int(s) for s in shape)
    scales = _scales(sdims, len(shape), "create_pairwise_gaussian: sdims")
    grid = np.indices(shape, dtype=np.float32)
    for axis, s in enumerate(scales):
        grid[axis] /= np.float32(s)
    return grid.reshape(len(shape), -1)


def create_pairwise_bilateral(sdims: Sequence[float], schan: Sequence[float] | float, img: np.ndarray,
                              chdim: int = -1) -> np.ndarray:
    """Features of a bilateral kernel: positions and channel values of an image of any dimension.

    Args:
        sdims: one standard deviation per spatial axis (pixels).
        schan: one number for all channels or one per channel (colour units).
        img: the image; its channels on axis ``chdim``, or ``chdim=-1`` for an image without a channel axis.
        chdim: the channel axis (2 for ``(H, W, 3)``), -1 for none.

    Returns:
        float32 ``(n_spatial + n_channels, n_pixels)``: the scaled positions (as
        :func:`create_pairwise_gaussian`), then the scaled channels.

    Raises:
        CRFInputError: ``sdims`` or ``schan`` of the wrong length or not positive, ``chdim`` outside the image.
    """
    img = np.asarray(img)
    if chdim == -1:
        channels = img[np.newaxis].astype(np.float32)
    else:
        if not -img.ndim <= chdim < img.ndim:
            raise CRFInputError(f"create_pairwise_bilateral: chdim {chdim} is not an axis of an image of shape {img.shape}")
        channels = np.moveaxis(img, chdim, 0).astype(np.float32)
    scales = _scales(schan, channels.shape[0], "create_pairwise_bilateral: schan")
    for c, s in enumerate(scales):
        channels[c] /= np.float32(s)
    positions = create_pairwise_gaussian(sdims, channels.shape[1:]).reshape(-1, *channels.shape[1:])
    features = np.concatenate([positions, channels])
    return features.reshape(features.shape[0], -1)
