"""The ``train`` stage: the release's Caffe solver on random crops (``engine.trainer``).

Reads: ``model.init``; the training list. Writes: ``checkpoints/iter_<N>.pth`` (resumable),
``checkpoints/final.pth`` (the trained weights; with ``train.iterations: 0`` the initial ones).
"""

from __future__ import annotations

from ..context import RunContext, StageError
from ..engine.checkpoint import save_checkpoint
from ..engine.trainer import train
from .network import initial_model


def run(ctx: RunContext) -> dict:
    """Train (resuming from the last checkpoint); returns the stage record's details.

    Raises:
        StageError: a BatchNorm option the model cannot take, or a batch too small to fine-tune BatchNorm.
    """
    t = ctx.cfg.train
    model, init_desc = initial_model(ctx)
    ctx.log.info(f"init: {init_desc}")
    if t.iterations == 0:
        ctx.log.info("train.iterations is 0: testing the initial weights")
        save_checkpoint(ctx.layout.final_checkpoint, {"state_dict": model.state_dict(), "model": ctx.cfg.model.name})
        return {"init": init_desc, "iterations": 0}
    spec = ctx.v1_spec
    if spec is None:  # DeepLab v3/v3+ options
        if t.output_stride:
            model.set_output_stride(t.output_stride)
        if t.batchnorm == "frozen":
            model.freeze_bn(True)
        elif t.batch_size < 2:
            raise StageError("train.batch_size must be >= 2 to fine-tune BatchNorm (image pooling sees one value "
                             "per channel per image); use a larger batch or train.batchnorm: frozen")
    elif t.batchnorm == "frozen":
        raise StageError(f"train.batchnorm: frozen needs a model with BatchNorm; {ctx.cfg.model.name} has none")
    crop = t.crop_size or (spec.train_crop if spec is not None else 513)
    samples = ctx.train_samples()
    ctx.log.info(f"training {ctx.cfg.model.name} on {len(samples)} images, crop {crop}, {t.iterations} iterations")
    result = train(
        model, samples, t, ctx.layout.checkpoints, crop_size=crop,
        # train.prototxt's label_shrink: INTERP shrink_factor 8, pad_beg -1 for DeepLab's 306 crop
        label_pad_beg=spec.train_label_pad_beg if spec is not None else 0,
        seed=ctx.cfg.seed, num_classes=ctx.cfg.model.num_classes, device=ctx.device, progress=ctx.progress,
        log=ctx.log.info,
        extra_state={"model": ctx.cfg.model.name, "num_classes": ctx.cfg.model.num_classes, "init": init_desc},
    )
    return {"init": init_desc, "iterations": result.iterations, "resumed_from": result.resumed_from,
            "final_loss": result.final_loss, "images": len(samples)}
