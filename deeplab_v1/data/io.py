"""Reading images and label maps, writing label maps, the PASCAL VOC colour map.

Conventions (those of the Caffe release's ``IMAGE_SEG_DATA`` layer, which reads through OpenCV):
images are (H, W, 3) uint8 BGR 0..255; label maps are (H, W) uint8 class indices, 0 = background,
1..20 = the VOC object classes, 255 = "void" (object outlines and difficult regions, ignored by the loss and
by the evaluation).

VOC ``SegmentationClass`` PNGs are palette (mode ``P``) images whose pixel values ARE the class indices;
the palette only colours them. They are therefore read as indices with PIL and never colour-converted.
The SBD-augmented ``SegmentationClassAug`` PNGs are 8-bit grayscale with the same values; both are accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from crf.folders import voc_colours
from PIL import Image, UnidentifiedImageError

from ..atomic import atomic_file
from ..errors import DeepLabError

__all__ = ["DataError", "VOC_CLASSES", "IGNORE_LABEL", "voc_palette", "read_image", "read_label",
           "write_label", "check_label_values", "label_lut", "CITYSCAPES_TRAIN_IDS"]

#: The 21 PASCAL VOC 2012 segmentation classes, in label-index order (0 = background).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Cityscapes labelId -> trainId of its 19 evaluation classes (cityscapesScripts ``labels.py``); the ids
#: not listed are ignored (read as 255).
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

#: The label value ignored by the loss and the evaluation (VOC "void"; Caffe ``ignore_label: 255``).
IGNORE_LABEL = 255


class DataError(DeepLabError, ValueError):
    """Bad input data: a missing, unreadable or inconsistent file. The message names the file and what is
    wrong with it."""


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map (the devkit's ``VOClabelcolormap``).

    Colour of index i: the bits of i are interleaved into the high bits of R, G, B (bit 0 -> R, bit 1 -> G,
    bit 2 -> B, then the next three bits one place lower, and so on). Index 255 (void) is (224, 224, 192).

    Returns:
        (256, 3) uint8 RGB (``crf.folders.voc_colours``, the one definition).
    """
    return voc_colours()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a colour image as OpenCV (and Caffe) do.

    Grayscale files are expanded to three equal channels (``cv2.IMREAD_COLOR``), as Caffe's data layer does.

    Args:
        path: a JPEG/PNG file.

    Returns:
        (H, W, 3) uint8 BGR, 0..255.

    Raises:
        DataError: the file is missing, empty, not an image or corrupt (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    # imdecode on the bytes (instead of imread) also works for non-ASCII paths on every platform
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"{path}: image file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise DataError(f"{path}: not a readable image (corrupt file or unsupported format)")
    return image


def check_label_values(label: np.ndarray, num_classes: int, where: str | os.PathLike) -> None:
    """Check that a label map holds only 0..num_classes-1 and 255.

    Raises:
        DataError: other values are present; the message names ``where`` and lists the bad values.
    """
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_LABEL)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DataError(
            f"{where}: label values {shown} are outside 0..{num_classes - 1} and {IGNORE_LABEL} "
            f"(is this a colour-converted RGB mask, or a dataset with more classes?)"
        )


def label_lut(label_map: str | None) -> np.ndarray | None:
    """The (256,) uint8 lookup table of a ``Sample.label_map``: None for None; ``cityscapes``: labelIds to
    the 19 trainIds, every other id 255 (``CITYSCAPES_TRAIN_IDS``); ``ignore:<n>``: n to 255.

    Raises:
        DataError: an unknown name.
    """
    if label_map is None:
        return None
    lut = np.arange(256, dtype=np.uint8)
    if label_map == "cityscapes":
        lut[:] = IGNORE_LABEL
        lut[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())
    elif label_map.startswith("ignore:") and label_map[7:].isdigit() and int(label_map[7:]) <= 255:
        lut[int(label_map[7:])] = IGNORE_LABEL
    else:
        raise DataError(f"unknown label map {label_map!r} (cityscapes or ignore:<0..255>)")
    return lut


def read_label(path: str | os.PathLike, num_classes: int = 21, label_map: str | None = None) -> np.ndarray:
    """Read a label map of class indices.

    Accepts palette (mode ``P``, VOC ``SegmentationClass``) and 8-bit grayscale (mode ``L``,
    ``SegmentationClassAug``) PNGs; the stored values are the class indices. RGB masks are refused, since
    their colours would need a palette lookup that may silently be wrong.

    Args:
        path: the PNG file.
        num_classes: valid labels are 0..num_classes-1 and 255 (void).
        label_map: the values' mapping to class indices (``label_lut``), applied before the check.

    Returns:
        (H, W) uint8 class indices.

    Raises:
        DataError: missing/unreadable file, a mode other than ``P``/``L``, or values outside
            0..num_classes-1 and 255 (the message names the file and the bad values).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L"):
                raise DataError(
                    f"{path}: label image has mode {mode!r}; expected a palette ('P') or 8-bit grayscale ('L') "
                    f"PNG of class indices"
                )
            label = np.array(im, dtype=np.uint8)  # palette images give their indices, not colours
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable label image ({exc})") from exc
    if label.ndim != 2 or label.size == 0:
        raise DataError(f"{path}: label image has shape {label.shape}, expected (H, W)")
    if label_map is not None:
        label = label_lut(label_map)[label]
    check_label_values(label, num_classes, path)
    return label


def write_label(path: str | os.PathLike, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a label map as a palette PNG (the format of ``SegmentationClass``), atomically.

    The file is written to a temporary name in the same folder and moved into place with ``os.replace``,
    so an interrupted run never leaves a truncated PNG. Missing parent folders are created.

    Args:
        path: destination ``.png``.
        label: (H, W) integer class indices in 0..255.
        palette: (256, 3) uint8 RGB colours of the values (``layouts.palette``); None: the VOC colour map.

    Raises:
        ValueError: ``label`` is not 2-D or has values outside 0..255.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: a label map must be (H, W), got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"{path}: label values must be within 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    image = _palette_image(label, palette)
    with atomic_file(path) as f:
        image.save(f, format="PNG")


def _palette_image(label: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
    """A mode ``P`` PIL image whose pixel values are ``label`` (uint8) with ``palette`` (default VOC's)."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    image.putpalette((voc_palette() if palette is None else np.asarray(palette, np.uint8)).reshape(-1).tolist())
    return image
