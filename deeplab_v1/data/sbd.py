"""Semantic Boundaries Dataset (SBD, Hariharan et al. 2011) -> ``SegmentationClassAug`` PNGs.

The release trains on ``train_aug`` (10,582 images): VOC 2012 train plus the SBD annotations, read from a
``SegmentationClassAug`` folder of 8-bit grayscale PNGs of class indices. SBD ships its class annotations as
MATLAB files ``dataset/cls/<id>.mat``, each holding a struct ``GTcls`` whose field ``Segmentation`` is the
(H, W) uint8 index map (0 = background, 1..20 = classes; SBD has no 255 "void"). This module converts them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from ..atomic import atomic_file
from .io import DataError, check_label_values

__all__ = ["read_sbd_mat", "write_gray_label", "convert_sbd", "ConversionSummary"]


def read_sbd_mat(path: str | os.PathLike, num_classes: int = 21) -> np.ndarray:
    """The ``GTcls.Segmentation`` index map of an SBD ``cls/*.mat`` file.

    Args:
        path: the ``.mat`` file (MATLAB v5 format, as SBD ships them).
        num_classes: valid labels are 0..num_classes-1 (and 255).

    Returns:
        (H, W) uint8 class indices.

    Raises:
        DataError: unreadable file, no ``GTcls`` struct or no ``Segmentation`` field, a map that is not 2-D,
            or values out of range; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .mat file not found")
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # scipy raises several types for bad files (ValueError, TypeError, OSError, ...)
        raise DataError(f"{path}: not a readable MATLAB .mat file ({exc})") from exc
    if "GTcls" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no 'GTcls' struct (variables: {keys}); expected an SBD cls/*.mat file")
    gt = mat["GTcls"]
    if not hasattr(gt, "Segmentation"):
        fields = list(getattr(gt, "_fieldnames", []) or [])
        raise DataError(f"{path}: 'GTcls' has no field 'Segmentation' (fields: {fields})")
    seg = np.asarray(gt.Segmentation)
    if seg.ndim != 2 or seg.size == 0:
        raise DataError(f"{path}: 'GTcls.Segmentation' has shape {seg.shape}, expected (H, W)")
    if not np.issubdtype(seg.dtype, np.integer):
        if not np.all(np.equal(np.mod(seg, 1), 0)):
            raise DataError(f"{path}: 'GTcls.Segmentation' holds non-integer values ({seg.dtype})")
    if seg.min() < 0 or seg.max() > 255:
        raise DataError(f"{path}: 'GTcls.Segmentation' values {seg.min()}..{seg.max()} are outside 0..255")
    seg = seg.astype(np.uint8)
    check_label_values(seg, num_classes, path)
    return seg


def write_gray_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write (H, W) uint8 class indices as an 8-bit grayscale PNG (``SegmentationClassAug``), atomically."""
    path = Path(path)
    with atomic_file(path) as f:
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(f, format="PNG")


@dataclass
class ConversionSummary:
    """What ``convert_sbd`` did: counts of files and the class-pixel histogram of the written maps."""

    converted: int = 0
    skipped: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))

    def line(self, out_dir: Path) -> str:
        present = int(np.count_nonzero(self.class_pixels[:255]))
        return (f"converted {self.converted} SBD annotations to {out_dir} ({self.skipped} already there, skipped); "
                f"{present} classes present")


def convert_sbd(cls_dir: str | os.PathLike, out_dir: str | os.PathLike, *, num_classes: int = 21,
                overwrite: bool = False, progress: bool = True) -> ConversionSummary:
    """Convert every ``cls_dir/*.mat`` into ``out_dir/<id>.png`` (8-bit grayscale class indices).

    Args:
        cls_dir: SBD's ``dataset/cls`` folder.
        out_dir: the ``SegmentationClassAug`` folder to fill (created if needed).
        num_classes: valid labels are 0..num_classes-1.
        overwrite: rewrite PNGs that exist already (otherwise they are skipped, so an interrupted
            conversion resumes).
        progress: show a tqdm bar.

    Returns:
        A ``ConversionSummary``.

    Raises:
        DataError: ``cls_dir`` missing or without ``.mat`` files, or a bad ``.mat`` (named in the message).
    """
    cls_dir, out_dir = Path(cls_dir), Path(out_dir)
    if not cls_dir.is_dir():
        raise DataError(f"{cls_dir}: SBD class folder not found")
    files = sorted(cls_dir.glob("*.mat"))
    if not files:
        raise DataError(f"{cls_dir}: no .mat files (expected SBD's dataset/cls folder)")
    summary = ConversionSummary()
    for mat in tqdm(files, desc="sbd -> png", unit="file", disable=not progress, dynamic_ncols=True):
        target = out_dir / f"{mat.stem}.png"
        if target.is_file() and not overwrite:
            summary.skipped += 1
            continue
        label = read_sbd_mat(mat, num_classes)
        write_gray_label(target, label)
        summary.class_pixels += np.bincount(label.ravel(), minlength=256)
        summary.converted += 1
    return summary
