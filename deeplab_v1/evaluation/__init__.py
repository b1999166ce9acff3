"""Evaluation: confusion matrix and mIoU over a split, trimap (boundary band) accuracy, the trimap figure."""

from .metrics import ConfusionAccumulator, confusion_matrix, scores
from .trimap import TrimapAccumulator, trimap_band

__all__ = ["confusion_matrix", "scores", "ConfusionAccumulator", "trimap_band", "TrimapAccumulator"]
