"""Run the fully connected CRF over many images in worker processes, resumably.

The CRF is decoupled from the network through files: the caller stores, once per image, a CRF input file
(``.npz`` with the image and the DCNN's class probabilities, already upsampled to the image and softmaxed;
see ``crf.input_files``), and describes each job as a :class:`CRFTask` (CRF input file -> output label
file). Workers load their own inputs from the files, so a task is a few bytes to pickle and the pool
(``crf.pool``) works with the ``spawn`` start method (and on any platform). Outputs are written atomically
(``crf.atomic``: temporary file in the same folder, then ``os.replace``) and a task whose output already
exists is skipped, so a killed run resumes where it stopped. Callers with files of their own (the network's
score cache) pass a ``load`` hook instead.
"""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .dense import dense_crf
from .input_files import load_crf_input
from .backend_choice import MAX_DEFAULT_MEMORY_MB, BackendChoice, resolve_backend
from .inputs import check_backend, check_inputs
from .params import CRFParams
from .pool import default_workers, make_executor, resolve_workers, worker_threads
from .errors import CRFInputError, CRFTaskError

__all__ = ["CRFTask", "CRFRunSummary", "load_crf_input", "write_label_atomic", "run_crf_many",
           "resolve_workers", "make_executor", "run_backend"]

def run_backend(backend: str, device: str, shapes: Iterable[Sequence[int]], *, memory_mb: float | None = None,
                configs: int = 1) -> BackendChoice:
    """The one backend of a whole run (every image of the crf stage, every rank of a search), resolved ONCE
    before any work from the configuration and the input shapes only (issue #20 item 6).

    ``"auto"`` gives torch when the largest input fits ``memory_mb`` -- or, when that is None, the fixed
    :data:`crf.backend_choice.MAX_DEFAULT_MEMORY_MB`, never this machine's or this process's free memory --
    and pydensecrf otherwise (``crf.backend_choice.resolve_backend``). The same configuration and inputs
    thus give the same backend on any machine, rank or resume, so results of the two backends (which
    differ in the last bits) are never mixed. An explicit backend is returned as it is.

    Args:
        backend, device: as for :func:`crf.dense.dense_crf`.
        shapes: the (C, H, W) shapes of every input of the run.
        memory_mb: the configured budget, MiB (None: :data:`MAX_DEFAULT_MEMORY_MB`).
        configs: configurations per call (the search's lattice group; 1 for one configuration).

    Returns:
        A :class:`crf.backend_choice.BackendChoice` (backend, device, reason, the budget it was made for).

    Raises:
        CRFInputError (a ValueError): a bad backend, device or budget.
    """
    budget = MAX_DEFAULT_MEMORY_MB if memory_mb is None else memory_mb
    choice = resolve_backend(backend, device, shapes, memory_mb=budget, configs=configs)
    if backend == "auto" and memory_mb is None:
        choice = BackendChoice(choice.backend, choice.device, f"{choice.reason}; the fixed default budget, "
                               "never this machine's memory (memory_mb sets another)", choice.memory_mb)
    return choice


@dataclass(frozen=True)
class CRFTask:
    """One CRF job: read ``inputs`` (a CRF input file, ``.npz`` with keys ``image`` and ``probs``), write
    ``out``.

    ``out`` ending in ``.png`` gets the argmax label map as an 8-bit single-channel PNG; ending in
    ``.npy`` an (H, W) uint8 array. Paths are strings or ``Path``; the task is picklable. ``image`` is
    for callers whose own ``load`` hook (see :func:`run_crf_many`) reads the image from a file of its
    own, ``inputs`` then naming whatever holds their scores.

    Raises:
        CRFInputError: ``out`` ends in neither ``.png`` nor ``.npy``.
    """

    inputs: str | os.PathLike
    out: str | os.PathLike
    image: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        suffix = Path(self.out).suffix.lower()
        if suffix not in (".png", ".npy"):
            raise CRFInputError(f"CRFTask.out must end in .png or .npy, got {str(self.out)!r}")


@dataclass(frozen=True)
class CRFRunSummary:
    """What :func:`run_crf_many` did: ``done`` tasks computed, ``skipped`` (output already there),
    ``seconds`` wall time of the whole run, ``crf_seconds`` the sum over tasks of one CRF's time (so
    ``crf_seconds / done`` is the time of one CRF in one worker; in-process batches share theirs among
    their images), ``backends`` the images each backend ran (``{"torch": 10}``) and ``layout`` how the
    work ran (``"4 processes x 1 thread"``, ``"in-process batches on cuda"``)."""

    done: int
    skipped: int
    seconds: float
    crf_seconds: float
    backends: dict = field(default_factory=dict)
    layout: str = ""

    def line(self) -> str:
        per = self.crf_seconds / self.done if self.done else 0.0
        used = ", ".join(f"{k} {v}" for k, v in sorted(self.backends.items())) or "none"
        return (f"crf: {self.done} images done, {self.skipped} skipped (already there), "
                f"{self.seconds:.1f} s wall, {per:.2f} s per CRF per worker; backends: {used}; {self.layout}")


def write_label_atomic(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an (H, W) label map atomically as 8-bit PNG (``.png``) or uint8 ``.npy``.

    Raises:
        CRFInputError (a ValueError): ``label`` is not 2-D, holds values outside 0..255, or ``path`` has another suffix.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise CRFInputError(f"label must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise CRFInputError(f"label values must be in 0..255 for {path}, got {label.min()}..{label.max()}")
    label = label.astype(np.uint8, copy=False)
    buf = io.BytesIO()
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        Image.fromarray(label, mode="L").save(buf, format="PNG")
    elif suffix == ".npy":
        np.save(buf, label)
    else:
        raise CRFInputError(f"label output {path} must end in .png or .npy")
    atomic_write_bytes(path, buf.getvalue())


#: ``load(task) -> (image (H, W, 3) uint8 RGB, probs (C, H, W) float)``: a module-level function, so that
#: spawned workers can unpickle it.
LoadFn = Callable[[CRFTask], "tuple[np.ndarray, np.ndarray]"]
#: ``write(path, label (H, W) uint8)``: writes the result atomically.
WriteFn = Callable[[Path, np.ndarray], None]


def _load_crf_input(task: CRFTask) -> tuple[np.ndarray, np.ndarray]:
    arrays = load_crf_input(task.inputs)
    return arrays["image"], arrays["probs"]


def _write_labels(task: CRFTask, labels: np.ndarray, write: Optional[WriteFn]) -> None:
    if labels.max(initial=0) > 255:
        raise CRFInputError(f"label {int(labels.max())} does not fit a uint8 label map")
    (write or write_label_atomic)(Path(task.out), labels.astype(np.uint8))


def _run_task(task: CRFTask, params: CRFParams, backend: str, device: str,
              load: Optional[LoadFn] = None, write: Optional[WriteFn] = None,
              memory_mb: float | None = None, compatibility: Optional[np.ndarray] = None) -> tuple[float, str]:
    """Run one task in the current process; returns the CRF's seconds and the backend that ran
    (``"auto"`` is resolved on this image's size, ``crf.backend_choice``)."""
    try:
        image, probs = (load or _load_crf_input)(task)
        image, probs = check_inputs(image, probs)
        choice = resolve_backend(backend, device, [probs.shape], memory_mb=memory_mb)
        t0 = time.perf_counter()
        q = dense_crf(image, probs, params, backend=choice.backend, device=choice.device, memory_mb=choice.memory_mb,
                      compatibility=compatibility)
        seconds = time.perf_counter() - t0
        if q.shape[0] > 256:
            raise CRFInputError(f"{q.shape[0]} classes do not fit a uint8 label map")
        _write_labels(task, q.argmax(axis=0), write)
        return seconds, choice.backend
    except Exception as exc:
        raise CRFTaskError(f"CRF task {task.inputs} -> {task.out} failed: {exc}") from exc


def _run_in_process(todo: list[CRFTask], params: CRFParams, backend: str, device: str, load: Optional[LoadFn],
                    write: Optional[WriteFn], memory_mb: float | None, bar,
                    compatibility: Optional[np.ndarray] = None) -> tuple[float, dict]:
    """The GPU path (issue #13 item 6), also taken on CPU with one worker: this process alone runs every
    image; images the torch backend takes run in batches (their lattices as segments of one lattice,
    ``dense_crf_torch_batch``) whose estimated memory stays within the budget; the next inputs are read
    by two threads while a batch runs. Returns (CRF seconds, images per backend)."""
    from concurrent.futures import ThreadPoolExecutor

    from .backend_choice import default_memory_mb, torch_memory_mb

    budget = float(memory_mb) if memory_mb is not None else default_memory_mb(device)
    loader = load or _load_crf_input
    counts: dict[str, int] = {}
    crf_seconds = 0.0
    batch: list[tuple[CRFTask, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal crf_seconds
        if not batch:
            return
        from .torch_backend import dense_crf_torch_batch

        t0 = time.perf_counter()
        try:
            labels = dense_crf_torch_batch([b[1] for b in batch], [b[2] for b in batch], params, device=device,
                                           memory_mb=budget, labels_only=True)
        except Exception as exc:
            names = ", ".join(str(b[0].inputs) for b in batch[:3])
            raise CRFTaskError(f"CRF batch of {len(batch)} images ({names}, ...) failed: {exc}") from exc
        crf_seconds += time.perf_counter() - t0
        for (task, _, _), lab in zip(batch, labels):
            try:
                _write_labels(task, lab, write)
            except Exception as exc:
                raise CRFTaskError(f"CRF task {task.inputs} -> {task.out} failed: {exc}") from exc
        counts["torch"] = counts.get("torch", 0) + len(batch)
        bar.update(len(batch))
        batch.clear()

    def read(task: CRFTask):
        try:
            return check_inputs(*loader(task))
        except Exception as exc:
            raise CRFTaskError(f"CRF task {task.inputs} -> {task.out} failed: {exc}") from exc

    with ThreadPoolExecutor(2) as pool:
        inputs = [pool.submit(read, t) for t in todo[:2]]
        for i, task in enumerate(todo):
            if i + 2 < len(todo):
                inputs.append(pool.submit(read, todo[i + 2]))
            image, probs = inputs[i].result()
            inputs[i] = None  # type: ignore[call-overload]  # free the arrays once used
            choice = resolve_backend(backend, device, [probs.shape], memory_mb=budget)
            if choice.backend != "torch" or compatibility is not None:  # a matrix compatibility: one at a time
                seconds, used = _run_task(task, params, choice.backend, choice.device, lambda _t: (image, probs),
                                          write, compatibility=compatibility)
                crf_seconds += seconds
                counts[used] = counts.get(used, 0) + 1
                bar.update()
                continue
            pixels = sum(b[2].shape[1] * b[2].shape[2] for b in batch) + probs.shape[1] * probs.shape[2]
            if batch and (torch_memory_mb(pixels, probs.shape[0]) > budget or not device.startswith("cuda")):
                flush()  # batches on CUDA only: on CPU one image per call was faster
            batch.append((task, image, probs))
        flush()
    return crf_seconds, counts


def run_crf_many(tasks: Iterable[CRFTask], params: CRFParams, *, workers: int | None = None,
                 backend: str = "pydensecrf", device: str = "cpu", progress: bool = True,
                 load: Optional[LoadFn] = None, write: Optional[WriteFn] = None,
                 memory_mb: float | None = None, compatibility: Optional[np.ndarray] = None) -> CRFRunSummary:
    """Run the CRF on every task, in parallel over images, skipping tasks whose output exists.

    Layouts: ``workers`` processes of one thread each, or this process alone. With a CUDA ``device``
    (torch or auto), or one worker and the torch backend, this process runs every image itself (on CUDA in
    batches, ``dense_crf_torch_batch``, bounded by ``memory_mb``; on CPU one image at a time with every
    core's threads): one GPU-owning process and no CPU pool. ``workers=None`` takes
    :func:`crf.pool.default_workers`: one process per core on CPU (``tools/bench_crf_search.py`` measures
    the layouts).

    Args:
        tasks: :class:`CRFTask` items (CRF input file ``.npz`` -> label ``.png``/``.npy``).
        params: the CRF parameters, the same for every image.
        workers: worker processes (``spawn``); ``None`` -> :func:`crf.pool.default_workers`; ``1`` runs in
            this process.
        backend, device: as for :func:`crf.dense.dense_crf` (``"auto"``: per image, torch when it fits
            ``memory_mb``, else pydensecrf; ``summary.backends`` counts which ran).
        progress: show a tqdm bar and print the summary line.
        load: reads a task's inputs (default: the CRF input file); ``write``: writes its label map
            (default: :func:`write_label_atomic`). Both must be module-level functions (they are pickled to
            the workers); callers with their own file formats (cached scores, palette PNGs) pass them.
        memory_mb: the torch backend's budget per process (MiB); None: ``crf.backend_choice.default_memory_mb``.
        compatibility: a ``(C, C)`` label compatibility for every image (``crf.dense.dense_crf``'s; a fitted
            one, ``crf.fit_crf``); None: Potts.

    Returns:
        A :class:`CRFRunSummary` (done, skipped, wall seconds, summed CRF seconds, backends, layout).

    Raises:
        CRFInputError (a ValueError): bad ``workers``/``backend``/``device``/``memory_mb``, or a task that
            is not a ``CRFTask``.
        CRFTaskError (a RuntimeError): a task failed; the message names its input and output files. Outputs of the
            tasks finished before stay on disk, so a rerun resumes.
    """
    check_backend(backend, device)
    resolve_backend(backend, device, [], memory_mb=memory_mb)  # checks memory_mb
    if not isinstance(params, CRFParams):
        raise CRFInputError(f"params must be a crf.CRFParams, got {type(params).__name__}")
    if workers is None:
        from .backend_choice import torch_available

        workers = default_workers(backend if torch_available() else "pydensecrf", device)[0]
    workers = resolve_workers(workers)
    tasks = list(tasks)
    for t in tasks:
        if not isinstance(t, CRFTask):
            raise CRFInputError(f"tasks must be crf.parallel.CRFTask items, got {type(t).__name__}: {t!r}")
    todo = [t for t in tasks if not Path(t.out).is_file()]
    skipped = len(tasks) - len(todo)
    from tqdm import tqdm

    t0 = time.perf_counter()
    crf_seconds = 0.0
    counts: dict[str, int] = {}
    in_process = backend != "pydensecrf" and (device.startswith("cuda") or workers == 1)
    if in_process:
        layout = f"in-process batches on {device}" if device.startswith("cuda") else "in-process on cpu"
    elif workers == 1 or len(todo) <= 1:
        layout = "1 process (this one)"
    else:
        n = min(workers, len(todo))
        threads = worker_threads(n)
        layout = f"{n} processes x {threads} thread{'s' if threads > 1 else ''}"
    bar = tqdm(total=len(todo), desc="crf", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if in_process:
            crf_seconds, counts = _run_in_process(todo, params, backend, device, load, write, memory_mb, bar,
                                                  compatibility)
        elif workers == 1 or len(todo) <= 1:
            for t in todo:
                seconds, used = _run_task(t, params, backend, device, load, write, memory_mb, compatibility)
                crf_seconds += seconds
                counts[used] = counts.get(used, 0) + 1
                bar.update()
        else:
            with make_executor(min(workers, len(todo)), backend) as ex:
                futures = [ex.submit(_run_task, t, params, backend, device, load, write, memory_mb, compatibility)
                           for t in todo]
                try:
                    for fut in as_completed(futures):
                        seconds, used = fut.result()
                        crf_seconds += seconds
                        counts[used] = counts.get(used, 0) + 1
                        bar.update()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    summary = CRFRunSummary(done=len(todo), skipped=skipped, seconds=time.perf_counter() - t0,
                            crf_seconds=crf_seconds, backends=counts, layout=layout)
    if progress:
        tqdm.write(summary.line())
    return summary
