"""Trimap evaluation: accuracy in a narrow band around object boundaries (paper Sec. 5, Fig. 5).

VOC ground truth outlines every object with a few pixels of "void" (255). The band of width w is
``dilate(gt == 255, square of side 2w + 1) AND gt != 255``: the labelled pixels within chessboard distance w
of a void pixel. Pixel accuracy and mIoU are computed over the band pixels only, for w = 1..40 pixels.

All widths come from one distance transform: ``cv2.distanceTransform`` with ``DIST_C`` (chessboard, exact
for the 3x3 mask) of ``gt != 255`` gives each labelled pixel its distance d to the nearest void pixel, and a
pixel lies in the band of width w exactly when d <= w. The accumulator bins pixels by d once per image and
sums the bins cumulatively, instead of building 40 masks.
"""

from __future__ import annotations

import math
from typing import Iterable

import cv2
import numpy as np

from .metrics import scores

__all__ = ["trimap_band", "void_distance", "TrimapAccumulator"]


def void_distance(gt: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Chessboard distance (pixels) of every pixel to the nearest ``ignore_index`` pixel.

    Args:
        gt: (H, W) integer label map.

    Returns:
        (H, W) float32; 0 on void pixels; ``inf`` everywhere when the map has no void pixel.
    """
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {gt.shape}")
    labelled = gt != ignore_index
    if labelled.all():
        return np.full(gt.shape, np.inf, dtype=np.float32)
    # pixels outside the image count as non-void, as cv2.dilate's default border does
    return cv2.distanceTransform(labelled.astype(np.uint8), cv2.DIST_C, 3)


def trimap_band(gt: np.ndarray, width: int, ignore_index: int = 255) -> np.ndarray:
    """The trimap band of ``width`` pixels around the void outlines.

    Args:
        gt: (H, W) integer label map.
        width: band width w in pixels (the square structuring element has side 2w + 1).

    Returns:
        (H, W) bool: dilate(gt == 255, (2w+1) x (2w+1) square) AND gt != 255.
    """
    if width < 0:
        raise ValueError(f"band width must be >= 0 pixels, got {width}")
    gt = np.asarray(gt)
    void = (gt == ignore_index).astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), dtype=np.uint8)
    return cv2.dilate(void, kernel).astype(bool) & (gt != ignore_index)


class TrimapAccumulator:
    """Confusion matrices of the trimap bands, one per width, accumulated over images.

    Args:
        widths: band widths in pixels (paper Fig. 5: 1..40).
        num_classes: C.

    ``update(gt, pred)`` adds one image; ``result()`` gives the curves; ``merge``/``+`` combine accumulators.
    """

    def __init__(self, widths: Iterable[int] = range(1, 41), num_classes: int = 21, ignore_index: int = 255) -> None:
        self.widths = [int(w) for w in widths]
        if not self.widths or min(self.widths) < 0:
            raise ValueError(f"trimap widths must be a non-empty list of pixel widths >= 0, got {self.widths}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.max_width = max(self.widths)
        # counts[d, g, p]: labelled pixels at void distance d (0..max_width) with ground truth g, prediction p
        self.counts = np.zeros((self.max_width + 1, num_classes, num_classes), dtype=np.int64)
        self.images = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: gt and pred (H, W) integer maps (pred values 0..C-1).

        Raises:
            ValueError: shapes differ or values out of range.
        """
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {gt.shape} and prediction shape {pred.shape} differ")
        dist = void_distance(gt, self.ignore_index)
        keep = (gt != self.ignore_index) & (dist <= self.max_width)
        d = dist[keep].astype(np.int64)
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        c = self.num_classes
        if g.size:
            if g.min() < 0 or g.max() >= c:
                raise ValueError(f"ground truth values {np.unique(g[(g < 0) | (g >= c)])[:10].tolist()} are outside 0..{c - 1}")
            if p.min() < 0 or p.max() >= c:
                raise ValueError(f"prediction values {np.unique(p[(p < 0) | (p >= c)])[:10].tolist()} are outside 0..{c - 1}")
            flat = (d * c + g) * c + p
            self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        self.images += 1

    def matrices(self) -> dict[int, np.ndarray]:
        """Width -> (C, C) int64 confusion matrix of the band of that width."""
        cumulative = np.cumsum(self.counts, axis=0)
        return {w: cumulative[w] for w in self.widths}

    def result(self) -> dict:
        """The curves: ``{"widths": [...], "pixel_accuracy": [...], "miou": [...], "pixels": [...]}``.

        Accuracies are fractions (0..1), None where a band holds no pixel (JSON-safe).
        """
        mats = self.matrices()
        out: dict[str, list] = {"widths": list(self.widths), "pixel_accuracy": [], "miou": [], "pixels": []}
        for w in self.widths:
            s = scores(mats[w])
            out["pixel_accuracy"].append(None if math.isnan(s["pixel_accuracy"]) else s["pixel_accuracy"])
            out["miou"].append(None if math.isnan(s["miou"]) else s["miou"])
            out["pixels"].append(s["pixels"])
        return out

    def _check(self, other: "TrimapAccumulator") -> None:
        if not isinstance(other, TrimapAccumulator):
            raise TypeError(f"cannot merge a TrimapAccumulator with {type(other).__name__}")
        if (other.widths, other.num_classes, other.ignore_index) != (self.widths, self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge trimap accumulators with different widths/classes "
                f"({self.widths}, {self.num_classes}) vs ({other.widths}, {other.num_classes})"
            )

    def merge(self, other: "TrimapAccumulator") -> "TrimapAccumulator":
        """Add ``other``'s counts into this accumulator; returns self."""
        self._check(other)
        self.counts += other.counts
        self.images += other.images
        return self

    def __add__(self, other: "TrimapAccumulator") -> "TrimapAccumulator":
        self._check(other)
        out = TrimapAccumulator(self.widths, self.num_classes, self.ignore_index)
        return out.merge(self).merge(other)
