"""What every stage is handed: the experiment, its run folder, the log, the device and the progress switch.

A stage is a function ``run(ctx: RunContext) -> dict`` (``deeplab_v1.stages``); it reads and writes files
through ``ctx.layout`` only, and returns the details of its completion record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

from .config import ExperimentConfig
from .data.layouts import dataset_samples
from .data.lists import Sample
from .distributed import DistInfo, init_from_env
from .errors import DeepLabError
from .layout import RunLayout
from .process import configure_process


class StageError(DeepLabError, RuntimeError):
    """A stage cannot run (a missing artifact of an earlier stage, say); the message says which."""


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def run_logger(layout: RunLayout, rank: int = 0) -> logging.Logger:
    """The run's logger: ``run.log`` in the run folder (time-stamped) and the console (``[deeplab] ...``).
    Ranks other than 0 of a distributed run write no file and print warnings only (``[deeplab rank r]``)."""
    if rank != 0:
        logger = logging.getLogger(f"deeplab.run.{layout.root}.rank{rank}")
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        if not logger.handlers:
            sh = _TqdmHandler()
            sh.setFormatter(logging.Formatter(f"[deeplab rank {rank}] %(message)s"))
            logger.addHandler(sh)
        return logger
    logger = logging.getLogger(f"deeplab.run.{layout.root}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        fh = logging.FileHandler(layout.log, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(fh)
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("[deeplab] %(message)s"))
        logger.addHandler(sh)
    return logger


@dataclass
class RunContext:
    """One run: ``cfg`` (validated experiment), ``layout`` (its folder), ``log``, ``device``, ``progress``,
    ``dist`` (this process's rank in a torchrun job, ``deeplab_v1.distributed``; rank 0 of 1 alone).

    Raises (``create``):
        StageError: ``device: cuda`` without CUDA.
    """

    cfg: ExperimentConfig
    layout: RunLayout
    log: logging.Logger
    device: torch.device
    progress: bool = True
    dist: DistInfo = field(default_factory=DistInfo)
    _test: Optional[list[Sample]] = field(default=None, init=False, repr=False)
    _train: Optional[list[Sample]] = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, cfg: ExperimentConfig, *, progress: bool = True) -> "RunContext":
        """The context of ``cfg``'s run folder (created), with its logger."""
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise StageError("device: cuda was asked for but CUDA is not available")
        info = init_from_env(cfg.device, uses_cuda="cuda" in (cfg.crf.device, cfg.crf_search.search.device))  # torchrun's group
        layout = RunLayout(cfg.run_dir).ensure()
        device = torch.device("cuda", info.local_rank) if cfg.device == "cuda" and info.active else torch.device(cfg.device)
        log = run_logger(layout, info.rank)
        configure_process(log.info)  # the run decides the process-wide settings, once, logged
        return cls(cfg, layout, log, device, progress and info.is_main, info)

    def test_samples(self) -> list[Sample]:
        """The test list (labels required when they are evaluated or feed the degraded-GT scores); read
        once per run, the runner's up-front check and every stage share it."""
        if self._test is None:
            c = self.cfg.data
            need_labels = "evaluate" in self.cfg.stages or self.cfg.test.score_source != "network"
            samples = dataset_samples(c, c.test_list, require_labels=need_labels)
            self._test = samples[: c.max_test_images] if c.max_test_images else samples
        return list(self._test)

    def train_samples(self) -> list[Sample]:
        """The training list (labels required); read once per run."""
        if self._train is None:
            c = self.cfg.data
            samples = dataset_samples(c, c.train_list, require_labels=True)
            self._train = samples[: c.max_train_images] if c.max_train_images else samples
        return list(self._train)
