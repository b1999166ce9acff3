"""Evaluation: confusion matrix and mIoU over a split, trimap (boundary band) accuracy, the trimap figure.

The confusion matrix, the scores read from it and the trimap band are ``crf``'s (``crf.confusion``,
``crf.trimap``): the evaluation reports with the very functions the CRF parameter search scores with.
"""

from .metrics import ConfusionAccumulator, confusion_matrix, metrics_from_confusion
from .trimap import TrimapAccumulator, trimap_band

__all__ = ["confusion_matrix", "metrics_from_confusion", "ConfusionAccumulator", "trimap_band",
           "TrimapAccumulator"]
