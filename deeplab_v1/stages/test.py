"""The ``test`` stage: the test net on every test image (``engine.inference.predict``), or the DIAGNOSTIC
degraded-GT scores (``test.score_source: degraded-gt``).

Reads: ``checkpoints/final.pth`` (or ``model.init``); the test list. Writes: ``scores/<id>.npz`` (the score
cache, ``ScoreMap``) and ``predictions/dcnn/<id>.png`` (arg-max of the upsampled scores, VOC palette).
Finished images are skipped, so a killed stage continues where it stopped.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from ..context import RunContext, StageError
from ..data.io import read_image, read_label, write_label
from ..engine.inference import ScoreMap, label_from_scores, predict
from .network import trained_model


def run(ctx: RunContext) -> dict:
    """Score every test image; returns the stage record's details.

    Raises:
        StageError: the network gave non-finite scores (broken weights).
    """
    samples = ctx.test_samples()
    source = ctx.cfg.test.score_source
    layout = ctx.layout
    layout.scores.mkdir(parents=True, exist_ok=True)
    layout.predictions("dcnn").mkdir(parents=True, exist_ok=True)
    model = None
    size = ctx.cfg.test.size
    if source == "network":
        model = trained_model(ctx)
        spec = ctx.v1_spec
        size = size or (spec.test_size if spec is not None else 513)
    else:
        from ..data.degraded import degraded_scores

        ctx.log.info("score source: DIAGNOSTIC degraded ground truth (no network is run)")
    done = 0
    t0 = time.perf_counter()
    for s in tqdm(samples, desc="test", disable=not ctx.progress, dynamic_ncols=True):
        cache, png = layout.score_cache(s.id), layout.prediction("dcnn", s.id)
        if cache.is_file() and png.is_file():
            try:  # a cache is reused only when it reads back as one (a killed write, a foreign file: redone)
                ScoreMap.load(cache)
                continue
            except ValueError as exc:
                ctx.log.info(f"warning: {exc}; recomputing it")
        image = read_image(s.image)
        if source == "network":
            with torch.no_grad():
                sm = predict(model, image, size=size, scales=ctx.cfg.test.scales, flip=ctx.cfg.test.flip,
                             device=ctx.device)
        else:
            label = read_label(s.label, ctx.cfg.model.num_classes)
            sc = degraded_scores(label, ctx.cfg.model.num_classes, seed=ctx.cfg.seed)
            sm = ScoreMap(sc, 8, label.shape[0], label.shape[1], source="degraded-gt")
        if not np.isfinite(sm.scores).all():
            raise StageError(f"test: the network gave non-finite scores for {s.id}: the weights are broken (diverged training?)")
        sm.save(cache)
        write_label(png, label_from_scores(sm.upsampled()))
        done += 1
    seconds = time.perf_counter() - t0
    ctx.log.info(f"test: {done} images scored ({len(samples) - done} cached) in {seconds:.1f} s")
    return {"images": len(samples), "computed": done, "score_source": source, "test_size": size}
