"""Run the fully connected CRF over many images in worker processes, resumably.

The CRF is decoupled from the network through files: the caller stores, once per image, a sample file
(``.npz``) with the image and the DCNN's class probabilities (already upsampled to the image and
softmaxed), and describes each job as a :class:`CRFTask` (sample file -> output label file). Workers load
their own inputs from the files, so a task is a few bytes to pickle and the pool works with the
``spawn`` start method (and on any platform). Outputs are written atomically (temporary file in the same
folder, then ``os.replace``) and a task whose output already exists is skipped, so a killed run resumes
where it stopped.

Sample file keys (the contract shared with ``crf.search``):
    ``image``: (H, W, 3) uint8 RGB 0..255.
    ``probs``: (C, H, W) float16 or float32 probabilities, summing to 1 over C.
    ``label``: (H, W) uint8 ground truth (0..C-1, 255 void); read only by the search.
    ``band``:  (H, W) bool trimap band; optional, read only by the search's trimap objective.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .dense import _check_device, dense_crf
from .params import CRFParams

__all__ = ["CRFTask", "CRFRunSummary", "load_sample", "write_label_atomic", "run_crf_many"]


@dataclass(frozen=True)
class CRFTask:
    """One CRF job: read ``sample`` (``.npz``, keys ``image`` and ``probs``), write ``out``.

    ``out`` ending in ``.png`` gets the argmax label map as an 8-bit single-channel PNG; ending in
    ``.npy`` an (H, W) uint8 array. Paths are strings or ``Path``; the task is picklable. ``image`` is
    for callers whose own ``load`` hook (see :func:`run_crf_many`) reads the image from a file of its
    own, ``sample`` then naming whatever holds their scores.
    """

    sample: str | os.PathLike
    out: str | os.PathLike
    image: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        suffix = Path(self.out).suffix.lower()
        if suffix not in (".png", ".npy"):
            raise ValueError(f"CRFTask.out must end in .png or .npy, got {str(self.out)!r}")


@dataclass(frozen=True)
class CRFRunSummary:
    """What :func:`run_crf_many` did: ``done`` tasks computed, ``skipped`` (output already there),
    ``seconds`` wall time of the whole run, ``crf_seconds`` the sum over tasks of one CRF's time (so
    ``crf_seconds / done`` is the time of one CRF in one worker)."""

    done: int
    skipped: int
    seconds: float
    crf_seconds: float

    def line(self) -> str:
        per = self.crf_seconds / self.done if self.done else 0.0
        return (f"crf: {self.done} images done, {self.skipped} skipped (already there), "
                f"{self.seconds:.1f} s wall, {per:.2f} s per CRF per worker")


def load_sample(path: str | os.PathLike, keys: Sequence[str] = ("image", "probs")) -> dict[str, np.ndarray]:
    """Load the arrays ``keys`` of a sample file (see the module docstring for the keys).

    Returns:
        dict key -> array, loaded into memory (the file is closed).

    Raises:
        FileNotFoundError: the file does not exist (named).
        ValueError: the file is not a readable ``.npz`` or lacks a key (file and key named), or
            ``image`` / ``probs`` / ``label`` / ``band`` have the wrong dtype or number of dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ValueError(f"sample file {path} lacks key(s) {missing}; it has {sorted(z.files)}")
            arrays = {k: z[k] for k in keys}
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError on a truncated file
        raise ValueError(f"sample file {path} is not a readable .npz: {exc}") from exc
    expect = {"image": (3, None), "probs": (3, "float"), "label": (2, None), "band": (2, None)}
    for k, a in arrays.items():
        if k in expect:
            ndim, kind = expect[k]
            if a.ndim != ndim:
                raise ValueError(f"sample file {path}: key {k!r} must have {ndim} dimensions, got shape {a.shape}")
            if kind == "float" and not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"sample file {path}: key {k!r} must be float16/float32, got dtype {a.dtype}")
    if "label" in arrays and arrays["label"].dtype != np.uint8:
        raise ValueError(f"sample file {path}: key 'label' must be uint8, got dtype {arrays['label'].dtype}")
    return arrays


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_label_atomic(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an (H, W) label map atomically as 8-bit PNG (``.png``) or uint8 ``.npy``.

    Raises:
        ValueError: ``label`` is not 2-D, holds values outside 0..255, or ``path`` has another suffix.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must be in 0..255 for {path}, got {label.min()}..{label.max()}")
    label = label.astype(np.uint8, copy=False)
    buf = io.BytesIO()
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        Image.fromarray(label, mode="L").save(buf, format="PNG")
    elif suffix == ".npy":
        np.save(buf, label)
    else:
        raise ValueError(f"label output {path} must end in .png or .npy")
    _atomic_write_bytes(path, buf.getvalue())


#: ``load(task) -> (image (H, W, 3) uint8 RGB, probs (C, H, W) float)``: a module-level function, so that
#: spawned workers can unpickle it.
LoadFn = Callable[[CRFTask], "tuple[np.ndarray, np.ndarray]"]
#: ``write(path, label (H, W) uint8)``: writes the result atomically.
WriteFn = Callable[[Path, np.ndarray], None]


def _load_npz(task: CRFTask) -> tuple[np.ndarray, np.ndarray]:
    arrays = load_sample(task.sample)
    return arrays["image"], arrays["probs"]


def _run_task(task: CRFTask, params: CRFParams, backend: str, device: str,
              load: Optional[LoadFn] = None, write: Optional[WriteFn] = None) -> float:
    """Run one task in the current process; returns the CRF's seconds."""
    try:
        image, probs = (load or _load_npz)(task)
        t0 = time.perf_counter()
        q = dense_crf(image, probs, params, backend=backend, device=device)
        seconds = time.perf_counter() - t0
        if q.shape[0] > 256:
            raise ValueError(f"{q.shape[0]} classes do not fit a uint8 label map")
        (write or write_label_atomic)(Path(task.out), q.argmax(axis=0).astype(np.uint8))
        return seconds
    except Exception as exc:
        raise RuntimeError(f"CRF task {task.sample} -> {task.out} failed: {exc}") from exc


def _worker_init(threads: int, backend: str) -> None:
    # N processes x M threads must not exceed the cores: torch (torch backend) would otherwise take all
    # cores in every worker. pydensecrf itself is single-threaded. The variable is set before this
    # fresh (spawned) process imports torch, so torch's OpenMP runtime honours it too.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)


def resolve_workers(workers: int | None) -> int:
    """``None`` -> ``os.cpu_count()``; otherwise an integer >= 1 (ValueError names a bad value)."""
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be None or an integer >= 1, got {workers!r}")
    return workers


def make_executor(workers: int, backend: str) -> ProcessPoolExecutor:
    """A ``spawn`` process pool whose workers use ``cpu_count // workers`` threads each."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads, backend))


def run_crf_many(tasks: Iterable[CRFTask], params: CRFParams, *, workers: int | None = None,
                 backend: str = "pydensecrf", device: str = "cpu", progress: bool = True,
                 load: Optional[LoadFn] = None, write: Optional[WriteFn] = None) -> CRFRunSummary:
    """Run the CRF on every task, in parallel over images, skipping tasks whose output exists.

    Args:
        tasks: :class:`CRFTask` items (sample ``.npz`` -> label ``.png``/``.npy``).
        params: the CRF parameters, the same for every image.
        workers: worker processes (``spawn``); ``None`` -> ``os.cpu_count()``; ``1`` runs in this process.
        backend, device: as for :func:`crf.dense.dense_crf`.
        progress: show a tqdm bar and print the summary line.
        load: reads a task's inputs (default: the ``.npz`` sample file); ``write``: writes its label map
            (default: :func:`write_label_atomic`). Both must be module-level functions (they are pickled to
            the workers); callers with their own file formats (cached scores, palette PNGs) pass them.

    Returns:
        A :class:`CRFRunSummary` (done, skipped, wall seconds, summed CRF seconds).

    Raises:
        ValueError: bad ``workers``/``backend``/``device``, or a task that is not a ``CRFTask``.
        RuntimeError: a task failed; the message names its sample and output files. Outputs of the
            tasks finished before stay on disk, so a rerun resumes.
    """
    _check_device(backend, device)
    if not isinstance(params, CRFParams):
        raise ValueError(f"params must be a crf.CRFParams, got {type(params).__name__}")
    workers = resolve_workers(workers)
    tasks = list(tasks)
    for t in tasks:
        if not isinstance(t, CRFTask):
            raise ValueError(f"tasks must be crf.parallel.CRFTask items, got {type(t).__name__}: {t!r}")
    todo = [t for t in tasks if not Path(t.out).is_file()]
    skipped = len(tasks) - len(todo)
    from tqdm import tqdm

    t0 = time.perf_counter()
    crf_seconds = 0.0
    bar = tqdm(total=len(todo), desc="crf", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(todo) <= 1:
            for t in todo:
                crf_seconds += _run_task(t, params, backend, device, load, write)
                bar.update()
        else:
            with make_executor(min(workers, len(todo)), backend) as ex:
                futures = [ex.submit(_run_task, t, params, backend, device, load, write) for t in todo]
                try:
                    for fut in as_completed(futures):
                        crf_seconds += fut.result()
                        bar.update()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    summary = CRFRunSummary(done=len(todo), skipped=skipped, seconds=time.perf_counter() - t0, crf_seconds=crf_seconds)
    if progress:
        tqdm.write(summary.line())
    return summary
