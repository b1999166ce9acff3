"""The experiment runner: it only sequences the stages (``deeplab_v1.stages``), train -> test ->
crf_search -> crf -> evaluate, which are decoupled through the files of the run layout
(``deeplab_v1.layout``).

A stage whose completion record (``stages/<stage>.json``) carries the fingerprint it would have now
(``deeplab_v1.fingerprints``: the config keys and files it depends on, and the stages before it) is
skipped, so a rerun resumes; a stage whose fingerprint changed is redone, and the log names the changed
keys. ``redo`` reruns named stages and the stages after them (``redo_only`` the named stages alone),
finished or not. Within a stage, finished per-image files are kept, so a killed test or CRF stage
continues where it stopped; a stage started under another fingerprint (``stages/<stage>.started.json``)
starts from scratch. One run folder has one writer at a time (``deeplab_v1.run_lock``: ``.lock``, held with
``flock``, names its host and pid; the lock of a dead process is taken over by exactly one of its
contenders). Under torchrun (``deeplab_v1.distributed``) rank 0 holds the lock, every rank checks its
share of the data, rank 0 plans each stage and writes its record; every rank runs the
``DISTRIBUTED_STAGES``, with a barrier after each.

With ``model.crf_rnn.enabled`` the CRF is a layer of the network, trained with it and run by the test
stage (CRF-as-RNN, issue #24 item 3): the ``crf_search`` and ``crf`` stages are then skipped whatever
``crf_search.enabled`` and ``crf.enabled`` say, their records saying why (``CRF_INSIDE_NET``); the report
and the evaluation see no post-hoc CRF.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import yaml

from . import config as config_mod
from .atomic import atomic_write_json, atomic_write_text
from .config import ExperimentConfig
from .context import RunContext, StageError
from .data.check import check_samples, check_void_band
from .distributed import DISTRIBUTED_STAGES, RankError, barrier, on_main
from .fingerprints import changed_keys, stage_fingerprint
from .layout import STAGES
from .run_lock import run_lock
from .stages import STAGE_RUNNERS
from .stages.train import check_lr_mult

__all__ = ["Runner", "StageError", "run_lock"]

#: Why a CRF-as-RNN run skips the post-hoc CRF stages (their records' ``reason``; the report prints it).
CRF_INSIDE_NET = "the CRF is inside the net (CRF-as-RNN, model.crf_rnn)"


def _crf_inside_net(ctx: RunContext) -> dict:
    """The ``crf_search`` / ``crf`` stage of a CRF-as-RNN run: nothing to do."""
    ctx.log.info(f"{CRF_INSIDE_NET}: the post-hoc CRF stage is skipped")
    return {"skipped": True, "reason": CRF_INSIDE_NET}


def _gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order (``torch.distributed.all_gather_object``).

    Raises:
        RankError: another rank died.
    """
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(parts, obj)
    except RuntimeError as exc:
        raise RankError(f"another rank stopped (its error comes first in the output): "
                        f"{(str(exc).splitlines() or [''])[0]}") from exc
    return parts


class Runner:
    """Runs the stages of one experiment.

    Args:
        cfg: a validated experiment (``config.load_config``).
        progress: show tqdm bars.
        redo: stages to run again even if done; the stages after them rerun too.
        redo_only: stages to run again even if done, alone (``deeplab train|test|... --redo``).

    Raises:
        StageError: an unknown stage name, or ``device: cuda`` without CUDA.
        ConfigError: a ``train.lr_mult`` pattern that matches no layer (``stages.train.check_lr_mult``).
    """

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True, redo: Iterable[str] = (),
                 redo_only: Iterable[str] = ()) -> None:
        self.redo, self.redo_only = set(redo), set(redo_only)
        unknown = (self.redo | self.redo_only) - set(STAGES)
        if unknown:
            raise StageError(f"--redo: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
        check_lr_mult(cfg)  # before any work (the run folder, torchrun's group): a pattern that matches no layer
        self.ctx = RunContext.create(cfg, progress=progress)
        self.cfg, self.layout, self.log = cfg, self.ctx.layout, self.ctx.log
        self.dir = self.layout.root

    def check_inputs(self) -> None:
        """Before any long work: the data lists (every file present), then every image decodable and every
        label readable, of its image's size, with values in 0..num_classes-1 or 255
        (``data.check.check_samples``, remembered in ``.data_check.json`` by file size and mtime). Under
        torchrun every rank checks its share and the verdicts are gathered: no rank waits in a collective
        while another checks a whole list (issue #20).

        Raises:
            DataError: every problem found, each naming the file.
        """
        samples = []
        if "train" in self.cfg.stages and self.cfg.train.iterations > 0:
            samples += self.ctx.train_samples()
        if any(s in self.cfg.stages for s in ("test", "crf", "evaluate", "crf_search")):
            samples += self.ctx.test_samples()
        info = self.ctx.dist
        check_samples(samples, self.cfg.model.num_classes, cache=self.layout.data_check,
                      progress=self.ctx.progress, rank=info.rank, world=info.world, gather=_gather_objects)
        s = self.cfg.crf_search
        search = "crf_search" in self.cfg.stages and s.enabled and s.search.objective == "trimap_miou"
        if self.cfg.data.trimap_band == "void" and ("evaluate" in self.cfg.stages or search):
            check_void_band(self.ctx.test_samples(), self.cfg.model.num_classes)

    def run(self, stages: Optional[list[str]] = None) -> dict:
        """Run ``stages`` (default: the config's), skipping finished ones whose fingerprint is unchanged.
        Returns the metrics (or {}).

        Raises:
            StageError: an unknown stage, a run folder in use, or what a stage raises.
        """
        stages = stages or list(self.cfg.stages)
        for s in stages:
            if s not in STAGES:
                raise StageError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
        with self._lock():
            self.check_inputs()  # every rank its share; every rank raises what any rank found
            return self._run(stages)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """The run folder's lock, held by rank 0 alone (a refusal stops every rank)."""
        with ExitStack() as stack:
            on_main(lambda: stack.enter_context(run_lock(self.layout.lock)) and None)
            yield

    def _remove_torn_writes(self) -> None:
        """Temporary files of atomic writes killed midway (``.<name>.*.tmp``, ``crf.atomic``): with the
        lock held nobody else is writing, so every one left in the run folder is garbage."""
        for tmp in self.layout.root.rglob(".*.tmp"):
            if tmp.is_file():
                self.log.info(f"removing {tmp}: the temporary file of a write that was killed")
                tmp.unlink(missing_ok=True)

    def _clear_for_redo(self) -> None:
        self._remove_torn_writes()
        cleared = set(self.redo_only)
        if self.redo:
            cleared |= set(STAGES[min(STAGES.index(s) for s in self.redo):])
        for s in cleared:  # finished or not: its artifacts go
            self.layout.clear(s)
            self.layout.started(s).unlink(missing_ok=True)

    def _gone_outputs(self, stage: str, rec: Optional[dict], fp: str) -> list:
        """The per-image outputs of ``stage``, finished under ``fp``, that have been deleted since
        (``RunLayout.missing_outputs``): they are rebuilt rather than silently left out (issue #20)."""
        if rec is None or rec.get("fingerprint") != fp:
            return []
        return self.layout.missing_outputs(stage, [s.id for s in self.ctx.test_samples()])

    def _begin(self, stage: str) -> Optional[tuple[str, dict]]:
        """(fingerprint, inputs) of a stage to run, its stale outputs cleared; None when it is done."""
        fp, inputs = stage_fingerprint(self.ctx, stage)
        rec = self.layout.read_record(stage)
        gone = self._gone_outputs(stage, rec, fp)
        stale = rec is not None and stage in self._stale
        if rec is not None and rec.get("fingerprint") == fp and not gone and not stale:
            self.log.info(f"stage {stage}: done already (skipped; --redo {stage} to rerun)")
            return None
        if stale:
            self.log.info(f"stage {stage}: a stage before it rebuilt outputs it reads: redoing it")
            self.layout.clear(stage)
        elif gone:  # the outputs still there were made under these inputs: the stage rebuilds the rest
            self.log.info(f"stage {stage}: finished, but {len(gone)} of its outputs are gone (e.g. {gone[0]}): "
                          "rebuilding them")
            self._stale.update(STAGES[STAGES.index(stage) + 1:])  # they read what is rebuilt now
            self.layout.record(stage).unlink()
        elif rec is not None and "fingerprint" not in rec:
            self.log.info(f"stage {stage}: its record has no fingerprint (a run folder of an older version): "
                          "redoing it")
            self.layout.clear(stage)
        elif rec is not None:
            keys = changed_keys(rec.get("inputs", {}), inputs) or ["the stages before it"]
            self.log.info(f"stage {stage}: its inputs changed since it ran ({', '.join(keys)}): redoing it")
            self.layout.clear(stage)
        started = self._read_started(stage)
        if started is not None and started.get("fingerprint") != fp:
            self.log.info(f"stage {stage}: a run under other inputs left partial outputs: starting afresh")
            self.layout.clear(stage)
        atomic_write_json(self.layout.started(stage), {"fingerprint": fp})
        if not self._wrote_config:  # config.yaml is rewritten only together with work it describes
            atomic_write_text(self.layout.config, yaml.safe_dump(config_mod.to_dict(self.cfg), sort_keys=False))
            self._wrote_config = True
        self.log.info(f"stage {stage}: start")
        return fp, inputs

    def _run(self, stages: list[str]) -> dict:
        # Several ranks (torchrun): rank 0 plans each stage and writes its record; every rank runs the
        # DISTRIBUTED_STAGES; the stages after the last of those run on rank 0 alone, the others leave.
        main = self.ctx.dist.is_main
        on_main(self._clear_for_redo)
        t_all = time.perf_counter()
        self._wrote_config = False
        self._stale: set[str] = set()
        for stage in STAGES:
            if stage not in stages:
                continue
            later = STAGES[STAGES.index(stage):]
            solo = not any(s in DISTRIBUTED_STAGES and s in stages for s in later)
            if solo and not main:
                break
            plan = self._begin(stage) if solo else on_main(lambda: self._begin(stage))
            if plan is None:
                continue
            fp, inputs = plan
            t0 = time.perf_counter()
            inside = self.cfg.model.crf_rnn.enabled and stage in ("crf_search", "crf")
            work = _crf_inside_net if inside else STAGE_RUNNERS[stage]
            details = (work(self.ctx) or {}) if main or stage in DISTRIBUTED_STAGES else {}
            seconds = time.perf_counter() - t0
            if not solo:
                barrier()
            if main:
                self.layout.write_record(stage, seconds, {**details, "fingerprint": fp, "inputs": inputs})
                self.layout.started(stage).unlink(missing_ok=True)
                self.log.info(f"stage {stage}: finished in {seconds:.1f} s")
        metrics = {}
        if main and self.layout.metrics.is_file():
            metrics = json.loads(self.layout.metrics.read_text())
            summary = ", ".join(
                f"{k} mIoU {metrics[k]['miou'] * 100:.2f}" for k in ("dcnn", "crf") if k in metrics and metrics[k]
            )
            self.log.info(f"run {self.cfg.name}: {summary} ({time.perf_counter() - t_all:.1f} s); report: {self.layout.report}")
        return metrics

    def _read_started(self, stage: str) -> Optional[dict]:
        p = self.layout.started(stage)
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return {}
