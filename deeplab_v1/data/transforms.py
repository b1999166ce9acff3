"""Image and label transforms of the Caffe release's ``IMAGE_SEG_DATA`` layer and data transformer.

Facts implemented here (deeplab-public ``train.prototxt`` / ``test.prototxt``):

- images are BGR 0..255 with the per-channel mean (B, G, R) = (104.008, 116.669, 122.675) subtracted and
  no scaling;
- an image smaller than the crop is padded at the bottom and the right, the image with the mean colour
  after conversion to floating point (so exactly 0 after the mean subtraction), the label with 255
  (ignored);
- training takes a uniform random crop and a random horizontal mirror; test takes the padded image whole;
- the label map is shrunk to the score map's size by ``INTERP`` with ``shrink_factor: 8`` (``pad_beg: -1``
  for the 306 crop of ``DeepLab``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ..pixel_means import MEAN_BGR, TORCHVISION_MEAN_RGB, TORCHVISION_STD_RGB
from .io import IGNORE_LABEL, DataError

__all__ = ["MEAN_BGR", "TORCHVISION_MEAN_RGB", "TORCHVISION_STD_RGB", "pad_to", "random_crop_mirror", "image_to_tensor",
           "shrink_label", "shrunk_size"]



def _check_pair(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) BGR, got shape {image.shape}")
    if label is not None:
        if label.ndim != 2:
            raise ValueError(f"label must be (H, W), got shape {label.shape}")
        if label.shape != image.shape[:2]:
            raise DataError(
                f"image size {image.shape[0]}x{image.shape[1]} and label size {label.shape[0]}x{label.shape[1]} "
                f"differ (H x W)"
            )


def pad_to(image: np.ndarray, label: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad at the bottom and the right to at least ``size`` x ``size`` pixels (no-op if already as large).

    The release's data layer converts the image to floating point before ``cv::copyMakeBorder`` pads it
    with the mean (``DEEPLAB_V1_FACTS``: "so 0 after mean subtraction"), so a padded image comes back as
    float32 with the exact mean (104.008, 116.669, 122.675) in the border, never the rounded (104, 117,
    123) an 8-bit border would hold. The label is padded with 255 (ignored).

    Args:
        image: (H, W, 3) BGR, uint8 0..255 (or float).
        label: (H, W) uint8 class indices, or None.
        size: the minimum height and width in pixels.

    Returns:
        (image (H', W', 3), label (H', W') or None) with H' = max(H, size), W' = max(W, size); the image is
        float32 when it was padded, else returned as given.

    Raises:
        DataError: image and label sizes differ.
    """
    _check_pair(image, label)
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return image, label
    image = cv2.copyMakeBorder(image.astype(np.float32, copy=False), 0, ph, 0, pw, cv2.BORDER_CONSTANT,
                               value=[float(v) for v in MEAN_BGR])
    if label is not None:
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE_LABEL)
    return image, label


def random_crop_mirror(image: np.ndarray, label: np.ndarray | None, crop: int, rng: np.random.Generator,
                       mirror: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Training crop of the data transformer: pad to ``crop`` if smaller, uniform random crop, random mirror.

    The crop offsets are drawn uniformly from 0..H-crop and 0..W-crop (both ends included), then the
    horizontal flip with probability 0.5 (when ``mirror``), all from ``rng``, so equal generator states give
    equal crops.

    Args:
        image: (H, W, 3) uint8 BGR.
        label: (H, W) uint8, or None.
        crop: crop side in pixels (321 for LargeFOV, 306 for DeepLab).
        rng: the random generator.
        mirror: allow the horizontal flip.

    Returns:
        (image (crop, crop, 3) (float32 when padded, see ``pad_to``), label (crop, crop) or None),
        C-contiguous.

    Raises:
        DataError: image and label sizes differ.
    """
    image, label = pad_to(image, label, crop)
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    flip = bool(mirror and rng.random() < 0.5)
    image = image[top:top + crop, left:left + crop]
    if label is not None:
        label = label[top:top + crop, left:left + crop]
    if flip:
        image = image[:, ::-1]
        label = label[:, ::-1] if label is not None else None
    return np.ascontiguousarray(image), (np.ascontiguousarray(label) if label is not None else None)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Network input of one image: mean-subtracted BGR, channels first.

    Args:
        image: (H, W, 3) BGR 0..255 (uint8 or float).

    Returns:
        (3, H, W) float32 tensor, BGR 0..255 minus ``MEAN_BGR`` (no scaling to 0..1, as in Caffe).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) BGR, got shape {image.shape}")
    x = image.astype(np.float32) - np.asarray(MEAN_BGR, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def shrunk_size(size: int, factor: int = 8, pad_beg: int = 0) -> int:
    """Output size of Caffe ``INTERP`` with ``shrink_factor``: ((size + pad_beg) - 1) // factor + 1."""
    effective = size + pad_beg
    if effective < 1:
        raise ValueError(f"size {size} with pad_beg {pad_beg} leaves no pixels")
    return (effective - 1) // factor + 1


def shrink_label(label: np.ndarray, factor: int = 8, pad_beg: int = 0) -> np.ndarray:
    """Shrink a label map to the score map's size, as the release's ``INTERP`` layer (``shrink_factor``).

    Caffe's INTERP takes the effective input size ``size + pad_beg`` (a negative ``pad_beg`` crops that many
    pixels at the top/left), gives ``(eff - 1) // factor + 1`` outputs and samples the input corner-aligned,
    at ``-pad_beg + i * (eff - 1) / (out - 1)``. For the release's crops the step is exactly ``factor``
    (321 -> 41 samples at 0, 8, ..., 320; 306 with ``pad_beg: -1`` -> 39 samples at 1, 9, ..., 305), so the
    labels are copied, not blended. We always sample at ``-pad_beg + factor * i`` (class indices cannot be
    interpolated), which is Caffe's result whenever ``(eff - 1) % factor == 0``; for other sizes Caffe would
    blend neighbouring labels.

    Args:
        label: (H, W) class indices.
        factor: the shrink factor (8 = output_stride).
        pad_beg: Caffe's ``pad_beg`` (0 or negative).

    Returns:
        (h, w) uint8 with h = shrunk_size(H, factor, pad_beg), w likewise.

    Raises:
        ValueError: not 2-D, factor < 1 or pad_beg > 0.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    if factor < 1:
        raise ValueError(f"shrink factor must be >= 1, got {factor}")
    if pad_beg > 0:
        raise ValueError(f"pad_beg must be <= 0 (positive padding would sample outside the label), got {pad_beg}")
    h, w = label.shape
    rows = -pad_beg + factor * np.arange(shrunk_size(h, factor, pad_beg))
    cols = -pad_beg + factor * np.arange(shrunk_size(w, factor, pad_beg))
    return np.ascontiguousarray(label[np.ix_(rows, cols)].astype(np.uint8))
