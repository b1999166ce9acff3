"""The run folder: every path a run writes, and the few file formats the stages share, in one place.

Layout of ``<output_dir>`` (stage that writes -> stages that read)::

    config.yaml              resolved configuration              runner -> (user)
    run.log                  the log                             every stage
    .lock                    the writer's host and pid (flock) runner
    .data_check.json         images/labels found good (size:mtime) runner
    stages/<stage>.json      completion records (+ fingerprint)  runner -> runner, report
    stages/<stage>.started.json the fingerprint of a stage under way runner
    checkpoints/iter_<N>.pth resumable training state            train -> train
    checkpoints/final.pth    the trained weights                 train -> test
    tensorboard/             loss, lr, predictions (train.tensorboard) train -> (user)
    scores/<id>.npz          score cache (``ScoreMap``): the test net's scores
                                                                 test -> crf_search, crf
    predictions/dcnn/<id>.png arg-max of the upsampled scores    test -> evaluate
    predictions/crf/<id>.png  after the fully connected CRF      crf -> evaluate
    crf_search/images.txt    the search's image ids              crf_search
    crf_search/samples/<id>.npz search input files (image, probs, label[, band])
                                                                 crf_search -> crf_search
    crf_search/results.jsonl, ranked.md, heatmap.png, best.json  crf_search -> crf, report
    crf_search/learned.json  the fitted CRF (crf_search.learn)   crf_search -> crf, report, predict
    metrics.json trimap.json trimap.png                          evaluate -> report
    report.md                                                    report
    figures/<name>.{png,pdf,svg} qualitative (paper Fig. 4), crf_search heatmap, trimap report

``best.json`` is written by ``crf.search.run_search``; ``RunLayout.best_params`` is its one reader.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from crf import CRFParams

from .atomic import atomic_write_json
from .config import STAGES

#: What each stage writes (relative folders and files), cleared when the stage is redone (evaluate's too,
#: so that a redone or failed evaluation never leaves the numbers of an earlier one: issue #20).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "train": ("checkpoints", "tensorboard"),
    "test": ("scores", "predictions/dcnn"),
    "crf_search": ("crf_search",),
    "crf": ("predictions/crf",),
    "evaluate": ("metrics.json", "trimap.json", "trimap.png", "report.md", "figures"),
}


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (module docstring). ``root`` is created by ``ensure``."""

    root: Path

    def ensure(self) -> "RunLayout":
        """Create the run folder; returns self."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------------------ files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def lock(self) -> Path:
        """``.lock``: held (flock) by the process writing the run folder; names its host and pid."""
        return self.root / ".lock"

    @property
    def data_check(self) -> Path:
        """``.data_check.json``: the images and labels found good, by size and mtime."""
        return self.root / ".data_check.json"

    def record(self, stage: str) -> Path:
        """``stages/<stage>.json``: the stage's completion record."""
        return self.root / "stages" / f"{stage}.json"

    def started(self, stage: str) -> Path:
        """``stages/<stage>.started.json``: the fingerprint of a stage that has started, not finished."""
        return self.root / "stages" / f"{stage}.started.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``: the SummaryWriter's event files (``train.tensorboard``)."""
        return self.root / "tensorboard"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / "final.pth"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    def score_cache(self, image_id: str) -> Path:
        """``scores/<id>.npz``: the test net's scores of one image (``engine.inference.ScoreMap``)."""
        return self.scores / f"{image_id}.npz"

    def predictions(self, method: str) -> Path:
        """``predictions/<method>/`` for ``dcnn`` or ``crf``."""
        return self.root / "predictions" / method

    def prediction(self, method: str, image_id: str) -> Path:
        return self.predictions(method) / f"{image_id}.png"

    @property
    def crf_search(self) -> Path:
        return self.root / "crf_search"

    def search_input(self, image_id: str) -> Path:
        """``crf_search/samples/<id>.npz``: a search input file (image, probs, label[, band])."""
        return self.crf_search / "samples" / f"{image_id}.npz"

    @property
    def search_images(self) -> Path:
        return self.crf_search / "images.txt"

    @property
    def best(self) -> Path:
        return self.crf_search / "best.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def trimap(self) -> Path:
        return self.root / "trimap.json"

    @property
    def trimap_plot(self) -> Path:
        return self.root / "trimap.png"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    # ---------------------------------------------------------------------------------------- records
    def write_record(self, stage: str, seconds: float, details: dict) -> None:
        """Write ``stages/<stage>.json`` atomically: ``{"stage", "seconds", **details}``."""
        atomic_write_json(self.record(stage), {"stage": stage, "seconds": round(seconds, 3), **details})

    def read_record(self, stage: str) -> Optional[dict]:
        """The stage's completion record, or None when it has not finished."""
        p = self.record(stage)
        return json.loads(p.read_text()) if p.is_file() else None

    def stage_seconds(self) -> dict[str, float]:
        """Seconds of every finished stage, in pipeline order."""
        return {s: rec["seconds"] for s in STAGES if (rec := self.read_record(s)) is not None}

    def clear(self, stage: str) -> None:
        """Forget a stage: its record and everything it wrote (``STAGE_OUTPUTS``)."""
        self.record(stage).unlink(missing_ok=True)
        self.clear_outputs(stage)

    def clear_outputs(self, stage: str) -> None:
        """Remove everything ``stage`` writes (``STAGE_OUTPUTS``: folders and files), not its record."""
        for rel in STAGE_OUTPUTS[stage]:
            p = self.root / rel
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def missing_outputs(self, stage: str, ids: list[str]) -> list[Path]:
        """The per-image outputs of a finished ``stage`` that are gone (``test``: score caches and DCNN
        predictions; ``crf``: CRF predictions, unless its record says it was skipped), for the image ``ids``.
        Other stages: []."""
        if stage == "test":
            return [p for i in ids for p in (self.score_cache(i), self.prediction("dcnn", i)) if not p.is_file()]
        if stage == "crf" and not (self.read_record("crf") or {}).get("skipped"):
            return [p for i in ids if not (p := self.prediction("crf", i)).is_file()]
        return []

    # ------------------------------------------------------------------------------------- best.json
    def read_best(self) -> Optional[dict]:
        """``crf_search/best.json`` as written by ``crf.search.run_search`` (the parameters at the top
        level, with ``objective``, ``objective_name``, ``images``, ``configurations``), or None."""
        return json.loads(self.best.read_text()) if self.best.is_file() else None

    def best_params(self) -> Optional[CRFParams]:
        """The search's best CRF parameters, or None when there is no finished search."""
        best = self.read_best()
        return None if best is None else CRFParams.from_dict(
            {k: best[k] for k in ("w1", "sigma_alpha", "sigma_beta", "w2", "sigma_gamma", "iterations")})

    # ------------------------------------------------------------------------------------- learned.json
    @property
    def learned(self) -> Path:
        """``crf_search/learned.json``: the CRF the search fitted (``crf_search.learn``, issue #24)."""
        return self.crf_search / "learned.json"

    def read_learned(self) -> Optional[dict]:
        """``learned.json`` as the crf_search stage writes it (the fitted ``params``, the ``C x C``
        ``compatibility``, the objective, the held-out scores), or None when there is none.

        Raises:
            ValueError: a file that is not a learned CRF (not JSON, no valid params or compatibility); named.
        """
        if not self.learned.is_file():
            return None
        try:
            record = json.loads(self.learned.read_text(encoding="utf-8"))
            CRFParams.from_dict(record["params"])
            mu = np.asarray(record["compatibility"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.learned}: not a learned CRF ({exc}); run the crf_search stage again "
                             "(--redo crf_search)") from exc
        if mu.ndim != 2 or mu.shape[0] != mu.shape[1]:
            raise ValueError(f"{self.learned}: the compatibility must be a C x C matrix, got shape {mu.shape}")
        return record

    def learned_crf(self) -> Optional[tuple[CRFParams, np.ndarray]]:
        """The fitted CRF: (parameters, ``(C, C)`` float32 compatibility, densecrf's convention), or None.

        Raises:
            ValueError: as :meth:`read_learned`.
        """
        record = self.read_learned()
        if record is None:
            return None
        return CRFParams.from_dict(record["params"]), np.asarray(record["compatibility"], dtype=np.float32)
