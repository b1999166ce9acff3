"""The ``test`` stage: the test net on every test image (``engine.inference``), or the DIAGNOSTIC
degraded-GT scores (``test.score_source: degraded-gt``).

Reads: ``checkpoints/final.pth`` (or ``model.init``); the test list. Writes: ``scores/<id>.npz`` (the score
cache, ``ScoreMap``) and ``predictions/dcnn/<id>.png`` (arg-max of the upsampled scores, VOC palette).
Finished images are skipped, so a killed stage continues where it stopped.

How: loader workers read the images and pad them (``ViewDataset``), the network runs ``test.batch_size``
images per forward (exact: every image is padded to the same size), in ``test.precision``, and a
background writer compresses the score files and encodes the PNGs. Under torchrun each rank scores every
``world``-th image of the list (``distributed.shard``) and writes its own images' files: the split is a function
of the list, the rank and the world size alone (never of a rank's cores, load or memory, which set only its
loader workers), so every image is scored by exactly one rank whatever the machines (issue #20 item 1).
"""

from __future__ import annotations

import time

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..context import RunContext, StageError
from ..models import release_spec
from ..data.io import read_label, write_label
from ..data.layouts import png_palette
from ..data.lists import Sample
from ..data.loader import collate_list, loader_workers, loader_kwargs
from ..engine.inference import (BackgroundWriter, ScoreMap, ViewDataset, combine_views, forward_views,
                                label_from_scores, run_test_net, test_geometry)
from ..engine.precision import maybe_compile, set_tf32, to_memory_format
from .network import trained_model


def write_outputs(sm: ScoreMap, cache, png, palette=None) -> None:
    """One image's score cache and DCNN prediction (the arg-max of the float32 upsampled scores; a PNG
    coloured with ``palette``, ``data.layouts.palette``)."""
    sm.save(cache)
    write_label(png, label_from_scores(sm.upsampled()), palette)


def _finished(ctx: RunContext, s: Sample) -> bool:
    cache, png = ctx.layout.score_cache(s.id), ctx.layout.prediction("dcnn", s.id)
    if cache.is_file() and png.is_file():
        try:  # a cache is reused only when it reads back as one (a killed write, a foreign file: redone)
            ScoreMap.load(cache)
            return True
        except ValueError as exc:
            ctx.log.warning(f"warning: {exc}; recomputing it")
    return False


def _check(sm: ScoreMap, s: Sample) -> ScoreMap:
    if not np.isfinite(sm.scores).all():
        raise StageError(f"test: the network gave non-finite scores for {s.id}: the weights are broken (diverged training?)")
    return sm


def run(ctx: RunContext) -> dict:
    """Score every test image (this rank's share); returns the stage record's details.

    Raises:
        StageError: the network gave non-finite scores (broken weights).
    """
    samples = ctx.test_samples()
    t = ctx.cfg.test
    source = t.score_source
    layout = ctx.layout
    layout.scores.mkdir(parents=True, exist_ok=True)
    layout.predictions("dcnn").mkdir(parents=True, exist_ok=True)
    todo = [s for s in distributed.shard(samples, ctx.dist) if not _finished(ctx, s)]
    colours = png_palette(ctx.cfg.data)  # the dataset's colours (None: VOC's)
    size = t.size
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="test", disable=not ctx.progress, dynamic_ncols=True)
    with BackgroundWriter() as writer:
        if source == "network":
            set_tf32(ctx.cfg.tf32, ctx.device)
            model = to_memory_format(trained_model(ctx), t.channels_last)
            spec = release_spec(ctx.cfg.model.name)
            size = size or (spec.test_size if spec is not None else 513)
            net = maybe_compile(lambda x: run_test_net(model, x), t.compile)
            stride, offset = test_geometry(model)
            views = ViewDataset([s.image for s in todo], size=size, scales=t.scales, flip=t.flip,
                                multiple=int(getattr(model, "output_stride", 8)))
            workers = loader_workers(t.num_workers, ctx.dist.local_world) if todo else 0
            loader = DataLoader(views, batch_size=t.batch_size, collate_fn=collate_list,
                                **loader_kwargs(workers, ctx.device))
            for batch in loader:
                flat = [v for _, _, _, vs in batch for v in vs]
                scores = forward_views(model, flat, device=ctx.device, batch_size=len(flat),
                                       precision=t.precision, channels_last=t.channels_last, net=net)
                k = 0
                for index, h, w, vs in batch:
                    s = todo[index]
                    sm = _check(combine_views(vs, scores[k:k + len(vs)], h, w, stride, offset), s)
                    k += len(vs)
                    writer.submit(write_outputs, sm, layout.score_cache(s.id), layout.prediction("dcnn", s.id), colours)
                bar.update(len(batch))
            del loader
        else:
            from ..data.degraded import degraded_scores

            ctx.log.info("score source: DIAGNOSTIC degraded ground truth (no network is run)")
            for s in todo:
                label = read_label(s.label, ctx.cfg.model.num_classes, s.label_map)
                sc = degraded_scores(label, ctx.cfg.model.num_classes, seed=ctx.cfg.seed)
                sm = ScoreMap(sc, 8, label.shape[0], label.shape[1], source="degraded-gt")
                writer.submit(write_outputs, sm, layout.score_cache(s.id), layout.prediction("dcnn", s.id), colours)
                bar.update(1)
    bar.close()
    done = int(distributed.all_sum(len(todo)))
    seconds = time.perf_counter() - t0
    ctx.log.info(f"test: {done} images scored ({len(samples) - done} cached) in {seconds:.1f} s"
                 f"{f' on {ctx.dist.world} ranks' if ctx.dist.active else ''}")
    return {"images": len(samples), "computed": done, "score_source": source, "test_size": size}
