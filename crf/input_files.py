"""The two ``.npz`` file kinds that feed ``crf`` (neither is the network's score cache, ``scores/<id>.npz``,
which ``deeplab_v1`` reads through a ``load`` hook of its own).

CRF input file (read by ``crf.parallel.run_crf_many``, one per image):
    ``image``: (H, W, 3) uint8 RGB 0..255.
    ``probs``: (C, H, W) float16 or float32 class probabilities (upsampled to the image, softmaxed),
    summing to 1 over C.

Search input file (read by ``crf.search``, one per image of the search subset): the keys of a CRF input
file and
    ``label``: (H, W) uint8 ground truth (0..C-1, 255 void);
    ``band``:  (H, W) bool trimap band; optional, read only by the ``trimap_miou`` objective (computed from
    ``label`` with ``crf.trimap.trimap_band`` when absent).

A search input file is therefore also a CRF input file. The file stem is the image id. The writers here
write atomically (``crf.atomic``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_bytes

__all__ = ["CRF_INPUT_KEYS", "SEARCH_INPUT_KEYS", "array_shape", "load_arrays", "load_crf_input", "load_search_input",
           "write_crf_input", "write_search_input"]

#: Keys of a CRF input file.
CRF_INPUT_KEYS = ("image", "probs")
#: Required keys of a search input file (``band`` is optional).
SEARCH_INPUT_KEYS = ("image", "probs", "label")
#: Number of dimensions and kind of every known key.
_EXPECT = {"image": (3, None), "probs": (3, "float"), "label": (2, None), "band": (2, None)}


def load_arrays(path: str | os.PathLike, keys: Sequence[str], kind: str = "CRF input file",
                optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Load the arrays ``keys`` (and those of ``optional`` that the file has) of an ``.npz`` file.

    Args:
        path: the file.
        keys: the keys that must be there.
        kind: what the messages call the file (``"CRF input file"``, ``"search input file"``).
        optional: keys loaded when present.

    Returns:
        dict key -> array, loaded into memory (the file is closed).

    Raises:
        FileNotFoundError: the file does not exist (named).
        ValueError: the file is not a readable ``.npz`` or lacks a key (file and key named), or
            ``image`` / ``probs`` / ``label`` / ``band`` have the wrong dtype or number of dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ValueError(f"{kind} {path} lacks key(s) {missing}; it has {sorted(z.files)}")
            arrays = {k: z[k] for k in (*keys, *(k for k in optional if k in z.files))}
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError on a truncated file
        raise ValueError(f"{kind} {path} is not a readable .npz: {exc}") from exc
    for k, a in arrays.items():
        if k in _EXPECT:
            ndim, dtype_kind = _EXPECT[k]
            if a.ndim != ndim:
                raise ValueError(f"{kind} {path}: key {k!r} must have {ndim} dimensions, got shape {a.shape}")
            if dtype_kind == "float" and not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"{kind} {path}: key {k!r} must be float16/float32, got dtype {a.dtype}")
    if "label" in arrays and arrays["label"].dtype != np.uint8:
        raise ValueError(f"{kind} {path}: key 'label' must be uint8, got dtype {arrays['label'].dtype}")
    return arrays


def array_shape(path: str | os.PathLike, key: str) -> tuple[int, ...]:
    """The shape of array ``key`` of an ``.npz`` file, read from its header only (the data stays on disk):
    what ``backend: auto`` sizes the search by (``crf.backend_choice``).

    Raises:
        FileNotFoundError: the file does not exist. ValueError: not a readable ``.npz`` or no such key
            (file and key named).
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if f"{key}.npy" not in names:
                raise ValueError(f"{path} lacks key {key!r}; it has {sorted(n[:-4] for n in names)}")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, _ = read(f)
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError on a truncated file
        raise ValueError(f"{path} is not a readable .npz: {exc}") from exc
    return tuple(int(x) for x in shape)


def load_crf_input(path: str | os.PathLike, keys: Sequence[str] = CRF_INPUT_KEYS) -> dict[str, np.ndarray]:
    """Load a CRF input file (``image``, ``probs``; see the module docstring), or its arrays ``keys``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_arrays`.
    """
    return load_arrays(path, keys, "CRF input file")


def load_search_input(path: str | os.PathLike, band: bool = False) -> dict[str, np.ndarray]:
    """Load a search input file: ``image``, ``probs``, ``label`` and, with ``band``, the ``band`` if the
    file has one (one opening of the file).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_arrays`; ValueError also for a ``label`` or ``band``
            whose (H, W) differs from the image's.
    """
    kind = "search input file"
    arrays = load_arrays(path, SEARCH_INPUT_KEYS, kind, optional=("band",) if band else ())
    hw = arrays["image"].shape[:2]
    if arrays["label"].shape != hw:
        raise ValueError(f"{kind} {path}: label shape {arrays['label'].shape} differs from image (H, W) {hw}")
    if "band" in arrays and arrays["band"].shape != hw:
        raise ValueError(f"{kind} {path}: band shape {arrays['band'].shape} differs from label shape {hw}")
    return arrays


def _write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_crf_input(path: str | os.PathLike, image: np.ndarray, probs: np.ndarray) -> None:
    """Write a CRF input file atomically (arrays stored as given: ``probs`` float16 halves the file)."""
    _write_npz(path, {"image": np.ascontiguousarray(image), "probs": probs})


def write_search_input(path: str | os.PathLike, image: np.ndarray, probs: np.ndarray, label: np.ndarray,
                       band: np.ndarray | None = None) -> None:
    """Write a search input file atomically (``band`` only when given)."""
    arrays = {"image": np.ascontiguousarray(image), "probs": probs, "label": label}
    if band is not None:
        arrays["band"] = band
    _write_npz(path, arrays)
