"""Folders of any model's outputs for ``python -m crf`` (issue #23 item 2): images, per-image class maps
and label PNGs matched by file stem, checked before any work.

A class map is ``<stem>.npy`` or ``<stem>.npz`` holding a ``(C, h, w)`` float array: probabilities, or
logits (scores before the softmax) with ``logits=True``; in an ``.npz`` the array named ``probs`` (or
``logits`` / ``scores``), or its only array. Maps smaller than their image are upsampled bilinearly with
the corners aligned, as DeepLab's Caffe ``Interp`` layer zooms its stride-8 scores (DeepLab v1 Sec. 3.1,
4.1), before the softmax when they are logits. Labels are 8-bit PNGs whose values are the class indices
(palette ``P`` as VOC's, or grayscale ``L``); predictions are written the same way with VOC's colours.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .errors import CRFInputError

__all__ = ["IMAGE_SUFFIXES", "MAP_SUFFIXES", "files_by_stem", "match_maps", "map_shape", "load_map",
           "to_probs", "read_rgb", "read_label", "voc_colours", "write_palette_png", "check_maps"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAP_SUFFIXES = (".npy", ".npz")
#: Keys looked for in an ``.npz`` class map, in order, when it holds more than one array.
NPZ_KEYS = ("probs", "logits", "scores")
#: Most bad files listed by name in one error message (the count of the rest follows).
MAX_LISTED = 20


def files_by_stem(folder: str | os.PathLike, suffixes: tuple[str, ...], option: str) -> dict[str, Path]:
    """``{stem: path}`` of the files of ``folder`` with one of ``suffixes`` (case-insensitive).

    Raises:
        CRFInputError: the folder does not exist, or two files share a stem (both named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CRFInputError(f"{option}: folder {folder} does not exist")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in out:
                raise CRFInputError(f"{option}: {out[path.stem].name} and {path.name} share the stem {path.stem!r}")
            out[path.stem] = path
    return out


def bad_files_error(problems: list[str], what: str) -> CRFInputError:
    """One error naming every bad file (the first :data:`MAX_LISTED`, then the count of the rest)."""
    shown = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return CRFInputError(f"{len(problems)} bad {what}: {shown}{more}")


def match_maps(images: dict[str, Path], maps: dict[str, Path], maps_option: str = "--probs") -> list[str]:
    """The stems of ``maps``, sorted; every map must have its image (extra images are fine).

    Raises:
        CRFInputError: maps without an image (every one named), or no map at all.
    """
    if not maps:
        raise CRFInputError(f"{maps_option}: no .npy or .npz class map found")
    missing = [f"{maps[s]}: no image {s}.* in --images" for s in sorted(set(maps) - set(images))]
    if missing:
        raise bad_files_error(missing, "class maps")
    return sorted(maps)


def _npz_key(names: list[str], path: Path) -> str:
    keys = [n[:-4] for n in names if n.endswith(".npy")]
    if len(keys) == 1:
        return keys[0]
    for key in NPZ_KEYS:
        if key in keys:
            return key
    raise CRFInputError(f"{path}: holds arrays {sorted(keys)}; expected one array or one named {list(NPZ_KEYS)}")


def map_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a class map from its header only.

    Raises:
        CRFInputError: not a readable ``.npy`` / ``.npz`` (the cause named).
    """
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return tuple(array.shape), array.dtype
        with zipfile.ZipFile(path) as z:
            key = _npz_key(z.namelist(), path)
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            return tuple(int(x) for x in shape), np.dtype(dtype)
    except CRFInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, ValueError, OSError, EOFError of a damaged file
        raise CRFInputError(f"{path}: not a readable {path.suffix} file ({type(exc).__name__}: {exc})") from exc


def load_map(path: str | os.PathLike) -> np.ndarray:
    """The class map of a ``.npy`` / ``.npz`` file, as stored.

    Raises:
        CRFInputError: not readable (the cause named).
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            return z[_npz_key([f"{k}.npy" for k in z.files], path)]
    except CRFInputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CRFInputError(f"{path}: not a readable {path.suffix} file ({type(exc).__name__}: {exc})") from exc


def to_probs(values: np.ndarray, height: int, width: int, logits: bool, where: str = "map") -> np.ndarray:
    """``(C, h, w)`` probabilities or logits -> float32 ``(C, height, width)`` probabilities.

    Smaller maps are upsampled bilinearly with the corners aligned (Caffe ``Interp``), logits before
    their softmax; probabilities stay probabilities (the bilinear weights sum to 1).

    Raises:
        CRFInputError: not ``(C, h, w)`` with C >= 2 and h, w at most the image's, not floating point,
            or NaN/inf (``where`` names the file).
    """
    values = np.asarray(values)
    if values.ndim != 3 or values.shape[0] < 2:
        raise CRFInputError(f"{where}: must be (C, H, W) with C >= 2 classes, got shape {values.shape}")
    if values.dtype.kind != "f":
        raise CRFInputError(f"{where}: must hold floats, got {values.dtype}")
    if values.shape[1] > height or values.shape[2] > width:
        raise CRFInputError(f"{where}: map {values.shape[1]}x{values.shape[2]} is larger than its image "
                            f"{height}x{width}")
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if not bool(torch.isfinite(t).all()):
        raise CRFInputError(f"{where}: holds NaN or infinite values")
    if t.shape[1:] != (height, width):
        t = torch.nn.functional.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=True)[0]
    if logits:
        t = torch.softmax(t, dim=0)
    else:
        from .inputs import SUM_TOLERANCE

        worst = float((t.sum(dim=0, dtype=torch.float64) - 1).abs().max())
        if worst > SUM_TOLERANCE or float(t.min()) < 0:
            raise CRFInputError(f"{where}: not probabilities (sums over C differ from 1 by up to {worst:.3g}, "
                                f"minimum {float(t.min()):.3g}); pass --logits for scores before the softmax")
    return t.numpy()


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image as uint8 RGB ``(H, W, 3)``.

    Raises:
        CRFInputError: not a readable image (named).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for damaged files
        raise CRFInputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image from its header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as exc:  # noqa: BLE001
        raise CRFInputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label PNG's class indices, uint8 ``(H, W)`` (palette ``P`` or grayscale ``L``; 255 = ignored).

    Raises:
        CRFInputError: not readable, or of another mode (an RGB label's colours are not indices).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise CRFInputError(f"{path}: label image has mode {im.mode!r}; expected palette ('P') or "
                                    "8-bit grayscale ('L') class indices")
            return np.array(im, dtype=np.uint8)
    except CRFInputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CRFInputError(f"{path}: not a readable label image ({type(exc).__name__}: {exc})") from exc


def voc_colours() -> np.ndarray:
    """PASCAL VOC's colour map, ``(256, 3)`` uint8: the bits of index i, three at a time, become the
    high bits of R, G and B (bit 0 the top bit of R, bit 1 of G, bit 2 of B, the next three one lower)."""
    index = np.arange(256)
    colours = np.zeros((256, 3), np.uint8)
    for level in range(8):
        for channel in range(3):
            colours[:, channel] += (((index >> (3 * level + channel)) & 1) << (7 - level)).astype(np.uint8)
    return colours


def write_palette_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an ``(H, W)`` label map atomically as a palette PNG (values = class indices, VOC's colours).

    Raises:
        CRFInputError: not 2-D, or values outside 0..255.
    """
    from PIL import Image

    label = np.asarray(label)
    if label.ndim != 2 or (label.size and (label.min() < 0 or label.max() > 255)):
        raise CRFInputError(f"{path}: labels must be (H, W) in 0..255, got shape {label.shape}")
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(voc_colours().reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def check_maps(stems: list[str], images: dict[str, Path], maps: dict[str, Path]) -> int:
    """Check every class map against its image from the headers, before any work; returns C.

    Raises:
        CRFInputError: every bad map named: unreadable, not ``(C, h, w)`` floats with C >= 2, larger than
            its image, or with another C than the first map.
    """
    problems, classes = [], None
    for stem in stems:
        path = maps[stem]
        try:
            shape, dtype = map_shape(path)
            if len(shape) != 3 or shape[0] < 2 or dtype.kind != "f":
                raise CRFInputError(f"{path}: must be (C, H, W) floats with C >= 2, got {dtype} {shape}")
            height, width = image_size(images[stem])
            if shape[:2] == (height, width) and shape[2] < shape[0]:
                raise CRFInputError(f"{path}: shape {shape} looks channels-last (H, W, C); store (C, H, W), "
                                    "e.g. np.moveaxis(a, -1, 0)")
            if shape[1] > height or shape[2] > width:
                raise CRFInputError(f"{path}: map {shape[1]}x{shape[2]} is larger than its image {height}x{width}")
            if classes is None:
                classes = shape[0]
            elif shape[0] != classes:
                raise CRFInputError(f"{path}: has C={shape[0]} classes, {maps[stems[0]].name} has {classes}")
        except CRFInputError as exc:
            problems.append(str(exc))
    if problems:
        raise bad_files_error(problems, "class maps")
    return int(classes)
