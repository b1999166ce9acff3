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

``crf_search.learn`` (issue #24 item 2; default ``[]``, the paper's grid alone) then fits the listed CRF
parameters (``w1``, ``w2``, the ``C x C`` compatibility) by gradient from the search's best, on the same search
input files (``crf.fit_crf``: cross-entropy of the mean-field Q to the labels, mini-batches of images, early stop
on a held-out quarter of them; rank 0), scores no CRF / the grid's best / the fitted CRF on the held-out share
(``crf.learn.score_crfs``) and writes ``learned.json``, which the crf stage and ``deeplab predict`` apply
(``crf.use_learned``). A rerun whose fit inputs (the files' digest, the start, ``learn``, the settings) match
the file's does not refit.

Reads: ``scores/<id>.npz``, the test images and labels. Writes: ``crf_search/images.txt``,
``crf_search/samples/<id>.npz`` (search input files), and through ``run_search`` ``results.jsonl``,
``ranked.md``, ``heatmap.png``, ``best.json``; with ``learn``, ``learned.json``.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from crf import CRFParams
from crf.input_files import load_search_input, write_search_input
from crf.search import Distributed, run_search
from crf.search.plan import inputs_digest
from crf.trimap import trimap_band

from ..atomic import atomic_write_json, atomic_write_text
from ..context import RunContext, StageError
from ..data.io import read_image, read_label
from ..data.lists import choose_subset
from ..distributed import on_main
from ..engine.inference import ScoreMap

#: ``crf.fit_crf``'s settings in the stage: epochs at most, images per step, the held-out share (early stop),
#: epochs without a held-out gain before stopping, Adam's learning rate.
FIT_SETTINGS = {"epochs": 10, "batch": 4, "held_out": 0.25, "patience": 2, "lr": 0.05}
#: The trimap width (pixels) of the held-out comparison when the search's objective has none.
COMPARE_TRIMAP_WIDTH = 5


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
    learned = {"learned": on_main(lambda: fit_learned(ctx, ids, files, result.best, result.backend))} if s.learn else {}
    return {**learned, "images": len(ids), "best": result.best.to_dict(), "objective": search.objective,
            "best_objective": result.best_objective, "backend": result.backend,
            "backend_reason": result.backend_reason, "device": record.get("device"),
            "inputs_digest": record.get("inputs_digest"), "strategy": result.strategy,
            "crf_runs": result.crf_runs_total}


# ------------------------------------------------------------------------------------------ learned.json
def fit_learned(ctx: RunContext, ids: list[str], files: list[Path], best: CRFParams, backend: str) -> dict:
    """Fit ``crf_search.learn`` from the search's ``best`` on the search input ``files`` and write
    ``learned.json`` atomically; reuse the file when its fit inputs are these. Returns the record's summary.

    ``learned.json``: ``learn``, ``params`` (the fitted CRFParams: ``w1``/``w2`` learned or the best's), the
    ``compatibility`` (``C x C``, densecrf's convention: ``-I`` is Potts), ``grid_best`` (the start),
    ``objective`` (mean cross-entropy per labelled pixel before/after on the fit and held-out shares),
    ``held_out_scores`` (``crf.learn.score_crfs``: mIoU, pixel accuracy and trimap mIoU of no CRF, the grid's
    best and the learned CRF on the held-out images, all images when there is no held-out share), ``fit``
    (``FitResult.to_dict``: history, epochs, settings), ``fit_inputs`` (what a rerun compares) and ``scores``
    (what the scores are).
    """
    from crf.learn import fit_crf, score_crfs

    cfg, layout = ctx.cfg, ctx.layout
    search = cfg.crf_search.search
    learn = list(dict.fromkeys(cfg.crf_search.learn))
    device = search.device
    held_out = FIT_SETTINGS["held_out"] if len(files) >= 2 else 0.0
    settings = {**FIT_SETTINGS, "held_out": held_out, "seed": cfg.crf_search.seed}
    key = {"learn": learn, "start": best.to_dict(), "inputs_digest": inputs_digest(files), "images": ids,
           "settings": settings, "device": device, "backend": backend, "band": cfg.data.trimap_band}
    try:
        old = layout.read_learned()
    except ValueError:  # a damaged file: refitted
        old = None
    if old is not None and old.get("fit_inputs") == key:
        ctx.log.info(f"crf_search: {layout.learned} holds the fit of these inputs: reused, not refitted")
        return _learned_summary(old, reused=True)
    arrays = [load_search_input(f) for f in files]
    images, probs, labels = ([a[k] for a in arrays] for k in ("image", "probs", "label"))
    ctx.log.info(f"crf_search: fitting {learn} from the best {best.to_dict()} on {len(files)} images "
                 f"({held_out:.0%} held out), {best.iterations} mean-field iterations, on {device}")
    result = fit_crf(images, probs, labels, best, learn=learn, device=device, **settings,
                     progress=lambda e: ctx.log.info(f"crf_search: fit epoch {e['epoch']}: mini-batch loss "
                                                     f"{e['fit_batch_loss']:.4f}, held-out {e['held_out']}"))
    shown = result.held_out_images or result.fit_images
    mu = np.asarray(result.compatibility)
    width = search.trimap_width if search.objective == "trimap_miou" else COMPARE_TRIMAP_WIDTH
    scores = score_crfs([images[i] for i in shown], [probs[i] for i in shown], [labels[i] for i in shown],
                        {"no_crf": None, "grid_best": (best, None), "learned": (result.params, mu)},
                        trimap_width=width, band=cfg.data.trimap_band, backend=backend, device=device)
    scores["share"] = "held_out" if result.held_out_images else "fit (no held-out share)"
    record = {"learn": learn, "params": result.params.to_dict(), "compatibility": result.compatibility,
              "grid_best": best.to_dict(), "objective": result.objective, "held_out_scores": scores,
              "fit": result.to_dict(), "fit_inputs": key,
              "scores": "DIAGNOSTIC degraded-ground-truth scores" if cfg.test.score_source != "network" else "network"}
    atomic_write_json(layout.learned, record)
    shown_miou = " / ".join(f"{100 * scores[k]['miou']:.2f}" for k in ("no_crf", "grid_best", "learned"))
    ctx.log.info(f"crf_search: learned w1 {best.w1:g} -> {result.params.w1:.4g}, w2 {best.w2:g} -> "
                 f"{result.params.w2:.4g} in {result.seconds:.0f} s; {scores['share']} mIoU no CRF / grid best / "
                 f"learned: {shown_miou} %")
    return _learned_summary(record, reused=False)


def _learned_summary(record: dict, reused: bool) -> dict:
    """What the stage record says of the fit."""
    return {"learn": record["learn"], "params": record["params"], "objective": record["objective"],
            "held_out_miou": {k: record["held_out_scores"][k]["miou"] for k in ("no_crf", "grid_best", "learned")},
            "reused": reused}
