"""Every image and label of a list checked before the first long stage: decodable, label values in
0..num_classes-1 or 255, label of its image's size. In threads (OpenCV and PIL decode without the GIL), and
remembered by file size and mtime in a cache file so that a 10,582-image list is checked once.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from crf.pool import available_cores
from tqdm import tqdm

from ..atomic import atomic_write_json
from .io import IGNORE_LABEL, DataError, read_image, read_label
from .lists import Sample

#: Problems shown in one error (the rest are counted).
MAX_LISTED = 20


def _stamp(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _check_one(sample: Sample, num_classes: int) -> Optional[str]:
    """None if the sample is fine, else one line naming the file and the problem."""
    try:
        image = read_image(sample.image)
        if sample.label is not None:
            label = read_label(sample.label, num_classes, sample.label_map)
            if label.shape != image.shape[:2]:
                return (f"{sample.label}: label size {label.shape[0]}x{label.shape[1]} differs from its image "
                        f"{sample.image} ({image.shape[0]}x{image.shape[1]}, H x W)")
    except DataError as exc:
        return str(exc)
    return None


def check_samples(samples: Sequence[Sample], num_classes: int, *, cache: Optional[Path] = None,
                  workers: Optional[int] = None, progress: bool = True) -> int:
    """Check every sample; returns how many were read (the rest were known good from ``cache``).

    Args:
        samples: image (+ label) paths.
        num_classes: labels must hold 0..num_classes-1 or 255.
        cache: a JSON file of the samples found good, by path and size:mtime (read and updated).
        workers: threads (default: the cores).

    Raises:
        DataError: every problem found, one line each (at most ``MAX_LISTED`` shown, the rest counted).
    """
    known: dict[str, str] = {}
    if cache is not None and Path(cache).is_file():
        try:
            known = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            known = {}
    key_of = {}
    todo = []
    for s in samples:
        key = f"{s.image}|{s.label}|{num_classes}"
        stamp = f"{_stamp(s.image)}|{_stamp(s.label)}"
        key_of[id(s)] = (key, stamp)
        if known.get(key) != stamp:
            todo.append(s)
    with ThreadPoolExecutor(workers or available_cores()) as pool:
        results = list(tqdm(pool.map(lambda s: _check_one(s, num_classes), todo), total=len(todo),
                            desc="check data", disable=not progress or not todo, dynamic_ncols=True))
    problems = [r for r in results if r is not None]
    for s, r in zip(todo, results):
        if r is None:
            known[key_of[id(s)][0]] = key_of[id(s)][1]
    if cache is not None and todo:
        atomic_write_json(Path(cache), known)
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} of {len(samples)} samples cannot be used:\n  {shown}{more}")
    return len(todo)


def check_void_band(samples: Sequence[Sample], num_classes: int, *, key: str = "data.trimap_band") -> None:
    """The ``void`` trimap band needs void outlines: some label of ``samples`` must hold a 255 (ignored)
    pixel, else every band is empty (issue #23). Reads labels until the first with one (VOC: the first).

    Raises:
        DataError: no labelled sample holds a void pixel; the message names ``key`` and the way out.
    """
    labelled = [s for s in samples if s.label is not None]
    for s in labelled:
        if (read_label(s.label, num_classes, s.label_map) == IGNORE_LABEL).any():
            return
    if labelled:
        raise DataError(f"{key}: void (the band around void outlines, the release's) but none of the {len(labelled)} "
                        f"test labels holds a void ({IGNORE_LABEL} / data.ignore_index) pixel, so every trimap band "
                        f"would be empty; set {key}: boundary (the band around label changes)")
