"""The ``train`` stage: the release's Caffe solver on random crops (``engine.trainer``).

Reads: ``model.init``; the training list. Writes: ``checkpoints/iter_<N>.pth`` (resumable),
``checkpoints/final.pth`` (the trained weights; with ``train.iterations: 0`` the initial ones);
``tensorboard/`` (``train.tensorboard``: loss, lr, predictions). Under torchrun every rank trains (DDP)
and rank 0 writes. A CRF-as-RNN model (``model.crf_rnn``) trains its CRF layer with the network; the record
keeps the layer's trained values (``crf_layer``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..config import ExperimentConfig
from ..context import RunContext, StageError
from ..data.layouts import palette
from ..models import CRFasRNN, build_model, release_spec
from ..engine.checkpoint import save_checkpoint
from ..engine.precision import set_tf32
from ..engine.solver import unmatched_lr_mult
from ..engine.trainer import train
from .network import initial_model


def check_lr_mult(cfg: ExperimentConfig) -> None:
    """Each ``train.lr_mult`` pattern matches a layer of the model (``engine.solver.unmatched_lr_mult``),
    checked by the runner before any work; the model is built on the meta device (names only: no memory,
    no initialisation cost). The values' shape ([weight, bias], >= 0) is the schema's.

    Raises:
        ConfigError: ``train.lr_mult.<pattern>`` matches no layer; the message names the file (or the
            ``--set``) and the model's layers.
    """
    if not cfg.train.lr_mult:
        return
    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.options())
    unmatched, layers = unmatched_lr_mult(model, cfg.train.lr_mult)
    if unmatched:
        shown = ", ".join(layers[:40]) + (" ..." if len(layers) > 40 else "")
        raise cfg.key_error(f"train.lr_mult.{unmatched[0]}", f"matches no layer of {cfg.model.name} (layers: {shown})")


@contextmanager
def tensorboard_writer(ctx: RunContext) -> Iterator[Optional[Any]]:
    """A ``SummaryWriter`` on ``<run>/tensorboard`` when ``train.tensorboard`` is on (rank 0), else None.

    Raises:
        StageError: ``train.tensorboard: true`` without the tensorboard package.
    """
    if not (ctx.cfg.train.tensorboard and ctx.dist.is_main):
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise StageError("train.tensorboard is true but the tensorboard package is not installed "
                         "(pip install 'deeplab-v1[tensorboard]', or set train.tensorboard: false)") from None
    writer = SummaryWriter(log_dir=str(ctx.layout.tensorboard))
    try:
        yield writer
    finally:
        writer.close()


def run(ctx: RunContext) -> dict:
    """Train (resuming from the last checkpoint); returns the stage record's details.

    Raises:
        StageError: a BatchNorm option the model cannot take, or a batch too small to fine-tune BatchNorm.
    """
    t = ctx.cfg.train
    set_tf32(ctx.cfg.tf32, ctx.device)
    if t.sync_batchnorm and ctx.dist.active and ctx.device.type != "cuda":
        raise StageError("train.sync_batchnorm needs device: cuda (torch's SyncBatchNorm runs on GPUs only); "
                         "set train.sync_batchnorm: false on the CPU")
    model, init_desc = initial_model(ctx)
    ctx.log.info(f"init: {init_desc}")
    if t.iterations == 0:
        ctx.log.info("train.iterations is 0: testing the initial weights")
        if ctx.dist.is_main:
            save_checkpoint(ctx.layout.final_checkpoint, {"state_dict": model.state_dict(), "model": ctx.cfg.model.name,
                                                          **_layer_build(model)})
        return {"init": init_desc, "iterations": 0, **crf_layer_record(model)}
    spec = release_spec(ctx.cfg.model.name)
    if spec is None and t.output_stride:  # DeepLab v3/v3+: the encoder's stride is an option
        model.set_output_stride(t.output_stride)
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # ask the model
    if t.batchnorm == "frozen":
        if not has_batchnorm:
            raise StageError(f"train.batchnorm: frozen needs a model with BatchNorm; {ctx.cfg.model.name} has none")
        model.freeze_bn(True)
    elif has_batchnorm and t.batch_size < 2:
        raise StageError("train.batch_size must be >= 2 to fine-tune BatchNorm (image pooling sees one value "
                         "per channel per image); use a larger batch or train.batchnorm: frozen")
    crop = t.crop_size or (spec.train_crop if spec is not None else 513)
    samples = ctx.train_samples()
    ctx.log.info(f"training {ctx.cfg.model.name} on {len(samples)} images, crop {crop}, {t.iterations} iterations")
    with tensorboard_writer(ctx) as board:
        result = train(
            model, samples, t, ctx.layout.checkpoints, crop_size=crop,
            # train.prototxt's label_shrink: INTERP shrink_factor 8, pad_beg -1 for DeepLab's 306 crop
            label_pad_beg=spec.train_label_pad_beg if spec is not None else 0,
            seed=ctx.cfg.seed, num_classes=ctx.cfg.model.num_classes, device=ctx.device, progress=ctx.progress,
            log=ctx.log.info, tensorboard=board, palette=palette(ctx.cfg.data),
            extra_state={"model": ctx.cfg.model.name, "num_classes": ctx.cfg.model.num_classes, "init": init_desc,
                         **_layer_build(model)},
        )
    return {"init": init_desc, "iterations": result.iterations, "resumed_from": result.resumed_from,
            "final_loss": result.final_loss, "images": len(samples), "world_size": ctx.dist.world,
            "global_batch": t.batch_size * t.iter_size * ctx.dist.world, **crf_layer_record(model)}


def _layer_build(model: nn.Module) -> dict:
    """``{"crf_rnn": ...}``: how to rebuild a CRF-as-RNN model (``CRFasRNN.build_record``), kept in its
    checkpoints so that ``deeplab predict`` builds the same net; ``{}`` for a plain network."""
    return {"crf_rnn": model.build_record()} if isinstance(model, CRFasRNN) else {}


def crf_layer_record(model: nn.Module) -> dict:
    """``{"crf_layer": {w1, w2, compatibility (C x C rows)}}``: the CRF layer's values of a CRF-as-RNN model
    (``model.crf_rnn``) for the stage record and the report; ``{}`` for a plain network."""
    if not isinstance(model, CRFasRNN):
        return {}
    layer = model.crf
    params = layer.current_params()
    compatibility = [[round(float(v), 6) for v in row] for row in layer.compatibility().detach().cpu()]
    return {"crf_layer": {"w1": round(params.w1, 6), "w2": round(params.w2, 6), "learn": list(layer.learn),
                          "compatibility": compatibility}}
