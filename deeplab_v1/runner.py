"""The experiment runner: it only sequences the stages (``deeplab_v1.stages``), train -> test ->
crf_search -> crf -> evaluate, which are decoupled through the files of the run layout
(``deeplab_v1.layout``).

A stage that finds its completion record (``stages/<stage>.json``) is skipped, so a rerun resumes; ``redo``
reruns named stages and the stages after them (``redo_only`` the named stages alone). Within a stage,
finished per-image files are kept, so a killed test or CRF stage continues where it stopped.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Optional

import yaml

from . import config as config_mod
from .atomic import atomic_write_text
from .config import ExperimentConfig
from .context import RunContext, StageError
from .data.lists import Sample
from .layout import STAGES
from .stages import STAGE_RUNNERS

__all__ = ["Runner", "StageError"]


class Runner:
    """Runs the stages of one experiment.

    Args:
        cfg: a validated experiment (``config.load_config``).
        progress: show tqdm bars.
        redo: stages to run again even if done; the stages after them rerun too.
        redo_only: stages to run again even if done, alone (``deeplab train|test|... --redo``).

    Raises:
        StageError: an unknown stage name, or ``device: cuda`` without CUDA.
    """

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True, redo: Iterable[str] = (),
                 redo_only: Iterable[str] = ()) -> None:
        self.redo, self.redo_only = set(redo), set(redo_only)
        unknown = (self.redo | self.redo_only) - set(STAGES)
        if unknown:
            raise StageError(f"--redo: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
        self.ctx = RunContext.create(cfg, progress=progress)
        self.cfg, self.layout, self.log = cfg, self.ctx.layout, self.ctx.log
        self.dir = self.layout.root

    def test_samples(self) -> list[Sample]:
        """The experiment's test list (see ``RunContext.test_samples``)."""
        return self.ctx.test_samples()

    def check_inputs(self) -> None:
        """Validate the data lists (every file present) before any long work."""
        if "train" in self.cfg.stages and self.cfg.train.iterations > 0:
            self.ctx.train_samples()
        if any(s in self.cfg.stages for s in ("test", "crf", "evaluate", "crf_search")):
            self.ctx.test_samples()

    def run(self, stages: Optional[list[str]] = None) -> dict:
        """Run ``stages`` (default: the config's), skipping finished ones. Returns the metrics (or {}).

        Raises:
            StageError: an unknown stage, or what a stage raises.
        """
        stages = stages or list(self.cfg.stages)
        for s in stages:
            if s not in STAGES:
                raise StageError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
        self.check_inputs()
        atomic_write_text(self.layout.config, yaml.safe_dump(config_mod.to_dict(self.cfg), sort_keys=False))
        cleared = set(self.redo_only)
        if self.redo:
            cleared |= set(STAGES[min(STAGES.index(s) for s in self.redo):])
        for s in cleared:
            if self.layout.is_done(s):
                self.layout.clear(s)
        t_all = time.perf_counter()
        for stage in STAGES:
            if stage not in stages:
                continue
            if self.layout.is_done(stage):
                self.log.info(f"stage {stage}: done already (skipped; --redo {stage} to rerun)")
                continue
            self.log.info(f"stage {stage}: start")
            t0 = time.perf_counter()
            details = STAGE_RUNNERS[stage](self.ctx) or {}
            seconds = time.perf_counter() - t0
            self.layout.write_record(stage, seconds, details)
            self.log.info(f"stage {stage}: finished in {seconds:.1f} s")
        metrics = {}
        if self.layout.metrics.is_file():
            metrics = json.loads(self.layout.metrics.read_text())
            summary = ", ".join(
                f"{k} mIoU {metrics[k]['miou'] * 100:.2f}" for k in ("dcnn", "crf") if k in metrics and metrics[k]
            )
            self.log.info(f"run {self.cfg.name}: {summary} ({time.perf_counter() - t_all:.1f} s); report: {self.layout.report}")
        return metrics
