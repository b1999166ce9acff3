"""The trimap band: the labelled pixels near object boundaries (DeepLab v1 Sec. 5, Fig. 5).

VOC ground truth outlines every object with a few pixels of "void" (255). The band of width w is
``dilate(gt == 255, square of side 2w + 1) AND gt != 255``: the labelled pixels within chessboard distance w
of a void pixel. This module is its one definition: the search's ``trimap_miou`` objective (``crf.search``)
scores its band, and the evaluation's trimap curves (``deeplab_v1.evaluation.trimap``) bin pixels by the
same distance.

The band comes from a distance transform: ``cv2.distanceTransform`` with ``DIST_C`` (chessboard, exact for
the 3x3 mask) of ``gt != 255`` gives each labelled pixel its distance d to the nearest void pixel, and a
pixel lies in the band of width w exactly when d <= w (the same set as the dilation; all widths from one
transform).
"""

from __future__ import annotations

import cv2
import numpy as np
from .errors import CRFInputError

__all__ = ["void_distance", "trimap_band"]


def void_distance(gt: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Chessboard distance (pixels) of every pixel to the nearest ``ignore_index`` pixel.

    Args:
        gt: (H, W) integer label map.

    Returns:
        (H, W) float32; 0 on void pixels; ``inf`` everywhere when the map has no void pixel.

    Raises:
        CRFInputError (a ValueError): ``gt`` is not 2-D.
    """
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise CRFInputError(f"label map must be (H, W), got shape {gt.shape}")
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
        (H, W) bool: dilate(gt == 255, (2w+1) x (2w+1) square) AND gt != 255, i.e.
        ``void_distance(gt) <= width`` on the labelled pixels. Empty when the map has no void pixel.

    Raises:
        CRFInputError (a ValueError): ``width`` < 0, or ``gt`` is not 2-D.
    """
    if width < 0:
        raise CRFInputError(f"band width must be >= 0 pixels, got {width}")
    gt = np.asarray(gt)
    return (void_distance(gt, ignore_index) <= width) & (gt != ignore_index)
