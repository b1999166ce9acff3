"""Confusion matrix, mIoU, pixel accuracy (PASCAL VOC segmentation evaluation).

As in the VOC devkit and the release: ONE confusion matrix is accumulated over all images of a split
(not a mean of per-image scores); ground-truth pixels labelled 255 are ignored.

The matrix and the scores are those of ``crf.confusion``, the very functions the CRF parameter search
(``crf.search``) scores its configurations with, so a search objective and an evaluation of the same label
maps are the same number. mIoU rule: IoU_c = TP_c / (TP_c + FP_c + FN_c) = conf[c, c] / (row_c + col_c -
conf[c, c]), and mIoU is the mean over the classes whose union (row_c + col_c - conf[c, c]) is > 0, i.e.
classes present in the ground truth or in the prediction. The VOC devkit averages over all 21 classes; on a
full VOC split every class occurs in the ground truth, so the two rules agree, and on a small subset ours
avoids a NaN (or a 0 for a class nobody could get right) for classes that appear nowhere.
"""

from __future__ import annotations

import math

import numpy as np

from crf.confusion import (
    confusion,
    mean_accuracy,
    miou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)

__all__ = ["confusion_matrix", "metrics_from_confusion", "ConfusionAccumulator"]

#: How the evaluation's messages name the two label maps.
NAMES = ("ground truth", "prediction")


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int = 21, ignore_index: int = 255,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix of one label map (``crf.confusion.confusion``).

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
    return confusion(gt, pred, num_classes, ignore_index, mask, names=NAMES)


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def metrics_from_confusion(conf: np.ndarray, json_safe: bool = False) -> dict:
    """The metrics of a confusion matrix.

    Args:
        conf: (C, C) counts, rows ground truth, columns prediction.
        json_safe: give None instead of NaN (for JSON files).

    Returns:
        ``miou``: mean IoU over the classes with union > 0 (see the module docstring);
        ``pixel_accuracy``: correct / counted pixels;
        ``mean_accuracy``: mean over classes present in the ground truth of the per-class recall;
        ``per_class_iou``: C floats, NaN (None) for classes with union 0;
        ``per_class_accuracy``: C floats, NaN (None) for classes absent from the ground truth;
        ``pixels``: counted pixels. With no counted pixels all metrics are NaN (None).

    Raises:
        ValueError: ``conf`` is not a square matrix.
    """
    out = {
        "miou": miou(conf),
        "pixel_accuracy": pixel_accuracy(conf),
        "mean_accuracy": mean_accuracy(conf),
        "per_class_iou": [float(v) for v in per_class_iou(conf)],
        "per_class_accuracy": [float(v) for v in per_class_accuracy(conf)],
        "pixels": int(np.asarray(conf).sum()),
    }
    if json_safe:
        for key in ("miou", "pixel_accuracy", "mean_accuracy"):
            out[key] = _none_if_nan(out[key])
        out["per_class_iou"] = [_none_if_nan(v) for v in out["per_class_iou"]]
        out["per_class_accuracy"] = [_none_if_nan(v) for v in out["per_class_accuracy"]]
    return out


class CountsAccumulator:
    """Integer counts summed over the images of a split; ``a + b`` or ``a.merge(b)`` combine accumulators
    (parallel workers). Subclasses keep their counts in ``counts`` and their images in ``images``, and say
    what must agree for two accumulators to merge (``_compatible``), how the message puts a mismatch
    (``_mismatch``), and how to make an empty one like them (``_empty``)."""

    counts: np.ndarray
    images: int

    def _compatible(self) -> tuple:
        raise NotImplementedError

    def _mismatch(self, other: "CountsAccumulator") -> str:
        raise NotImplementedError

    def _empty(self) -> "CountsAccumulator":
        raise NotImplementedError

    def _check(self, other: "CountsAccumulator") -> None:
        if not isinstance(other, type(self)):
            raise TypeError(f"cannot merge a {type(self).__name__} with {type(other).__name__}")
        if other._compatible() != self._compatible():
            raise ValueError(self._mismatch(other))

    def merge(self, other: "CountsAccumulator") -> "CountsAccumulator":
        """Add ``other``'s counts into this accumulator; returns self."""
        self._check(other)
        self.counts += other.counts
        self.images += other.images
        return self

    def __add__(self, other: "CountsAccumulator") -> "CountsAccumulator":
        self._check(other)
        return self._empty().merge(self).merge(other)


class ConfusionAccumulator(CountsAccumulator):
    """A confusion matrix summed over the images of a split.

    ``update`` adds one image; ``a + b`` or ``a.merge(b)`` combine accumulators (parallel workers).

    Attributes:
        matrix: (C, C) int64, rows ground truth, columns prediction (also ``counts``).
        images: number of images added.
    """

    def __init__(self, num_classes: int = 21, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.images = 0

    @property
    def matrix(self) -> np.ndarray:
        """(C, C) int64 accumulated confusion matrix (the ``counts``)."""
        return self.counts

    @matrix.setter
    def matrix(self, value: np.ndarray) -> None:
        self.counts = value

    def _compatible(self) -> tuple:
        return (self.num_classes, self.ignore_index)

    def _mismatch(self, other: "ConfusionAccumulator") -> str:
        return (f"cannot merge accumulators of {self.num_classes} and {other.num_classes} classes "
                f"(ignore {self.ignore_index} / {other.ignore_index})")

    def _empty(self) -> "ConfusionAccumulator":
        return ConfusionAccumulator(self.num_classes, self.ignore_index)

    def update(self, gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add one image: gt, pred (H, W) integer maps, optional (H, W) bool mask. See ``confusion_matrix``."""
        self.counts += confusion_matrix(gt, pred, self.num_classes, self.ignore_index, mask)
        self.images += 1

    def metrics(self, json_safe: bool = False) -> dict:
        """:func:`metrics_from_confusion` of the accumulated matrix, plus ``images``."""
        return {**metrics_from_confusion(self.counts, json_safe=json_safe), "images": self.images}
