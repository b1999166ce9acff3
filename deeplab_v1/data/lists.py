"""Sample lists: which images (and label maps) make up a split.

Two formats are read:

- the PASCAL VOC 2012 layout: ``root/ImageSets/Segmentation/<split>.txt`` lists ids, the files are
  ``root/JPEGImages/<id>.jpg`` and ``root/SegmentationClass/<id>.png``;
- the deeplab-public list format (``list/train_aug.txt`` etc. of the Caffe release): each line is
  ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``, paths relative to a data root (the leading slash
  is part of the format, the root is simply prepended), or a single image path (``test.txt``, no labels).

Every function checks that every listed file exists before returning, so a run fails at once, naming the
list file, the line and the missing path, instead of hours into training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import DataError

__all__ = ["DataError", "Sample", "voc_split", "read_list", "load_samples", "choose_subset"]


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes:
        id: the image id (file stem, e.g. ``2007_000033``); names every per-image output.
        image: the JPEG (or PNG) path.
        label: the label PNG path, or None for unlabelled (test) images.
        label_map: how the label file's values become class indices (``io.label_lut``): None (as stored),
            ``cityscapes`` (labelIds -> trainIds) or ``ignore:<n>`` (value n read as 255).
    """

    id: str
    image: Path
    label: Path | None
    label_map: str | None = None


def _lines(list_file: Path) -> list[tuple[int, list[str]]]:
    """Non-empty, non-comment lines of a list file as (1-based line number, tokens)."""
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file not found")
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{list_file}: list file is not readable text ({exc})") from exc
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((number, line.split()))
    if not out:
        raise DataError(f"{list_file}: list file is empty")
    return out


def _check(samples: list[tuple[int, Sample]], list_file: Path) -> list[Sample]:
    """Check that every file exists and that ids are unique (outputs are named by id)."""
    seen: dict[str, int] = {}
    for number, s in samples:
        for path in (s.image, s.label):
            if path is not None and not path.is_file():
                raise DataError(f"{list_file}, line {number}: file {path} does not exist")
        if s.id in seen:
            raise DataError(
                f"{list_file}, line {number}: image id {s.id!r} repeats line {seen[s.id]} "
                f"(per-image outputs are named by id)"
            )
        seen[s.id] = number
    return [s for _, s in samples]


def voc_split(root: str | os.PathLike, split: str, *, require_labels: bool = True) -> list[Sample]:
    """Samples of a VOC 2012 segmentation split (``train``, ``val``, ``trainval``, ...).

    Args:
        root: the ``VOC2012`` folder (holding ``ImageSets``, ``JPEGImages``, ``SegmentationClass``).
        split: the name of a file in ``root/ImageSets/Segmentation`` without ``.txt``.
        require_labels: when False, an id without ``SegmentationClass/<id>.png`` gets ``label=None``
            instead of an error.

    Returns:
        The samples in list order.

    Raises:
        DataError: the list file is missing or empty, an image (or a required label) does not exist, or an
            id repeats; the message names the list file, the line and the path.
    """
    root = Path(root)
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: split {split!r} not found (no such list file under {root})")
    samples = []
    for number, tokens in _lines(list_file):
        if len(tokens) != 1:
            raise DataError(f"{list_file}, line {number}: expected one image id, got {' '.join(tokens)!r}")
        sid = tokens[0]
        label = root / "SegmentationClass" / f"{sid}.png"
        if not require_labels and not label.is_file():
            label = None
        samples.append((number, Sample(sid, root / "JPEGImages" / f"{sid}.jpg", label)))
    return _check(samples, list_file)


def _under_root(root: Path, token: str) -> Path:
    # "/JPEGImages/x.jpg" is relative to the data root in the release's lists: Caffe concatenates root + path
    return root / token.lstrip("/\\")


def read_list(list_file: str | os.PathLike, root: str | os.PathLike, *, require_labels: bool = False) -> list[Sample]:
    """Samples of a deeplab-public style list file.

    Line formats: ``<image> <label>`` (training/validation lists), ``<image>`` (test lists, no label), both
    relative to ``root`` with an optional leading slash; a bare id without folder or extension (a VOC
    ``ImageSets`` file) is read as ``JPEGImages/<id>.jpg`` + ``SegmentationClass/<id>.png``.

    Args:
        list_file: the list ``.txt``.
        root: the data root the paths are relative to.
        require_labels: refuse lines without a label path.

    Returns:
        The samples in list order; ``id`` is the image file stem.

    Raises:
        DataError: missing/empty list file, a malformed line, a missing label where required, a missing
            file or a repeated id; the message names the list file, the line number and the path.
    """
    list_file, root = Path(list_file), Path(root)
    samples = []
    for number, tokens in _lines(list_file):
        if len(tokens) > 2:
            raise DataError(
                f"{list_file}, line {number}: expected '<image> [<label>]', got {len(tokens)} fields"
            )
        if len(tokens) == 1 and "/" not in tokens[0] and "\\" not in tokens[0] and not Path(tokens[0]).suffix:
            sid = tokens[0]
            image = root / "JPEGImages" / f"{sid}.jpg"
            label: Path | None = root / "SegmentationClass" / f"{sid}.png"
            if not require_labels and not label.is_file():
                label = None
        else:
            image = _under_root(root, tokens[0])
            label = _under_root(root, tokens[1]) if len(tokens) == 2 else None
            sid = image.stem
        if label is None and require_labels:
            raise DataError(f"{list_file}, line {number}: no label path for {tokens[0]} (labels are required here)")
        samples.append((number, Sample(sid, image, label)))
    return _check(samples, list_file)


def load_samples(root: str | os.PathLike, split_or_list: str | os.PathLike, require_labels: bool = True) -> list[Sample]:
    """Samples of a split name (``val``) or a list file (``list/val.txt``).

    A value naming an existing file, or ending in ``.txt``, is a list file (read with ``read_list``; a relative
    path is tried as given, then under ``root``); anything else is a VOC split name (``voc_split``).

    Args:
        root: the data root.
        split_or_list: split name or list file path.
        require_labels: every sample must have an existing label file.

    Raises:
        DataError: see ``voc_split`` and ``read_list``; a ``.txt`` list that does not exist.
    """
    root = Path(root)
    value = Path(split_or_list)
    if str(split_or_list).endswith(".txt") or value.is_file():
        candidates = [value] if value.is_absolute() else [value, root / value]
        for candidate in candidates:
            if candidate.is_file():
                return read_list(candidate, root, require_labels=require_labels)
        raise DataError(f"{value}: list file not found (also looked under {root})")
    return voc_split(root, str(split_or_list), require_labels=require_labels)


def choose_subset(ids: list[str], count: int, seed: int) -> list[str]:
    """``count`` of ``ids`` drawn without replacement by ``numpy.random.default_rng(seed)``, in list order
    (all of them when ``count >= len(ids)``): the CRF search's images (paper Sec. 5: 100 val images), the
    same on every rank and machine for one seed."""
    if count >= len(ids):
        return list(ids)
    pick = np.random.default_rng(seed).choice(len(ids), size=count, replace=False)
    return [ids[i] for i in sorted(pick)]
