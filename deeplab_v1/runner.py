"""The experiment runner: train -> test -> crf_search -> crf -> evaluate, decoupled through files.

Each stage reads the previous stages' artifacts from the run folder and writes its own; a stage that finds
its completion record (``stages/<stage>.json``) is skipped, so a rerun resumes, and ``redo`` reruns a
named stage and the stages after it. Within a stage, finished per-image files are kept, so a killed test or
CRF stage continues where it stopped.

Run folder::

    config.yaml            resolved configuration
    run.log                the log
    stages/<stage>.json    completion records (seconds, details)
    checkpoints/           iter_<N>.pth (resume), final.pth (trained weights)
    scores/<id>.npz        stride-8 fc8 scores, float16 (see engine.inference)
    predictions/dcnn/      arg-max of the upsampled scores, VOC-palette PNG
    predictions/crf/       after the fully connected CRF, VOC-palette PNG
    crf_search/            the CRF parameter search (ranked.md, heatmap.png, best.json, results.jsonl)
    metrics.json trimap.json trimap.png report.md
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import config as config_mod
from crf import CRFParams
from crf.parallel import CRFTask, run_crf_many

from .config import STAGES, ExperimentConfig
from .data.io import read_image, read_label, write_label
from .data.lists import Sample, load_samples
from .atomic import atomic_write_json, atomic_write_text
from .engine.checkpoint import load_checkpoint
from .engine.inference import ScoreMap, label_from_scores, predict
from .engine.trainer import TrainSettings, train
from .models import build_model
from .weights.convert import file_sha256


class StageError(RuntimeError):
    """A stage cannot run (a missing artifact of an earlier stage, say); the message says which."""


def _crf_inputs(task: "CRFTask") -> tuple[np.ndarray, np.ndarray]:
    """CRF worker input: the image (BGR file -> RGB for the bilateral kernel) and the softmax of the cached
    scores upsampled as Caffe's INTERP does."""
    image = read_image(task.image)[:, :, ::-1].copy()
    probs = torch.softmax(ScoreMap.load(Path(task.sample)).upsampled(), 0).numpy()
    return image, probs


class Runner:
    """Runs the stages of one experiment.

    Args:
        cfg: a validated experiment (``config.load_config``).
        progress: show tqdm bars.
        redo: stages to run again even if done (the stages after them rerun too).
    """

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True, redo: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.progress = progress
        self.redo = set(redo)
        unknown = self.redo - set(STAGES)
        if unknown:
            raise StageError(f"--redo: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self._make_logger()
        self.device = torch.device(cfg.device)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise StageError("device: cuda was asked for but CUDA is not available")

    # ------------------------------------------------------------------------------------------ plumbing
    def _make_logger(self) -> logging.Logger:
        logger = logging.getLogger(f"deeplab.run.{self.dir}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if not logger.handlers:
            fh = logging.FileHandler(self.dir / "run.log", encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(fh)

            class _Tqdm(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    tqdm.write(self.format(record))

            sh = _Tqdm()
            sh.setFormatter(logging.Formatter("[deeplab] %(message)s"))
            logger.addHandler(sh)
        return logger

    def _record_path(self, stage: str) -> Path:
        return self.dir / "stages" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        return self._record_path(stage).is_file()

    def _record(self, stage: str, seconds: float, **details) -> None:
        atomic_write_json(self._record_path(stage), {"stage": stage, "seconds": round(seconds, 3), **details})

    def stage_seconds(self) -> dict[str, float]:
        out = {}
        for stage in STAGES:
            p = self._record_path(stage)
            if p.is_file():
                out[stage] = json.loads(p.read_text())["seconds"]
        return out

    def test_samples(self) -> list[Sample]:
        c = self.cfg.data
        samples = load_samples(c.root, c.test_list, require_labels="evaluate" in self.cfg.stages or self.cfg.test.score_source != "network")
        return samples[: c.max_test_images] if c.max_test_images else samples

    def train_samples(self) -> list[Sample]:
        c = self.cfg.data
        samples = load_samples(c.root, c.train_list, require_labels=True)
        return samples[: c.max_train_images] if c.max_train_images else samples

    def _model_spec(self):
        return getattr(build_model(self.cfg.model.name, self.cfg.model.num_classes, **self.cfg.model.options()), "spec", None)

    # ----------------------------------------------------------------------------------------------- run
    def check_inputs(self) -> None:
        """Validate the data lists (every file present) before any long work."""
        if "train" in self.cfg.stages and self.cfg.train.iterations > 0:
            self.train_samples()
        if any(s in self.cfg.stages for s in ("test", "crf", "evaluate", "crf_search")):
            self.test_samples()

    def run(self, stages: Optional[list[str]] = None) -> dict:
        """Run ``stages`` (default: the config's), skipping finished ones. Returns the metrics (or {})."""
        stages = stages or list(self.cfg.stages)
        for s in stages:
            if s not in STAGES:
                raise StageError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
        self.check_inputs()
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(config_mod.to_dict(self.cfg), sort_keys=False))
        if self.redo:
            first = min(STAGES.index(s) for s in self.redo)
            for s in STAGES[first:]:
                if self._record_path(s).is_file():
                    self._record_path(s).unlink()
                    self._clear(s)
        t_all = time.perf_counter()
        for stage in STAGES:
            if stage not in stages:
                continue
            if self.is_done(stage):
                self.log.info(f"stage {stage}: done already (skipped; --redo {stage} to rerun)")
                continue
            self.log.info(f"stage {stage}: start")
            t0 = time.perf_counter()
            details = getattr(self, f"stage_{stage}")() or {}
            seconds = time.perf_counter() - t0
            self._record(stage, seconds, **details)
            self.log.info(f"stage {stage}: finished in {seconds:.1f} s")
        metrics = {}
        if (self.dir / "metrics.json").is_file():
            metrics = json.loads((self.dir / "metrics.json").read_text())
            summary = ", ".join(
                f"{k} mIoU {metrics[k]['miou'] * 100:.2f}" for k in ("dcnn", "crf") if k in metrics and metrics[k]
            )
            self.log.info(f"run {self.cfg.name}: {summary} ({time.perf_counter() - t_all:.1f} s); report: {self.dir / 'report.md'}")
        return metrics

    def _clear(self, stage: str) -> None:
        targets = {
            "train": ["checkpoints"],
            "test": ["scores", "predictions/dcnn"],
            "crf_search": ["crf_search"],
            "crf": ["predictions/crf"],
            "evaluate": [],
        }[stage]
        for t in targets:
            p = self.dir / t
            if p.is_dir():
                shutil.rmtree(p)

    # ---------------------------------------------------------------------------------------- the model
    def _init_model(self) -> tuple[torch.nn.Module, str]:
        m = self.cfg.model
        torch.manual_seed(self.cfg.seed)
        model = build_model(m.name, m.num_classes, **m.options())
        if m.init is None:
            return model, "random weights (no init given)"
        if hasattr(model, "backbone"):  # DeepLab v3/v3+: our checkpoint, or an ImageNet ResNet backbone
            return model, f"{m.init.name} (sha256 {file_sha256(m.init)[:12]}): {self._init_v3(model, m.init)}"
        from .weights.convert import load_init

        report = load_init(model, m.name, m.init, num_classes=m.num_classes)
        return model, f"{m.init.name} (sha256 {file_sha256(m.init)[:12]}): {report}"

    def _init_v3(self, model: torch.nn.Module, path: Path) -> str:
        """Initialise a v3/v3+ model from our checkpoint (whole model) or an ImageNet ResNet checkpoint in the
        common PyTorch layout (backbone only; the heads keep their initialisation)."""
        try:
            state = load_checkpoint(path)
        except ValueError as exc:
            raise StageError(f"model.init: cannot read {path}: {exc}") from exc
        inner = state.get("state_dict", state.get("model_state")) if isinstance(state, dict) else None
        if isinstance(inner, dict):
            model.load_state_dict(inner)
            return "whole model from a checkpoint of ours"
        if "xception" in self.cfg.model.name:
            raise StageError(f"model.init: {path} is not a checkpoint of ours, and ImageNet Xception-65 checkpoints "
                             "cannot be loaded yet; train from our checkpoint or set model.init: null")
        from .models.resnet import load_resnet_checkpoint

        return f"ImageNet ResNet backbone: {load_resnet_checkpoint(model.backbone, path)}"

    def trained_model(self) -> torch.nn.Module:
        """The model the test stage uses: ``checkpoints/final.pth`` if trained, else the initial weights."""
        final = self.dir / "checkpoints" / "final.pth"
        m = self.cfg.model
        if final.is_file():
            model = build_model(m.name, m.num_classes, **m.options())
            model.load_state_dict(load_checkpoint(final)["state_dict"])
        else:
            model, _ = self._init_model()
        if self.cfg.test.output_stride and hasattr(model, "set_output_stride"):
            model.set_output_stride(self.cfg.test.output_stride)
        return model.to(self.device).eval()

    # -------------------------------------------------------------------------------------------- stages
    def stage_train(self) -> dict:
        t = self.cfg.train
        model, init_desc = self._init_model()
        self.log.info(f"init: {init_desc}")
        if t.iterations == 0:
            self.log.info("train.iterations is 0: testing the initial weights")
            from .engine.checkpoint import save_checkpoint

            save_checkpoint(self.dir / "checkpoints" / "final.pth", {"state_dict": model.state_dict(), "model": self.cfg.model.name})
            return {"init": init_desc, "iterations": 0}
        if t.output_stride and hasattr(model, "set_output_stride"):
            model.set_output_stride(t.output_stride)
        if t.batchnorm == "frozen":
            if not hasattr(model, "freeze_bn"):
                raise StageError(f"train.batchnorm: frozen needs a model with BatchNorm; {self.cfg.model.name} has none")
            model.freeze_bn(True)
        if hasattr(model, "freeze_bn") and t.batchnorm == "finetune" and t.batch_size < 2:
            raise StageError("train.batch_size must be >= 2 to fine-tune BatchNorm (image pooling sees one value "
                             "per channel per image); use a larger batch or train.batchnorm: frozen")
        spec = getattr(model, "spec", None)
        crop = t.crop_size or (spec.train_crop if spec is not None else 513)
        settings = TrainSettings(
            iterations=t.iterations, batch_size=t.batch_size, iter_size=t.iter_size, crop_size=crop,
            base_lr=t.base_lr, lr_policy=t.lr_policy, gamma=t.gamma, step_size=t.step_size, power=t.power,
            momentum=t.momentum, weight_decay=t.weight_decay, classifier_lr_mult=t.classifier_lr_mult,
            lr_mult=dict(t.lr_mult) if t.lr_mult else None,
            label_mode=t.label_mode,
            # train.prototxt's label_shrink: INTERP shrink_factor 8, pad_beg -1 for DeepLab's 306 crop
            label_pad_beg=spec.train_label_pad_beg if spec is not None else 0,
            mirror=t.mirror, scale_range=tuple(t.scale_range) if t.scale_range else None,
            checkpoint_every=t.checkpoint_every, log_every=t.log_every, seed=self.cfg.seed,
            num_classes=self.cfg.model.num_classes,
        )
        samples = self.train_samples()
        self.log.info(f"training {self.cfg.model.name} on {len(samples)} images, crop {crop}, {t.iterations} iterations")
        result = train(
            model, samples, settings, self.dir / "checkpoints", device=self.device, progress=self.progress,
            log=self.log.info,
            extra_state={"model": self.cfg.model.name, "num_classes": self.cfg.model.num_classes, "init": init_desc},
        )
        return {"init": init_desc, "iterations": result.iterations, "resumed_from": result.resumed_from,
                "final_loss": result.final_loss, "images": len(samples)}

    def stage_test(self) -> dict:
        samples = self.test_samples()
        source = self.cfg.test.score_source
        (self.dir / "scores").mkdir(exist_ok=True)
        pred_dir = self.dir / "predictions" / "dcnn"
        pred_dir.mkdir(parents=True, exist_ok=True)
        model = None
        size = self.cfg.test.size
        if source == "network":
            model = self.trained_model()
            spec = getattr(model, "spec", None)
            size = size or (spec.test_size if spec is not None else 513)
        else:
            from .data.degraded import degraded_scores

            self.log.info("score source: DIAGNOSTIC degraded ground truth (no network is run)")
        done = 0
        t0 = time.perf_counter()
        for s in tqdm(samples, desc="test", disable=not self.progress, dynamic_ncols=True):
            cache = self.dir / "scores" / f"{s.id}.npz"
            png = pred_dir / f"{s.id}.png"
            if cache.is_file() and png.is_file():
                continue
            image = read_image(s.image)
            if source == "network":
                with torch.no_grad():
                    sm = predict(model, image, size=size, scales=self.cfg.test.scales, flip=self.cfg.test.flip,
                                 device=self.device)
            else:
                label = read_label(s.label, self.cfg.model.num_classes)
                sc = degraded_scores(label, self.cfg.model.num_classes, seed=self.cfg.seed)
                sm = ScoreMap(sc, 8, label.shape[0], label.shape[1], source="degraded-gt")
            if not np.isfinite(sm.scores).all():
                raise StageError(f"test: the network gave non-finite scores for {s.id}: the weights are broken (diverged training?)")
            sm.save(cache)
            write_label(png, label_from_scores(sm.upsampled()))
            done += 1
        seconds = time.perf_counter() - t0
        self.log.info(f"test: {done} images scored ({len(samples) - done} cached) in {seconds:.1f} s")
        return {"images": len(samples), "computed": done, "score_source": source, "test_size": size}

    def crf_params(self) -> tuple[dict, str]:
        """CRF parameters for the crf stage and where they come from (search or config)."""
        best = self.dir / "crf_search" / "best.json"
        if self.cfg.crf.use_search and best.is_file():
            data = json.loads(best.read_text())
            params = data.get("params", data)
            keys = ("w1", "sigma_alpha", "sigma_beta", "w2", "sigma_gamma", "iterations")
            return {k: params[k] for k in keys if k in params}, "crf_search best"
        return dict(self.cfg.crf.params), "config"

    def stage_crf(self) -> dict:
        if not self.cfg.crf.enabled:
            self.log.info("crf.enabled is false: CRF skipped")
            return {"skipped": True}
        samples = self.test_samples()
        params, origin = self.crf_params()
        out_dir = self.dir / "predictions" / "crf"
        out_dir.mkdir(parents=True, exist_ok=True)
        tasks = []
        for s in samples:
            cache = self.dir / "scores" / f"{s.id}.npz"
            if not cache.is_file():
                raise StageError(f"crf: no cached scores for {s.id} ({cache}); run the test stage first")
            tasks.append(CRFTask(sample=str(cache), out=str(out_dir / f"{s.id}.png"), image=str(s.image)))
        self.log.info(f"crf: {len(tasks)} images, params {params} from {origin}, backend {self.cfg.crf.backend}")
        summary = run_crf_many(
            tasks, CRFParams(**params), workers=self.cfg.crf.workers, backend=self.cfg.crf.backend,
            device=self.cfg.crf.device, progress=self.progress, load=_crf_inputs, write=write_label,
        )
        mean = summary.crf_seconds / summary.done if summary.done else 0.0
        self.log.info(summary.line())
        return {"params": params, "params_from": origin, "images": len(samples), "seconds_per_image": mean}

    def stage_crf_search(self) -> dict:
        from .search_stage import run_crf_search

        return run_crf_search(self)

    def stage_evaluate(self) -> dict:
        from .evaluation.metrics import ConfusionAccumulator
        from .evaluation.plots import plot_trimap
        from .evaluation.trimap import TrimapAccumulator
        from .report import write_report

        n = self.cfg.model.num_classes
        widths = self.cfg.evaluation.trimap_widths
        samples = self.test_samples()
        methods = {"dcnn": self.dir / "predictions" / "dcnn"}
        if self.cfg.crf.enabled and (self.dir / "predictions" / "crf").is_dir():
            methods["crf"] = self.dir / "predictions" / "crf"
        conf = {k: ConfusionAccumulator(n) for k in methods}
        tri = {k: TrimapAccumulator(widths, n) for k in methods}
        for s in tqdm(samples, desc="evaluate", disable=not self.progress, dynamic_ncols=True):
            gt = read_label(s.label, n)
            for k, folder in methods.items():
                p = folder / f"{s.id}.png"
                if not p.is_file():
                    raise StageError(f"evaluate: missing prediction {p}; run the {'test' if k == 'dcnn' else 'crf'} stage")
                pred = read_label(p, n)
                conf[k].update(gt, pred)
                tri[k].update(gt, pred)
        metrics = {k: conf[k].scores(json_safe=True) for k in methods}
        metrics["images"] = len(samples)
        metrics["score_source"] = self.cfg.test.score_source
        atomic_write_json(self.dir / "metrics.json", metrics)
        trimap = {k: tri[k].result() for k in methods}
        atomic_write_json(self.dir / "trimap.json", {**trimap, "score_source": self.cfg.test.score_source})
        labels = {"dcnn": "DCNN", "crf": "DCNN-CRF"}
        diag = " (diagnostic degraded-GT scores)" if self.cfg.test.score_source != "network" else ""
        plot_trimap({labels[k] + diag: v for k, v in trimap.items()}, self.dir / "trimap.png")
        write_report(self, metrics, trimap)
        return {k: (None if metrics[k]["miou"] is None else round(metrics[k]["miou"], 6)) for k in methods}
