"""Search input files of real VOC 2012 val images for the search tests: resized images and labels with
DIAGNOSTIC degraded-ground-truth probabilities (``deeplab_v1.data.degraded``), not a network's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from crf.input_files import write_search_input
from deeplab_v1.data.degraded import degraded_probs

NUM_CLASSES = 21


def voc_search_files(voc_root: Path, positions: slice, folder: Path, scale: float,
                     rounding: Callable[[float], int] = round) -> list[Path]:
    """One search input file per VOC val image at ``positions`` of ``val.txt``, written into ``folder``.

    Images (INTER_AREA) and labels (nearest) are resized to ``rounding(width * scale)`` x
    ``rounding(height * scale)``; probabilities (21, H, W) float16 from the label (stride 16, blur 4,
    temperature 3). Returns the files, in ``val.txt`` order; their stems are the image ids.
    """
    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[positions]
    files = []
    for i in ids:
        image = np.array(Image.open(voc_root / "JPEGImages" / f"{i}.jpg").convert("RGB"))
        label = np.array(Image.open(voc_root / "SegmentationClass" / f"{i}.png"))
        size = (int(rounding(image.shape[1] * scale)), int(rounding(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        probs = degraded_probs(label, NUM_CLASSES, stride=16, blur_sigma=4.0, temperature=3.0)
        f = folder / f"{i}.npz"
        write_search_input(f, image, probs.astype(np.float16), label)
        files.append(f)
    return files
