"""The ``crf_search`` stage: the paper's cross-validation of the CRF's bilateral term on cached scores.

Source: DeepLab v1 Sec. 5 ("we fix w2 = 3 and sigma_gamma = 3 and search for the best values of w1,
sigma_alpha and sigma_beta by cross-validation on a small subset of the validation set (we use 100
images)... coarse-to-fine search scheme"). The release drew the images at random with a fixed seed.

The stage never runs the network: it reads the test stage's score cache, upsamples the scores and turns
them into probabilities ONCE per image (a search input file per image: image, probabilities, label and,
for the trimap objective, the band), then hands the files to ``crf.search.run_search``, which evaluates
every configuration on every image (on all cores; across machines with torchrun) and appends each
finished configuration to ``results.jsonl`` so that a killed search resumes. ``crf_search.strategy:
halving`` scores the configurations on growing shares of the images (successive halving); ``backend:
auto`` (the default) runs the torch backend where it fits its memory budget; the record names both, and the
device. Under torchrun every rank takes part: the stage hands its ranks to the search explicitly, on one gloo
group (the default group when it is gloo, else one made for the stage and destroyed at its end), and rank 0
decides the search's plan for all (``crf.search.plan``). The result (best parameters, objective, CRF runs)
goes to ``run.log`` and the console, with ``--no-progress`` too.

Reads: ``scores/<id>.npz``, the test images and labels. Writes: ``crf_search/images.txt``,
``crf_search/samples/<id>.npz`` (search input files), and through ``run_search`` ``results.jsonl``,
``ranked.md``, ``heatmap.png``, ``best.json``.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from crf.input_files import write_search_input
from crf.search import Distributed, run_search
from crf.trimap import trimap_band

from ..atomic import atomic_write_text
from ..context import RunContext, StageError
from ..data.io import read_image, read_label
from ..data.lists import choose_subset
from ..engine.inference import ScoreMap


def make_search_input(path: Path, image_path: Path, label_path: Path, scores_path: Path, num_classes: int,
                      trimap_width: int | None, *, band_kind: str = "void", label_map: str | None = None) -> None:
    """One search input file (``crf.input_files.write_search_input``): ``image`` (H, W, 3) uint8 RGB,
    ``probs`` (C, H, W) float16 (softmax of the upsampled scores), ``label`` (H, W) uint8 (read through
    ``label_map``, ``data.io.label_lut``) and, if ``trimap_width`` is given, ``band`` (H, W) bool: the
    ``crf.trimap`` band of kind ``band_kind`` (``data.trimap_band``)."""
    image = read_image(image_path)[:, :, ::-1]
    label = read_label(label_path, num_classes, label_map)
    probs = ScoreMap.load(scores_path).probabilities().astype(np.float16)
    band = trimap_band(label, trimap_width, band=band_kind) if trimap_width is not None else None
    write_search_input(path, image, probs, label, band)


@contextmanager
def search_ranks(ctx: RunContext) -> Iterator[Distributed]:
    """The ranks of the run as the search's :class:`crf.search.Distributed`: one gloo group for the whole
    search -- the default group when it is gloo, else a gloo group made here once (the confusion matrices are
    CPU tensors, which NCCL cannot reduce) and destroyed on leaving (issue #20 items 8, 9). One process: the
    single process."""
    info = ctx.dist
    if not info.active:
        yield Distributed()
        return
    from crf.search.cli import gloo_ranks

    with gloo_ranks(info.rank, info.world, info.local_world) as ranks:
        yield ranks


def run(ctx: RunContext) -> dict:
    """Run the search; returns the stage record's details.

    Raises:
        StageError: the test stage's scores are missing.
    """
    cfg = ctx.cfg
    s = cfg.crf_search
    if not s.enabled:
        ctx.log.info("crf_search.enabled is false: search skipped")
        return {"skipped": True}
    search = s.search
    samples = {x.id: x for x in ctx.test_samples()}
    ids = choose_subset(list(samples), s.num_images, s.seed)
    atomic_write_text(ctx.layout.search_images, "\n".join(ids) + "\n")
    files = []
    width = search.trimap_width if search.objective == "trimap_miou" else None
    for i in ids:
        scores = ctx.layout.score_cache(i)
        if not scores.is_file():
            raise StageError(f"crf_search: no cached scores for {i} ({scores}); run the test stage first")
        f = ctx.layout.search_input(i)
        if not f.is_file():
            make_search_input(f, samples[i].image, samples[i].label, scores, cfg.model.num_classes, width,
                              band_kind=cfg.data.trimap_band, label_map=samples[i].label_map)
        files.append(f)
    diagnostic = cfg.test.score_source != "network"
    search = dataclasses.replace(
        search, label="DIAGNOSTIC degraded-ground-truth scores, not a network" if diagnostic else "")
    ctx.log.info(f"crf_search: {len(ids)} images, objective {search.objective}"
                 f"{' on DIAGNOSTIC degraded-GT scores' if diagnostic else ''}")
    with search_ranks(ctx) as ranks:
        result = run_search(files, ctx.layout.crf_search, search, progress=ctx.progress, dist=ranks,
                            log=ctx.log.info)
    best = ctx.layout.crf_search / "best.json"
    record = json.loads(best.read_text()) if ctx.dist.is_main else {}
    return {"images": len(ids), "best": result.best.to_dict(), "objective": search.objective,
            "best_objective": result.best_objective, "backend": result.backend,
            "backend_reason": result.backend_reason, "device": record.get("device"),
            "inputs_digest": record.get("inputs_digest"), "strategy": result.strategy,
            "crf_runs": result.crf_runs_total}
