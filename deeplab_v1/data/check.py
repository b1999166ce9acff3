"""Every image and label of a list checked before the first long stage: decodable, label values in
0..num_classes-1 or 255, label of its image's size. In threads (OpenCV and PIL decode without the GIL), and
remembered by file size and mtime in a cache file so that a 10,582-image list is checked once.

Under torchrun every rank checks its share of the images not yet known good and the verdicts are gathered
(issue #20): no rank waits in a collective while another checks the whole list, so a long first check of a
10,582-image list does not run into the collective timeout.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

from ..atomic import atomic_write_json
from ..process import available_cores
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
                  workers: Optional[int] = None, progress: bool = True, rank: int = 0, world: int = 1,
                  gather: Optional[Callable[[Any], list]] = None) -> int:
    """Check every sample; returns how many were read by this process (the rest were known good from
    ``cache``, or checked by other ranks).

    Args:
        samples: image (+ label) paths.
        num_classes: labels must hold 0..num_classes-1 or 255.
        cache: a JSON file of the samples found good, by path and size:mtime (read by every rank, updated
            by rank 0).
        workers: threads (default: the cores).
        rank, world: this process's share of the samples to check: every ``world``-th from ``rank``.
        gather: with ``world`` > 1, a collective that returns every rank's picklable value, in rank order
            (``torch.distributed.all_gather_object``); every rank reaches it after its own share only.

    Raises:
        DataError: every problem found (on every rank alike), one line each (at most ``MAX_LISTED``
            shown, the rest counted).
    """
    known: dict[str, str] = {}
    if cache is not None and Path(cache).is_file():
        try:
            known = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            known = {}
    keys = {}
    todo = []
    for i, s in enumerate(samples):
        key = f"{s.image}|{s.label}|{num_classes}" + (f"|{s.label_map}" if s.label_map else "")
        keys[i] = (key, f"{_stamp(s.image)}|{_stamp(s.label)}")
        if known.get(key) != keys[i][1]:
            todo.append(i)
    if world > 1 and gather is None:
        raise ValueError("check_samples: world > 1 needs a gather collective")
    mine = todo[rank::world] if world > 1 else todo
    failure: Optional[BaseException] = None
    try:
        with ThreadPoolExecutor(workers or available_cores()) as pool:
            results = list(tqdm(pool.map(lambda i: _check_one(samples[i], num_classes), mine), total=len(mine),
                                desc="check data", disable=not progress or not mine, dynamic_ncols=True))
        verdicts: Any = dict(zip(mine, results))
    except Exception as exc:  # handed to the other ranks, which are waiting in the gather
        failure, verdicts = exc, f"{type(exc).__name__}: {exc}"
    if world > 1:
        parts = gather(verdicts)  # type: ignore[misc]
        if failure is None:
            for r, part in enumerate(parts):
                if isinstance(part, str):
                    raise DataError(f"the data check failed on rank {r}: {part}")
        verdicts = {i: v for part in parts if isinstance(part, dict) for i, v in part.items()}
    if failure is not None:
        raise failure
    problems = [verdicts[i] for i in todo if verdicts.get(i) is not None]
    for i in todo:
        if i in verdicts and verdicts[i] is None:
            known[keys[i][0]] = keys[i][1]
    if cache is not None and todo and rank == 0:
        atomic_write_json(Path(cache), known)
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} of {len(samples)} samples cannot be used:\n  {shown}{more}")
    return len(mine)


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
