"""The ``crf_search`` stage: the paper's cross-validation of the CRF's bilateral term on cached scores.

Source: DeepLab v1 Sec. 5 ("we fix w2 = 3 and sigma_gamma = 3 and search for the best values of w1,
sigma_alpha and sigma_beta by cross-validation on a small subset of the validation set (we use 100
images)... coarse-to-fine search scheme"). The release drew the images at random with a fixed seed.

The stage never runs the network: it reads the test stage's cached scores, upsamples them and turns them
into probabilities ONCE per image (a sample file per image: image, probabilities, label and, for the trimap
objective, the band), then hands the files to ``crf.search.run_search``, which evaluates every
configuration on every image (on all cores; across machines with torchrun) and appends each finished
configuration to ``results.jsonl`` so that a killed search resumes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.io import read_image, read_label
from .atomic import atomic_write_bytes, atomic_write_text
from .engine.inference import ScoreMap
from .evaluation.trimap import trimap_band

if TYPE_CHECKING:  # pragma: no cover
    from .runner import Runner


def choose_subset(ids: list[str], count: int, seed: int) -> list[str]:
    """``count`` ids drawn without replacement with a fixed seed, in list order (all if fewer)."""
    if count >= len(ids):
        return list(ids)
    pick = np.random.default_rng(seed).choice(len(ids), size=count, replace=False)
    return [ids[i] for i in sorted(pick)]


def write_search_sample(path: Path, image_path: Path, label_path: Path, scores_path: Path, num_classes: int,
                        trimap_width: int | None) -> None:
    """One sample file (``.npz``): ``image`` (H, W, 3) uint8 RGB, ``probs`` (C, H, W) float16 (softmax of the
    upsampled scores), ``label`` (H, W) uint8 and, if ``trimap_width`` is given, ``band`` (H, W) bool."""
    image = read_image(image_path)[:, :, ::-1]
    label = read_label(label_path, num_classes)
    probs = torch.softmax(ScoreMap.load(scores_path).upsampled(), 0).numpy().astype(np.float16)
    arrays = {"image": np.ascontiguousarray(image), "probs": probs, "label": label}
    if trimap_width is not None:
        arrays["band"] = trimap_band(label, trimap_width)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def run_crf_search(runner: "Runner") -> dict:
    """Run the search stage of ``runner``'s experiment; returns the details for the stage record.

    Raises:
        StageError: the test stage's scores are missing.
    """
    from crf.search import SearchConfig, run_search

    from .runner import StageError

    cfg = runner.cfg
    s = cfg.crf_search
    if not s.enabled:
        runner.log.info("crf_search.enabled is false: search skipped")
        return {"skipped": True}
    out = runner.dir / "crf_search"
    samples = {x.id: x for x in runner.test_samples()}
    ids = choose_subset(list(samples), s.num_images, s.seed)
    atomic_write_text(out / "images.txt", "\n".join(ids) + "\n")
    files = []
    width = s.trimap_width if s.objective == "trimap_miou" else None
    for i in ids:
        scores = runner.dir / "scores" / f"{i}.npz"
        if not scores.is_file():
            raise StageError(f"crf_search: no cached scores for {i} ({scores}); run the test stage first")
        f = out / "samples" / f"{i}.npz"
        if not f.is_file():
            write_search_sample(f, samples[i].image, samples[i].label, scores, cfg.model.num_classes, width)
        files.append(f)
    search_cfg = SearchConfig(
        w1=list(s.w1), sigma_alpha=list(s.sigma_alpha), sigma_beta=list(s.sigma_beta), w2=s.w2,
        sigma_gamma=s.sigma_gamma, iterations=s.iterations, rounds=s.rounds, shrink=s.shrink,
        objective=s.objective, trimap_width=s.trimap_width, backend=s.backend, device=s.device, workers=s.workers,
        label="" if cfg.test.score_source == "network" else "DIAGNOSTIC degraded-ground-truth scores, not a network",
    )
    source = "" if cfg.test.score_source == "network" else " on DIAGNOSTIC degraded-GT scores"
    runner.log.info(f"crf_search: {len(ids)} images, objective {s.objective}{source}")
    result = run_search(files, out, search_cfg, progress=runner.progress)
    best = result.best.to_dict() if hasattr(result.best, "to_dict") else dict(result.best)
    return {"images": len(ids), "best": best, "objective": s.objective, "best_objective": getattr(result, "best_objective", None)}
