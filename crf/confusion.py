"""A small confusion-matrix helper for scoring CRF outputs inside the ``crf`` package.

The ``crf`` package never imports ``deeplab_v1``, so the CRF parameter search (``crf.search``) scores
its label maps with this module. The rules are those of the PASCAL VOC segmentation evaluation (and of
``deeplab_v1.evaluation.metrics``): ONE confusion matrix summed over all images (integer counts, so the
sum is exact and independent of the order or the split of the work), ground-truth pixels labelled 255
ignored, IoU_c = conf[c, c] / (row_c + col_c - conf[c, c]) and mIoU the mean over the classes whose
union is > 0 (present in the ground truth or the prediction).
"""

from __future__ import annotations

import numpy as np

__all__ = ["confusion", "per_class_iou", "miou", "pixel_accuracy"]


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix of one label map.

    Args:
        gt: (H, W) integer ground truth, values 0..num_classes-1 or ``ignore``.
        pred: (H, W) integer prediction, values 0..num_classes-1.
        num_classes: C (21 for PASCAL VOC).
        ignore: ground-truth value that is not counted (VOC "void", 255).
        mask: optional (H, W) bool; only True pixels are counted (a trimap band).

    Returns:
        (C, C) int64 counts, rows = ground-truth class, columns = predicted class.

    Raises:
        ValueError: ``num_classes`` < 1, shapes differ (both named), or a value out of range (the
            offending values are listed).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} and pred shape {pred.shape} differ")
    keep = gt != ignore
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != gt.shape:
            raise ValueError(f"mask shape {mask.shape} and gt shape {gt.shape} differ")
        keep &= mask.astype(bool, copy=False)
    g = gt[keep].astype(np.int64, copy=False)
    p = pred[keep].astype(np.int64, copy=False)
    if g.size:
        bad_g = (g < 0) | (g >= num_classes)
        if bad_g.any():
            raise ValueError(f"gt values {np.unique(g[bad_g])[:10].tolist()} are outside 0..{num_classes - 1} "
                             f"and the ignore value {ignore}")
        bad_p = (p < 0) | (p >= num_classes)
        if bad_p.any():
            raise ValueError(f"pred values {np.unique(p[bad_p])[:10].tolist()} are outside 0..{num_classes - 1}")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _check_matrix(conf: np.ndarray) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    return conf.astype(np.float64)


def per_class_iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU of a (C, C) confusion matrix (rows ground truth, columns prediction).

    Returns:
        (C,) float64, NaN for classes whose union is 0 (absent from both ground truth and prediction).

    Raises:
        ValueError: ``conf`` is not a square matrix.
    """
    c = _check_matrix(conf)
    tp = np.diag(c)
    union = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes with union > 0; NaN when no pixel was counted.

    Raises:
        ValueError: ``conf`` is not a square matrix.
    """
    iou = per_class_iou(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correctly labelled pixels / counted pixels; NaN when no pixel was counted.

    Raises:
        ValueError: ``conf`` is not a square matrix.
    """
    c = _check_matrix(conf)
    total = c.sum()
    return float(np.trace(c) / total) if total > 0 else float("nan")
