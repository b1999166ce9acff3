"""Confusion matrices and the scores read from them: the one definition the search scores with and the
evaluation (``deeplab_v1.evaluation.metrics``, ``deeplab_v1.evaluation.trimap``) reports.

The rules are those of the PASCAL VOC segmentation evaluation: ONE confusion matrix summed over all images
(integer counts, so the sum is exact and independent of the order or the split of the work), ground-truth
pixels labelled 255 ignored, IoU_c = conf[c, c] / (row_c + col_c - conf[c, c]) and mIoU the mean over the
classes whose union is > 0 (present in the ground truth or the prediction). The VOC devkit averages over all
21 classes; on a full VOC split every class occurs in the ground truth, so the two rules agree, and on a
small subset this one avoids a NaN (or a 0 for a class nobody could get right) for classes that appear
nowhere.

``crf`` never imports ``deeplab_v1``, so this module lives here and the evaluation calls it.
"""

from __future__ import annotations

import numpy as np
from .errors import CRFInputError

__all__ = ["confusion", "confusion_stack", "per_class_iou", "miou", "pixel_accuracy", "per_class_accuracy",
           "mean_accuracy", "percent"]

#: How the two label maps are named in error messages, unless the caller names them otherwise.
NAMES = ("gt", "pred")


def confusion_stack(gt: np.ndarray, pred: np.ndarray, num_classes: int, bins: np.ndarray, num_bins: int,
                    ignore: int = 255, names: tuple[str, str] = NAMES) -> np.ndarray:
    """Confusion matrices of one label map, one per pixel bin, in one pass.

    A pixel with bin ``b`` in ``0..num_bins-1`` counts in matrix ``b``; pixels with another bin value, and
    ground-truth pixels equal to ``ignore``, are not counted. :func:`confusion` is the one-bin case; the
    trimap evaluation bins pixels by their distance to the void outlines.

    Args:
        gt: (H, W) integer ground truth, values 0..num_classes-1 or ``ignore``.
        pred: (H, W) integer prediction, values 0..num_classes-1 (where counted).
        num_classes: C (21 for PASCAL VOC).
        bins: (H, W) integer bin of each pixel.
        num_bins: B >= 1.
        ignore: ground-truth value that is not counted (VOC "void", 255).
        names: what the messages call ``gt`` and ``pred``.

    Returns:
        (B, C, C) int64 counts, rows = ground-truth class, columns = predicted class.

    Raises:
        CRFInputError (a ValueError): ``num_classes`` or ``num_bins`` < 1, shapes differ (both named), or a counted value out
            of range (the offending values are listed).
    """
    for what, n in (("num_classes", num_classes), ("num_bins", num_bins)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise CRFInputError(f"{what} must be an integer >= 1, got {n!r}")
    g_name, p_name = names
    gt, pred, bins = np.asarray(gt), np.asarray(pred), np.asarray(bins)
    if gt.shape != pred.shape:
        raise CRFInputError(f"{g_name} shape {gt.shape} and {p_name} shape {pred.shape} differ")
    if bins.shape != gt.shape:
        raise CRFInputError(f"mask shape {bins.shape} and {g_name} shape {gt.shape} differ")
    keep = (gt != ignore) & (bins >= 0) & (bins < num_bins)
    g = gt[keep].astype(np.int64, copy=False)
    p = pred[keep].astype(np.int64, copy=False)
    b = bins[keep].astype(np.int64, copy=False)
    if g.size:
        bad_g = (g < 0) | (g >= num_classes)
        if bad_g.any():
            raise CRFInputError(f"{g_name} values {np.unique(g[bad_g])[:10].tolist()} are outside 0..{num_classes - 1} "
                             f"and the ignore value {ignore}")
        bad_p = (p < 0) | (p >= num_classes)
        if bad_p.any():
            raise CRFInputError(f"{p_name} values {np.unique(p[bad_p])[:10].tolist()} are outside 0..{num_classes - 1}")
    c = num_classes
    return np.bincount((b * c + g) * c + p, minlength=num_bins * c * c).reshape(num_bins, c, c)


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255,
              mask: np.ndarray | None = None, names: tuple[str, str] = NAMES) -> np.ndarray:
    """Confusion matrix of one label map.

    Args:
        gt: (H, W) integer ground truth, values 0..num_classes-1 or ``ignore``.
        pred: (H, W) integer prediction, values 0..num_classes-1.
        num_classes: C (21 for PASCAL VOC).
        ignore: ground-truth value that is not counted (VOC "void", 255).
        mask: optional (H, W) bool; only True pixels are counted (a trimap band).
        names: what the messages call ``gt`` and ``pred``.

    Returns:
        (C, C) int64 counts, rows = ground-truth class, columns = predicted class.

    Raises:
        CRFInputError (a ValueError): ``num_classes`` < 1, shapes differ (both named), or a value out of range (the
            offending values are listed).
    """
    gt = np.asarray(gt)
    # one bin (0); masked-out pixels get bin -1, which is not counted
    bins = np.zeros(gt.shape, np.int8) if mask is None else np.asarray(mask).astype(bool, copy=False).view(np.int8) - 1
    return confusion_stack(gt, pred, num_classes, bins, 1, ignore, names)[0]


def _check_matrix(conf: np.ndarray) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise CRFInputError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    return conf.astype(np.float64)


def per_class_iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU of a (C, C) confusion matrix (rows ground truth, columns prediction).

    Returns:
        (C,) float64, NaN for classes whose union is 0 (absent from both ground truth and prediction).

    Raises:
        CRFInputError (a ValueError): ``conf`` is not a square matrix.
    """
    c = _check_matrix(conf)
    tp = np.diag(c)
    union = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    """Per-class recall of a (C, C) confusion matrix: conf[c, c] / row_c.

    Returns:
        (C,) float64, NaN for classes absent from the ground truth.

    Raises:
        CRFInputError (a ValueError): ``conf`` is not a square matrix.
    """
    c = _check_matrix(conf)
    gt_count = c.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gt_count > 0, np.diag(c) / np.where(gt_count > 0, gt_count, 1.0), np.nan)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes with union > 0; NaN when no pixel was counted.

    Raises:
        CRFInputError (a ValueError): ``conf`` is not a square matrix.
    """
    return _nanmean(per_class_iou(conf))


def mean_accuracy(conf: np.ndarray) -> float:
    """Mean per-class recall over the classes present in the ground truth; NaN when no pixel was counted.

    Raises:
        CRFInputError (a ValueError): ``conf`` is not a square matrix.
    """
    return _nanmean(per_class_accuracy(conf))


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correctly labelled pixels / counted pixels; NaN when no pixel was counted.

    Raises:
        CRFInputError (a ValueError): ``conf`` is not a square matrix.
    """
    c = _check_matrix(conf)
    total = c.sum()
    return float(np.trace(c) / total) if total > 0 else float("nan")


def percent(score: float | None) -> str:
    """A score in 0..1 as the reports print it: percent with two decimals (``0.6225`` -> ``"62.25"``), or
    ``"n/a"`` for None (a score that was not computed)."""
    return "n/a" if score is None else f"{100 * score:.2f}"
