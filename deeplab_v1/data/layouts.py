"""Dataset layouts of the ``data:`` section (issue #23): VOC, a folder pair of one's own, Cityscapes.

- ``voc`` (the release's): ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass[Aug]/<id>.png``; a list
  is a split name (``ImageSets/Segmentation/<name>.txt``) or a deeplab-public list file (``lists.py``).
- ``folder``: ``root/<images>/<stem>.<jpg|jpeg|png|bmp|tif|tiff>`` and ``root/<labels>/<stem>.png``
  (palette or 8-bit grayscale PNGs of class indices), matched by file stem; a list is a text file of stems,
  one per line; no list means every image stem, sorted.
- ``cityscapes`` (the standard layout of cityscapesScripts):
  ``root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
  ``root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``; the list is the split name
  (``train``, ``val``, ``test``). The labelIds (0..33) are mapped to the 19 training classes (trainIds);
  every other id becomes 255 (ignored), as cityscapesScripts' ``labels.py`` defines them.

A dataset whose ignored value is not 255 names it in ``data.ignore_index``; it is read as 255, so that the
loss, the metrics and the trimap keep one convention.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .io import CITYSCAPES_TRAIN_IDS, IGNORE_LABEL, VOC_CLASSES, DataError, voc_palette
from .lists import Sample, load_samples

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_COLOURS", "CITYSCAPES_TRAIN_IDS", "IMAGE_SUFFIXES", "data_problem",
           "resolve_lists", "dataset_samples", "folder_samples", "cityscapes_samples", "class_names", "palette",
           "label_map_of", "png_palette"]

#: The 19 Cityscapes evaluation classes, in trainId order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
#: The classes' colours in cityscapesScripts (RGB), in trainId order.
CITYSCAPES_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
#: Image file suffixes of the ``folder`` layout.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def label_map_of(data: Any) -> Optional[str]:
    """The ``Sample.label_map`` of a ``DataConfig`` (``io.label_lut``): ``cityscapes``, ``ignore:<n>`` or None."""
    if data.layout == "cityscapes":
        return "cityscapes"
    return None if data.ignore_index == IGNORE_LABEL else f"ignore:{data.ignore_index}"


def _is_list_file(data: Any, value: Optional[str]) -> bool:
    return bool(value) and (value.endswith(".txt") or data.layout == "folder")


def resolve_lists(data: Any, base: Path) -> None:
    """Make ``data.train_list`` / ``test_list`` absolute when they are list files (a ``.txt`` file; any
    value for the ``folder`` layout), relative paths taken from ``base`` (the YAML file's folder)."""
    for key in ("train_list", "test_list"):
        value = getattr(data, key)
        if _is_list_file(data, value):
            p = Path(value).expanduser()
            setattr(data, key, str(p if p.is_absolute() else (base / p).resolve()))


def data_problem(data: Any, num_classes: int, *, check_paths: bool = True) -> Optional[tuple[str, str]]:
    """The first problem of a ``DataConfig`` with ``model.num_classes`` classes, checked before any work.

    Returns:
        None, or ``(dotted key, what is wrong)`` for ``config.validate`` to report with the key's source.
    """
    folder = data.layout == "folder"
    for key in ("images", "labels"):
        if folder and not getattr(data, key):
            return f"data.{key}", "must name a folder under data.root (data.layout is folder)"
        if not folder and getattr(data, key):
            return f"data.{key}", f"is only read with data.layout: folder (data.layout is {data.layout})"
    if data.class_names is not None and len(data.class_names) != num_classes:
        return "data.class_names", (f"has {len(data.class_names)} names but model.num_classes is {num_classes}; "
                                    f"give one name per class")
    if data.layout == "cityscapes" and num_classes != len(CITYSCAPES_CLASSES):
        return "model.num_classes", (f"is {num_classes} but data.layout cityscapes has {len(CITYSCAPES_CLASSES)} "
                                     f"classes (the trainIds); set model.num_classes: 19")
    if not num_classes <= data.ignore_index <= 255:
        return "data.ignore_index", (f"is {data.ignore_index}; it must lie in {num_classes}..255 (not a class of "
                                     f"model.num_classes {num_classes})")
    if data.palette is not None:
        if len(data.palette) < num_classes:
            return "data.palette", f"has {len(data.palette)} colours but model.num_classes is {num_classes}"
        bad = [c for c in data.palette if len(c) != 3 or not all(0 <= v <= 255 for v in c)]
        if bad:
            return "data.palette", f"must be [r, g, b] colours of 0..255, got {bad[0]!r}"
    if not check_paths:
        return None
    if not data.root.is_dir():
        return "data.root", f"points to {data.root}, which is not a folder"
    subdirs = {"folder": [("data.images", data.images), ("data.labels", data.labels)],
               "cityscapes": [("data.root", "leftImg8bit"), ("data.root", "gtFine")]}.get(data.layout, [])
    for key, sub in subdirs:
        if not (data.root / sub).is_dir():
            return key, f"names {data.root / sub}, which is not a folder"
    for key in ("train_list", "test_list"):
        value = getattr(data, key)
        if _is_list_file(data, value) and not Path(value).is_file():
            return f"data.{key}", f"points to the list file {value}, which does not exist"
    return None


def _stems_of(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file not found")
    stems = [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines()]
    stems = [s for s in stems if s and not s.startswith("#")]
    if not stems:
        raise DataError(f"{list_file}: list file is empty")
    return stems


def folder_samples(root: str | os.PathLike, images: str, labels: str, list_file: Optional[str] = None, *,
                   require_labels: bool = True, label_map: Optional[str] = None) -> list[Sample]:
    """Samples of the ``folder`` layout: images and label PNGs matched by file stem.

    Args:
        root: the data root; ``images`` and ``labels`` are folders under it.
        list_file: a text file of stems (one per line; ``#`` comments); None: every image stem, sorted.
        require_labels: every sample must have ``<labels>/<stem>.png``.
        label_map: ``Sample.label_map`` of every sample.

    Raises:
        DataError: a missing folder or list file, two images of one stem, a listed stem without an image, or
            (``require_labels``) an image without a label; the message names the folder, the file or the stem.
    """
    image_dir, label_dir = Path(root) / images, Path(root) / labels
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (data.images under data.root)")
    found: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in found:
                raise DataError(f"{image_dir}: two images of stem {p.stem!r} ({found[p.stem].name}, {p.name})")
            found[p.stem] = p
    stems = _stems_of(Path(list_file)) if list_file else sorted(found)
    if not stems:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for stem in stems:
        if stem not in found:
            raise DataError(f"{list_file}: stem {stem!r} has no image in {image_dir}")
        label: Optional[Path] = label_dir / f"{stem}.png"
        if not label.is_file():
            if require_labels:
                raise DataError(f"{label}: label file not found (image {found[stem].name})")
            label = None
        out.append(Sample(stem, found[stem], label, label_map))
    return out


def cityscapes_samples(root: str | os.PathLike, split: str, *, require_labels: bool = True) -> list[Sample]:
    """Samples of a Cityscapes split (``leftImg8bit/<split>/<city>/*_leftImg8bit.png``, labels
    ``gtFine/<split>/<city>/*_gtFine_labelIds.png``), sorted by city and name; ids ``<city>_<seq>_<frame>``.

    Raises:
        DataError: no such split folder, no images in it, or (``require_labels``) an image without its label.
    """
    root = Path(root)
    split_dir = root / "leftImg8bit" / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: Cityscapes split {split!r} not found")
    out = []
    for image in sorted(split_dir.glob("*/*_leftImg8bit.png")):
        sid = image.name[: -len("_leftImg8bit.png")]
        label: Optional[Path] = root / "gtFine" / split / image.parent.name / f"{sid}_gtFine_labelIds.png"
        if not label.is_file():
            if require_labels:
                raise DataError(f"{label}: Cityscapes label file not found (image {image})")
            label = None
        out.append(Sample(sid, image, label, "cityscapes"))
    if not out:
        raise DataError(f"{split_dir}: no *_leftImg8bit.png images under its city folders")
    return out


def dataset_samples(data: Any, split_or_list: Optional[str], *, require_labels: bool = True) -> list[Sample]:
    """The samples of a ``DataConfig``'s list (``train_list`` or ``test_list``) in its layout.

    Raises:
        DataError: see ``lists.load_samples``, ``folder_samples``, ``cityscapes_samples``.
    """
    if data.layout == "folder":
        return folder_samples(data.root, data.images, data.labels, split_or_list, require_labels=require_labels,
                              label_map=label_map_of(data))
    if data.layout == "cityscapes":
        return cityscapes_samples(data.root, str(split_or_list), require_labels=require_labels)
    samples = load_samples(data.root, split_or_list, require_labels=require_labels)
    lmap = label_map_of(data)
    return samples if lmap is None else [Sample(s.id, s.image, s.label, lmap) for s in samples]


def class_names(data: Any, num_classes: int) -> list[str]:
    """The names of the ``num_classes`` classes: ``data.class_names``, else the layout's (VOC's 21,
    Cityscapes' 19), else ``class<i>`` beyond them."""
    if data is not None and data.class_names:
        return list(data.class_names)
    known = CITYSCAPES_CLASSES if data is not None and data.layout == "cityscapes" else VOC_CLASSES
    if data is not None and data.layout == "folder":
        known = ()
    return [known[i] if i < len(known) else f"class{i}" for i in range(num_classes)]


def palette(data: Any = None) -> np.ndarray:
    """(256, 3) uint8 RGB colours of the label values: ``data.palette`` (or Cityscapes' colours) over the
    VOC colour map, which colours every other value (255, void, included)."""
    out = voc_palette()
    colours: Sequence[Sequence[int]] = ()
    if data is not None:
        colours = data.palette or (CITYSCAPES_COLOURS if data.layout == "cityscapes" else ())
    if colours:
        out[: len(colours)] = np.asarray(colours, dtype=np.uint8)
    return out


def png_palette(data: Any) -> Optional[np.ndarray]:
    """The colours of the label PNGs a run writes: ``palette(data)`` when the dataset has its own colours
    (``data.palette``, Cityscapes), else None (``io.write_label``'s VOC colour map)."""
    return palette(data) if data.palette or data.layout == "cityscapes" else None
