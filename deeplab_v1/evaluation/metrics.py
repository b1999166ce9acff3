"""Confusion matrix, mIoU, pixel accuracy (PASCAL VOC segmentation evaluation).

As in the VOC devkit and the release: ONE confusion matrix is accumulated over all images of a split
(not a mean of per-image scores); ground-truth pixels labelled 255 are ignored.

mIoU rule: IoU_c = TP_c / (TP_c + FP_c + FN_c) = conf[c, c] / (row_c + col_c - conf[c, c]), and mIoU is the
mean over the classes whose union (row_c + col_c - conf[c, c]) is > 0, i.e. classes present in the ground
truth or in the prediction. The VOC devkit averages over all 21 classes; on a full VOC split every class
occurs in the ground truth, so the two rules agree, and on a small subset ours avoids a NaN (or a 0 for a
class nobody could get right) for classes that appear nowhere.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = ["confusion_matrix", "scores", "ConfusionAccumulator"]


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int = 21, ignore_index: int = 255,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix of one label map.

    Args:
        gt: (H, W) integer ground truth, values 0..num_classes-1 or ``ignore_index``.
        pred: (H, W) integer prediction, values 0..num_classes-1.
        num_classes: C.
        ignore_index: ground-truth value left out (VOC void, 255).
        mask: optional (H, W) bool, only True pixels are counted (trimap bands).

    Returns:
        (C, C) int64, rows = ground truth class, columns = predicted class.

    Raises:
        ValueError: shapes differ (both named), or values out of range.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} and prediction shape {pred.shape} differ")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != gt.shape:
            raise ValueError(f"mask shape {mask.shape} and ground truth shape {gt.shape} differ")
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    keep = gt != ignore_index
    if mask is not None:
        keep &= mask.ravel()
    gt, pred = gt[keep], pred[keep]
    if gt.size:
        if gt.min() < 0 or gt.max() >= num_classes:
            bad = np.unique(gt[(gt < 0) | (gt >= num_classes)])
            raise ValueError(f"ground truth values {bad[:10].tolist()} are outside 0..{num_classes - 1} and {ignore_index}")
        if pred.min() < 0 or pred.max() >= num_classes:
            bad = np.unique(pred[(pred < 0) | (pred >= num_classes)])
            raise ValueError(f"prediction values {bad[:10].tolist()} are outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [None if (v is None or math.isnan(v)) else float(v) for v in values]


def scores(conf: np.ndarray, json_safe: bool = False) -> dict:
    """Scores of a confusion matrix.

    Args:
        conf: (C, C) counts, rows ground truth, columns prediction.
        json_safe: give None instead of NaN (for JSON files).

    Returns:
        ``miou``: mean IoU over the classes with union > 0 (see the module docstring);
        ``pixel_accuracy``: correct / counted pixels;
        ``mean_accuracy``: mean over classes present in the ground truth of the per-class recall;
        ``per_class_iou``: C floats, NaN (None) for classes with union 0;
        ``per_class_accuracy``: C floats, NaN (None) for classes absent from the ground truth;
        ``pixels``: counted pixels. With no counted pixels all scores are NaN (None).
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be (C, C), got shape {conf.shape}")
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    union = gt_count + pred_count - tp
    total = conf.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    miou = float(np.mean(iou[union > 0])) if np.any(union > 0) else math.nan
    mean_acc = float(np.mean(acc[gt_count > 0])) if np.any(gt_count > 0) else math.nan
    pixel_acc = float(tp.sum() / total) if total > 0 else math.nan
    out = {
        "miou": miou,
        "pixel_accuracy": pixel_acc,
        "mean_accuracy": mean_acc,
        "per_class_iou": [float(v) for v in iou],
        "per_class_accuracy": [float(v) for v in acc],
        "pixels": int(total),
    }
    if json_safe:
        for key in ("miou", "pixel_accuracy", "mean_accuracy"):
            out[key] = _nan_to_none([out[key]])[0]
        out["per_class_iou"] = _nan_to_none(out["per_class_iou"])
        out["per_class_accuracy"] = _nan_to_none(out["per_class_accuracy"])
    return out


class ConfusionAccumulator:
    """A confusion matrix summed over the images of a split.

    ``update`` adds one image; ``a + b`` or ``a.merge(b)`` combine accumulators (parallel workers).

    Attributes:
        matrix: (C, C) int64, rows ground truth, columns prediction.
        images: number of images added.
    """

    def __init__(self, num_classes: int = 21, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.images = 0

    def update(self, gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add one image: gt, pred (H, W) integer maps, optional (H, W) bool mask. See ``confusion_matrix``."""
        self.matrix += confusion_matrix(gt, pred, self.num_classes, self.ignore_index, mask)
        self.images += 1

    def scores(self, json_safe: bool = False) -> dict:
        """``scores`` of the accumulated matrix, plus ``images``."""
        return {**scores(self.matrix, json_safe=json_safe), "images": self.images}

    def _check(self, other: "ConfusionAccumulator") -> None:
        if not isinstance(other, ConfusionAccumulator):
            raise TypeError(f"cannot merge a ConfusionAccumulator with {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge accumulators of {self.num_classes} and {other.num_classes} classes "
                f"(ignore {self.ignore_index} / {other.ignore_index})"
            )

    def merge(self, other: "ConfusionAccumulator") -> "ConfusionAccumulator":
        """Add ``other``'s counts into this accumulator; returns self."""
        self._check(other)
        self.matrix += other.matrix
        self.images += other.images
        return self

    def __add__(self, other: "ConfusionAccumulator") -> "ConfusionAccumulator":
        self._check(other)
        out = ConfusionAccumulator(self.num_classes, self.ignore_index)
        return out.merge(self).merge(other)
