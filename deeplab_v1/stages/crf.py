"""The ``crf`` stage: the fully connected CRF (paper Sec. 4.2) on every test image's cached scores.

Reads: ``scores/<id>.npz`` (score cache), the test images, ``crf_search/best.json`` (when
``crf.use_search``). Writes: ``predictions/crf/<id>.png`` (VOC palette). Runs through
``crf.parallel.run_crf_many``: on CPU one single-threaded process per core; with ``crf.device: cuda``
in this process, batches of images through the torch backend within ``crf.memory_mb``. With
``crf.backend: auto`` each image runs in torch when it fits the budget, else in pydensecrf; the record
says how many images each backend ran. Finished images are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crf import CRFParams
from crf.inputs import check_backend
from crf.parallel import CRFTask, run_crf_many

from ..context import RunContext, StageError
from ..data.io import read_image, write_label
from ..engine.inference import ScoreMap


def crf_inputs(task: CRFTask) -> tuple[np.ndarray, np.ndarray]:
    """A CRF worker's inputs (``task.inputs`` names the score cache): the image (BGR file -> RGB for the bilateral kernel) and the softmax of the
    cached scores upsampled as Caffe's INTERP does."""
    image = read_image(task.image)[:, :, ::-1].copy()
    probs = torch.softmax(ScoreMap.load(Path(task.inputs)).upsampled(), 0).numpy()
    return image, probs


def crf_params(ctx: RunContext) -> tuple[CRFParams, str]:
    """The CRF parameters and where they come from: the search's best (``crf.use_search`` and a finished
    search) or ``crf.params``."""
    best = ctx.layout.best_params() if ctx.cfg.crf.use_search else None
    if best is not None:
        return best, "crf_search best"
    return ctx.cfg.crf.params, "config"


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
    params, origin = crf_params(ctx)
    ctx.layout.predictions("crf").mkdir(parents=True, exist_ok=True)
    tasks = []
    for s in samples:
        cache = ctx.layout.score_cache(s.id)
        if not cache.is_file():
            raise StageError(f"crf: no cached scores for {s.id} ({cache}); run the test stage first")
        tasks.append(CRFTask(str(cache), str(ctx.layout.prediction("crf", s.id)), image=str(s.image)))
    c = ctx.cfg.crf
    ctx.log.info(f"crf: {len(tasks)} images, params {params.to_dict()} from {origin}, backend {c.backend}, "
                 f"device {c.device}")
    summary = run_crf_many(
        tasks, params, workers=c.workers, backend=c.backend, device=c.device, progress=ctx.progress,
        load=crf_inputs, write=write_label, memory_mb=c.memory_mb,
    )
    mean = summary.crf_seconds / summary.done if summary.done else 0.0
    ctx.log.info(summary.line())
    return {"params": params.to_dict(), "params_from": origin, "images": len(samples), "seconds_per_image": mean,
            "backend": c.backend, "backends": summary.backends, "layout": summary.layout}
