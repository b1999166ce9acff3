"""The trimap band: the labelled pixels near object boundaries (DeepLab v1 Sec. 5, Fig. 5).

Two bands of width w (pixels), both the labelled pixels within chessboard distance w of a set:

- ``void`` (the release's, ``MyVOCevalsegBoundary.m``): VOC ground truth outlines every object with a few
  pixels of "void" (255), and the band is ``imdilate(gt == 255, strel('square', 2w + 1)) & gt ~= 255``: the
  labelled pixels within distance w of a void pixel. A dataset without void outlines has an empty band.
- ``boundary`` (for datasets that draw no void, issue #23): the labelled pixels within distance w of a
  labelled pixel of another class, i.e. ``dilate(gt == c', square 2w + 1)`` over the classes c' other than
  the pixel's own. Both sides of a label change lie in the band (a pixel touching another class, 8-connected,
  has distance 1), so it is the void band's analogue with the outline drawn 0 pixels wide. Void pixels are
  never in it and never count as "another class"; a map of one class has an empty band.

This module is the one definition: the search's ``trimap_miou`` objective (``crf.search``, ``python -m crf
search --band``) scores its band, and the evaluations' trimap curves (``deeplab_v1.evaluation.trimap``,
``python -m crf evaluate --band``) bin pixels by the same distance.

The distances come from ``cv2.distanceTransform`` with ``DIST_C`` (chessboard, exact for the 3x3 mask): of
``gt != 255`` for the void band (each pixel's distance to the nearest void pixel), and, for the boundary
band, of ``gt != c`` for every class c present (the minimum over the classes other than the pixel's own).
A pixel lies in the band of width w exactly when its distance d <= w (all widths from one transform).
"""

from __future__ import annotations

import cv2
import numpy as np
from .errors import CRFInputError

__all__ = ["BANDS", "void_distance", "boundary_distance", "band_distance", "trimap_band"]

#: The band kinds: around void outlines (the release's) or around label changes.
BANDS: tuple[str, ...] = ("void", "boundary")


def _labels_2d(gt: np.ndarray) -> np.ndarray:
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise CRFInputError(f"label map must be (H, W), got shape {gt.shape}")
    return gt


def void_distance(gt: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Chessboard distance (pixels) of every pixel to the nearest ``ignore_index`` pixel.

    Args:
        gt: (H, W) integer label map.

    Returns:
        (H, W) float32; 0 on void pixels; ``inf`` everywhere when the map has no void pixel.

    Raises:
        CRFInputError (a ValueError): ``gt`` is not 2-D.
    """
    gt = _labels_2d(gt)
    labelled = gt != ignore_index
    if labelled.all():
        return np.full(gt.shape, np.inf, dtype=np.float32)
    # pixels outside the image count as non-void, as cv2.dilate's default border does
    return cv2.distanceTransform(labelled.astype(np.uint8), cv2.DIST_C, 3)


def boundary_distance(gt: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Chessboard distance (pixels) of every labelled pixel to the nearest labelled pixel of another class.

    Args:
        gt: (H, W) integer label map.

    Returns:
        (H, W) float32; >= 1 on labelled pixels (1: an 8-neighbour of another class); ``inf`` on void pixels
        and where no other class is present.

    Raises:
        CRFInputError (a ValueError): ``gt`` is not 2-D.
    """
    gt = _labels_2d(gt)
    out = np.full(gt.shape, np.inf, dtype=np.float32)
    classes = [c for c in np.unique(gt) if c != ignore_index]
    if len(classes) < 2:
        return out
    for c in classes:  # distance to class c, taken by the pixels of the other classes
        to_c = cv2.distanceTransform((gt != c).astype(np.uint8), cv2.DIST_C, 3)
        other = (gt != c) & (gt != ignore_index)
        out[other] = np.minimum(out[other], to_c[other])
    return out


def band_distance(gt: np.ndarray, band: str = "void", ignore_index: int = 255) -> np.ndarray:
    """The distance ``band``'s widths are measured in: ``void_distance`` or ``boundary_distance``.

    Raises:
        CRFInputError (a ValueError): ``band`` is not one of ``BANDS``, or ``gt`` is not 2-D.
    """
    if band == "void":
        return void_distance(gt, ignore_index)
    if band == "boundary":
        return boundary_distance(gt, ignore_index)
    raise CRFInputError(f"trimap band must be one of {', '.join(BANDS)}, got {band!r}")


def trimap_band(gt: np.ndarray, width: int, ignore_index: int = 255, band: str = "void") -> np.ndarray:
    """The trimap band of ``width`` pixels around the void outlines (``band="void"``) or the label changes
    (``band="boundary"``).

    Args:
        gt: (H, W) integer label map.
        width: band width w in pixels (the square structuring element has side 2w + 1).

    Returns:
        (H, W) bool. ``void``: dilate(gt == 255, (2w+1) x (2w+1) square) AND gt != 255; empty when the map
        has no void pixel. ``boundary``: the labelled pixels within distance w of another class.

    Raises:
        CRFInputError (a ValueError): ``width`` < 0, an unknown ``band``, or ``gt`` is not 2-D.
    """
    if width < 0:
        raise CRFInputError(f"band width must be >= 0 pixels, got {width}")
    gt = np.asarray(gt)
    return (band_distance(gt, band, ignore_index) <= width) & (gt != ignore_index)
