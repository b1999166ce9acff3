"""Trimap evaluation: accuracy in a narrow band around object boundaries (paper Sec. 5, Fig. 5).

The band of width w is that of ``crf.trimap`` (the one definition, which the search's ``trimap_miou``
objective scores too): by default ``dilate(gt == 255, square of side 2w + 1) AND gt != 255``, the labelled
pixels within chessboard distance w of a void pixel; with ``band="boundary"`` the labelled pixels within
distance w of another class (datasets without void outlines). Pixel accuracy and mIoU are computed over the band pixels only, for
w = 1..40 pixels.

All widths come from one distance (``crf.trimap.band_distance``): a pixel lies in the band of width w
exactly when its distance d (to the nearest void pixel, or pixel of another class) is <= w. The accumulator bins pixels by d once
per image (``crf.confusion.confusion_stack``, the same counting as the search's matrices) and sums the bins
cumulatively, instead of building 40 masks.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from crf.confusion import confusion_stack
from crf.trimap import band_distance, trimap_band, void_distance

from .metrics import NAMES, CountsAccumulator, metrics_from_confusion

__all__ = ["trimap_band", "void_distance", "TrimapAccumulator"]


class TrimapAccumulator(CountsAccumulator):
    """Confusion matrices of the trimap bands, one per width, accumulated over images.

    Args:
        widths: band widths in pixels (paper Fig. 5: 1..40).
        num_classes: C.
        band: ``void`` (around void outlines, the release's) or ``boundary`` (around label changes), as
            ``crf.trimap`` defines them (``data.trimap_band``).

    ``update(gt, pred)`` adds one image; ``result()`` gives the curves; ``merge``/``+`` combine accumulators.
    """

    def __init__(self, widths: Iterable[int] = range(1, 41), num_classes: int = 21, ignore_index: int = 255,
                 band: str = "void") -> None:
        self.widths = [int(w) for w in widths]
        if not self.widths or min(self.widths) < 0:
            raise ValueError(f"trimap widths must be a non-empty list of pixel widths >= 0, got {self.widths}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.band = band
        self.max_width = max(self.widths)
        # counts[d, g, p]: labelled pixels at void distance d (0..max_width) with ground truth g, prediction p
        self.counts = np.zeros((self.max_width + 1, num_classes, num_classes), dtype=np.int64)
        self.images = 0

    def _compatible(self) -> tuple:
        return (self.widths, self.num_classes, self.ignore_index, self.band)

    def _mismatch(self, other: "TrimapAccumulator") -> str:
        return (f"cannot merge trimap accumulators with different widths/classes "
                f"({self.widths}, {self.num_classes}) vs ({other.widths}, {other.num_classes})")

    def _empty(self) -> "TrimapAccumulator":
        return TrimapAccumulator(self.widths, self.num_classes, self.ignore_index, self.band)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: gt and pred (H, W) integer maps (pred values 0..C-1).

        Raises:
            ValueError: shapes differ or values out of range.
        """
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {gt.shape} and prediction shape {pred.shape} differ")
        dist = band_distance(gt, self.band, self.ignore_index)
        # pixels farther than the widest band get bin -1 (not counted); void pixels are ignored by the count
        bins = np.where(dist <= self.max_width, dist, -1).astype(np.int64)
        self.counts += confusion_stack(gt, pred, self.num_classes, bins, self.max_width + 1, self.ignore_index, NAMES)
        self.images += 1

    def matrices(self) -> dict[int, np.ndarray]:
        """Width -> (C, C) int64 confusion matrix of the band of that width."""
        cumulative = np.cumsum(self.counts, axis=0)
        return {w: cumulative[w] for w in self.widths}

    def result(self) -> dict:
        """The curves: ``{"band": "void" | "boundary", "widths": [...], "pixel_accuracy": [...], "miou": [...], "pixels": [...]}``.

        Accuracies are fractions (0..1), None where a band holds no pixel (JSON-safe).
        """
        mats = self.matrices()
        out: dict[str, Any] = {"band": self.band, "widths": list(self.widths), "pixel_accuracy": [], "miou": [], "pixels": []}
        for w in self.widths:
            m = metrics_from_confusion(mats[w], json_safe=True)
            out["pixel_accuracy"].append(m["pixel_accuracy"])
            out["miou"].append(m["miou"])
            out["pixels"].append(m["pixels"])
        return out
