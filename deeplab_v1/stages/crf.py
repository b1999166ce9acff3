"""The ``crf`` stage: the fully connected CRF (paper Sec. 4.2) on every test image's cached scores.

Reads: ``scores/<id>.npz`` (score cache), the test images, ``crf_search/best.json`` (when
``crf.use_search``) and ``crf_search/learned.json`` (when also ``crf.use_learned`` and the search fitted a CRF,
``crf_search.learn``: its kernel weights and ``C x C`` label compatibility, run by both backends, issue #24).
Writes: ``predictions/crf/<id>.png`` (VOC palette) and ``predictions/crf/.backend.json``
(the backend the images were made with). Runs through ``crf.parallel.run_crf_many``: on CPU one
single-threaded process per core; with ``crf.device: cuda`` in this process, batches of images through the
torch backend within ``crf.memory_mb``.

``crf.backend: auto`` is resolved ONCE, before any work, from the configuration and the images' sizes
(``crf.parallel.run_backend``: torch when the largest image fits ``crf.memory_mb``, or a fixed 4096 MiB
when unset; never this machine's memory), and every image runs in that backend. Its outputs differ from the
other backend's in the last bits, so a resumed stage never mixes the two (issue #20 item 6): images made by
another backend (``.backend.json``) are redone. The record names the backend that ran and its device.
Finished images are kept. The stage runs on rank 0 alone (``distributed.DISTRIBUTED_STAGES``).
"""

from __future__ import annotations

import functools

import json
from pathlib import Path
from typing import Optional

import numpy as np

from crf import CRFParams
from crf.backend_choice import BackendChoice
from crf.inputs import check_backend
from crf.parallel import CRFTask, run_backend, run_crf_many

from ..atomic import atomic_write_json
from ..context import RunContext, StageError
from ..data.io import read_image, write_label
from ..data.layouts import png_palette
from ..engine.inference import ScoreMap

#: The file in ``predictions/crf/`` that names the backend and device its images were made with.
BACKEND_FILE = ".backend.json"


def crf_inputs(task: CRFTask) -> tuple[np.ndarray, np.ndarray]:
    """A CRF worker's inputs (``task.inputs`` names the score cache): the image (BGR file -> RGB for the bilateral kernel) and the softmax of the
    cached scores upsampled as Caffe's INTERP does."""
    image = read_image(task.image)[:, :, ::-1].copy()
    probs = ScoreMap.load(Path(task.inputs)).probabilities()
    return image, probs


def crf_params(ctx: RunContext) -> tuple[CRFParams, str, Optional[np.ndarray]]:
    """The CRF parameters, where they come from and the label compatibility (None: Potts): the search's fitted
    CRF (``crf.use_search``, ``crf.use_learned`` and a ``learned.json``), else its best (``crf.use_search`` and
    a finished search), else ``crf.params``.

    Raises:
        StageError: a ``learned.json`` that cannot be read.
    """
    c = ctx.cfg.crf
    try:
        learned = ctx.layout.learned_crf() if c.use_search and c.use_learned else None
    except ValueError as exc:
        raise StageError(f"crf: {exc}") from exc
    if learned is not None:
        return learned[0], f"crf_search learned ({ctx.layout.learned.name})", learned[1]
    best = ctx.layout.best_params() if c.use_search else None
    if best is not None:
        return best, "crf_search best", None
    return c.params, "config", None


def crf_backend(ctx: RunContext, caches: list[Path]) -> BackendChoice:
    """The backend every image of the stage runs in: ``crf.backend`` with ``auto`` resolved once from the
    configuration (``crf.memory_mb``, ``crf.device``) and the (C, H, W) sizes of the upsampled scores (read
    from the score caches' headers).

    Raises:
        StageError: a score cache that cannot be read (named).
    """
    c = ctx.cfg.crf
    shapes = []
    if c.backend == "auto":
        for cache in caches:
            try:
                with np.load(cache, allow_pickle=False) as z:
                    shapes.append((ctx.cfg.model.num_classes, int(z["height"]), int(z["width"])))
            except (OSError, ValueError, KeyError) as exc:
                why = (f"no {exc} in it" if isinstance(exc, KeyError) else
                       "not an .npz archive" if "pickle" in str(exc) else str(exc))  # numpy's hint must not be followed
                raise StageError(f"crf: score cache {cache} is unreadable ({why}); run the test stage again "
                                 "(--redo test)") from exc
    return run_backend(c.backend, c.device, shapes, memory_mb=c.memory_mb)


def _same_backend_only(ctx: RunContext, choice: BackendChoice) -> None:
    """Redo the images another backend made: a resumed stage never mixes backends."""
    folder = ctx.layout.predictions("crf")
    marker = folder / BACKEND_FILE
    ran = {"backend": choice.backend, "device": choice.device}
    old = None
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = {}
    made = sorted(folder.glob("*.png"))
    if made and old != ran:
        what = f"backend {old.get('backend')} on {old.get('device')}" if old else "an unrecorded backend"
        ctx.log.info(f"crf: {len(made)} images made by {what}, not {choice.backend} on {choice.device}: "
                     "redoing them (the backends differ in the last bits)")
        for f in made:
            f.unlink()
    if old != ran:
        atomic_write_json(marker, ran)


def run(ctx: RunContext) -> dict:
    """Run the CRF on every test image; returns the stage record's details.

    Raises:
        StageError: an image has no cached scores (the test stage did not run).
        CRFInputError: a backend and device that do not go together (``pydensecrf`` on ``cuda``).
    """
    if not ctx.cfg.crf.enabled:
        ctx.log.info("crf.enabled is false: CRF skipped")
        return {"skipped": True}
    check_backend(ctx.cfg.crf.backend, ctx.cfg.crf.device)  # before any work: a one-line error, exit 2
    samples = ctx.test_samples()
    params, origin, compatibility = crf_params(ctx)
    ctx.layout.predictions("crf").mkdir(parents=True, exist_ok=True)
    tasks = []
    for s in samples:
        cache = ctx.layout.score_cache(s.id)
        if not cache.is_file():
            raise StageError(f"crf: no cached scores for {s.id} ({cache}); run the test stage first")
        tasks.append(CRFTask(str(cache), str(ctx.layout.prediction("crf", s.id)), image=str(s.image)))
    c = ctx.cfg.crf
    colours = png_palette(ctx.cfg.data)  # the dataset's colours (None: VOC's)
    choice = crf_backend(ctx, [Path(t.inputs) for t in tasks])
    _same_backend_only(ctx, choice)
    ctx.log.info(f"crf: {len(tasks)} images, params {params.to_dict()} from {origin}, backend {choice.backend} "
                 f"on {choice.device} ({choice.reason})")
    summary = run_crf_many(
        tasks, params, workers=c.workers, backend=choice.backend, device=choice.device, progress=ctx.progress,
        load=crf_inputs, write=write_label if colours is None else functools.partial(write_label, palette=colours),
        memory_mb=c.memory_mb, compatibility=compatibility,
    )
    mean = summary.crf_seconds / summary.done if summary.done else 0.0
    ctx.log.info(summary.line())
    return {"params": params.to_dict(), "params_from": origin, "learned": compatibility is not None,
            "images": len(samples), "seconds_per_image": mean, "backend": choice.backend, "device": choice.device,
            "backend_requested": c.backend, "backend_reason": choice.reason, "backends": summary.backends,
            "layout": summary.layout}
