"""Iteration-based training as the release's Caffe solver runs it.

Source: ``solver.prototxt`` and ``train.prototxt`` of deeplab-public (see ``solver.py``); paper Sec. 3.1
("the sum of cross-entropy terms for each spatial position in the CNN output map (subsampled by 8)",
"targets are the ground truth labels (subsampled by 8)"); DeepLab v3 Sec. 4 for the v3 options (poly lr,
logits upsampled to the labels, random scaling, BN fine-tuned or frozen).

Determinism and resume: the sample order is a permutation per epoch drawn from (seed, epoch); the crop,
mirror, scale and dropout masks of a sample from (seed, epoch, index) (``data.loader``,
``models.dropout``), whatever process loads it and wherever it sits in the global batch. A resumed run
therefore continues exactly as an uninterrupted one, with any number of loader workers or ranks.
Several ranks (torchrun): DDP, gradients exchanged once per iteration (``no_sync`` for the first
``iter_size - 1`` micro-batches), the logged loss the mean over ranks, rank 0 writes. Checkpoints ``checkpoints/iter_<N>.pth`` are written atomically
every ``checkpoint_every`` iterations and at the end; ``checkpoints/final.pth`` holds the trained weights.

A model whose scores are at the input's resolution (``full_resolution``: ``models.crf_rnn.CRFasRNN``, the
CRF inside the net) is trained on the crop's labels as they are (never shrunk, whatever ``label_mode``
says): the loss is on the refined full-resolution logits (Zheng et al. ICCV 2015).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import distributed
from ..data.datasets import TrainDataset
from ..data.io import voc_palette
from ..data.lists import Sample
from ..data.loader import TrainBatches, loader_workers, train_loader
from ..distributed import on_main
from ..errors import DeepLabError
from ..models.dropout import dropout_keys
from .checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint, save_checkpoint
from .precision import autocast, grad_scaler, maybe_compile, to_memory_format
from .solver import CaffeSGD, caffe_param_groups, learning_rate

if TYPE_CHECKING:  # pragma: no cover - the type only; the engine does not depend on the config module
    from ..config import TrainConfig


class TrainingDiverged(DeepLabError, FloatingPointError):
    """The loss became inf or NaN; the message names the iteration and what to change."""


@dataclass
class TrainResult:
    iterations: int
    resumed_from: int
    final_loss: float
    seconds: float
    checkpoint: Path


def segmentation_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over all positions, label 255 ignored, normalised by the number of
    non-ignored positions (Caffe ``SOFTMAX_LOSS`` with ``ignore_label: 255``, normalize true).

    Args:
        scores: (N, C, h, w) float; labels: (N, h, w) int64 (255 = ignore).

    Raises:
        ValueError: spatial sizes differ (names both shapes).
    """
    if scores.shape[-2:] != labels.shape[-2:] or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} do not match")
    if not bool((labels != 255).any()):
        return scores.sum() * 0.0  # every position ignored: no gradient, as Caffe
    return F.cross_entropy(scores, labels, ignore_index=255, reduction="mean")


def _load_resume_state(checkpoint_dir: Path, log: Callable[[str], None]) -> Optional[tuple[Path, dict]]:
    """The newest readable ``iter_<N>.pth``: rank 0 picks it (and renames damaged ones), every rank reads it."""
    path = on_main(lambda: (found[0] if (found := load_latest_checkpoint(checkpoint_dir, warn=log)) else None))
    return None if path is None else (path, load_checkpoint(path))


def prediction_images(out: torch.Tensor, labels: torch.Tensor, palette: Optional[np.ndarray] = None,
                      count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) of the first ``count`` crops as (n, h, w, 3) uint8 RGB colours (TensorBoard's
    images): ``out`` (N, C, h, w) scores, ``labels`` (N, h, w) class indices (255 void), ``palette`` (256, 3)
    uint8 RGB colours of the label values (the dataset's, ``data.layouts.palette``; None: VOC's)."""
    palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
    pred = out[:count].detach().argmax(1).to(torch.uint8).cpu().numpy()
    lab = labels[:count].to(torch.uint8).cpu().numpy()
    return palette[pred], palette[lab]


def train(
    model: nn.Module,
    samples: list[Sample],
    settings: "TrainConfig",
    checkpoint_dir: Path,
    *,
    crop_size: int,
    label_pad_beg: int = 0,
    seed: int = 0,
    num_classes: int = 21,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra_state: Optional[dict] = None,
    tensorboard: Optional[Any] = None,
    palette: Optional[np.ndarray] = None,
) -> TrainResult:
    """Train ``model`` for ``settings.iterations`` iterations, resuming from the last checkpoint.

    Every rank of a torch.distributed job (``deeplab_v1.distributed``) calls this; the model is wrapped
    in DDP, each rank takes its ``batch_size x iter_size`` of the global batch (``data.loader``), and rank
    0 alone writes checkpoints and logs. One process with batch b x iter_size I x world W gives the same
    weights as any other split of the same b x I x W (to float rounding) when every forward has the same
    number of valid labels: Caffe's loss is normalised per forward.

    Args:
        model: built and initialised (the runner loads ``init:``); trained in place.
        samples: training samples (image + label paths).
        settings: the experiment's ``train:`` section (``deeplab_v1.config.TrainConfig``): solver, lr
            multipliers, crop, mirror, scaling, label mode, checkpoint and log intervals, loader workers,
            precision, compile, channels_last, sync_batchnorm.
        checkpoint_dir: where ``iter_<N>.pth`` and ``final.pth`` go.
        crop_size: the crop side in pixels (``settings.crop_size`` or the variant's release crop).
        label_pad_beg: the label shrink's ``pad_beg`` (``VGGDeepLabSpec.train_label_pad_beg``).
        seed: the experiment's seed (data order, crops, dropout).
        num_classes: label values above it (but 255) are errors.
        extra_state: metadata stored in every checkpoint (model name, options, config).
        tensorboard: a ``torch.utils.tensorboard.SummaryWriter`` (rank 0) for loss, lr and predictions.
        palette: (256, 3) uint8 RGB colours of the TensorBoard label images (``data.layouts.palette``;
            None: VOC's colour map).

    Returns:
        ``TrainResult`` with the final checkpoint path.

    Raises:
        ValueError: no samples, a score/label size mismatch (wrong crop for the model), or a checkpoint
            that belongs to another model.
        TrainingDiverged: a non-finite loss (on every rank: the loss is the mean over ranks).
    """
    if not samples:
        raise ValueError("no training samples")
    device = torch.device(device)
    info = distributed.current()
    s = settings
    full_resolution = bool(getattr(model, "full_resolution", False))  # the CRF inside the net: crop labels
    dataset = TrainDataset(
        samples, crop_size, mirror=s.mirror, seed=seed,
        label_shrink=8 if s.label_mode == "shrink" and not full_resolution else None, label_pad_beg=label_pad_beg,
        num_classes=num_classes, scale_range=tuple(s.scale_range) if s.scale_range else None,
    )
    model.to(device)
    to_memory_format(model, s.channels_last)
    if s.sync_batchnorm and info.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = caffe_param_groups(model, s.base_lr, s.weight_decay, s.classifier_lr_mult,
                                lr_mult=dict(s.lr_mult) if s.lr_mult else None)
    optimizer = CaffeSGD(groups, momentum=s.momentum)
    scaler = grad_scaler(device, s.precision)
    checkpoint_dir = Path(checkpoint_dir)
    per_iter = s.batch_size * s.iter_size * info.world  # the global batch
    start, position = 0, 0
    found = _load_resume_state(checkpoint_dir, log)
    if found is not None:
        last, state = found
        if extra_state and state.get("model") not in (None, extra_state.get("model")):
            raise CheckpointError(f"{last}: checkpoint of model {state.get('model')!r}, this run trains {extra_state.get('model')!r}")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        if scaler is not None and state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        start = int(state["iteration"])
        # samples seen so far: checkpoints from before the loader kept none (one process, this batch)
        position = int(state.get("samples_seen", start * s.batch_size * s.iter_size))
        log(f"resuming from {last.name} (iteration {start}, {position} samples seen)")
    t0 = time.perf_counter()
    loss_value = float("nan")

    def save(iteration: int, path: Path) -> None:
        if not info.is_main:
            return
        save_checkpoint(path, {
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "iteration": iteration, "samples_seen": position + (iteration - start) * per_iter,
            "world_size": info.world, **({"scaler_state": scaler.state_dict()} if scaler is not None else {}),
            **(extra_state or {}),
        })

    net: nn.Module = model
    if info.active:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = maybe_compile(net, s.compile)
    batches = TrainBatches(position, start, s.iterations, s.batch_size, s.iter_size, info.rank, info.world)
    workers = loader_workers(s.num_workers, info.local_world)
    stream = iter(train_loader(dataset, batches, num_workers=workers, device=device)) if len(batches) else iter(())
    if start < s.iterations:
        log(f"loader: {workers} worker process(es) per rank, {info.world} rank(s), global batch {per_iter} "
            f"({s.batch_size} x iter_size {s.iter_size} x {info.world}), precision {s.precision}")
    bar = tqdm(range(start, s.iterations), initial=start, total=s.iterations, desc="train",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    model.train()
    if hasattr(model, "bn_frozen") and getattr(model, "bn_frozen"):
        model.apply(lambda m: m.eval() if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
    memory = torch.channels_last if s.channels_last else torch.contiguous_format
    for it in bar:
        lr = learning_rate(it, base_lr=s.base_lr, policy=s.lr_policy, gamma=s.gamma, step_size=s.step_size,
                           power=s.power, max_iter=s.iterations)
        optimizer.set_lr(lr)
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed * 1_000_003 + it)  # any unkeyed randomness stays reproducible
        total = torch.zeros((), dtype=torch.float64, device=device)
        for k in range(s.iter_size):
            images, labels, keys = next(stream)
            x = images.to(device, non_blocking=True).contiguous(memory_format=memory)
            y = labels.to(device, non_blocking=True)
            # gradients are exchanged once per iteration, after the last micro-batch (Caffe's iter_size)
            sync = net.no_sync() if info.active and k < s.iter_size - 1 else contextlib.nullcontext()
            with sync:
                with dropout_keys(model, keys.tolist()), autocast(device, s.precision):
                    out = forward(x)
                out = out.float()
                if s.label_mode == "upsample" and not full_resolution:
                    out = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=True)
                elif out.shape[-2:] != y.shape[-2:]:
                    raise ValueError(
                        f"score map {tuple(out.shape[-2:])} and shrunk labels {tuple(y.shape[-2:])} differ: crop "
                        f"{crop_size} does not suit this model (the release uses 321, or 306 for 'deeplab')"
                    )
                loss = segmentation_loss(out, y) / s.iter_size
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.detach().double()
        loss_value = float(distributed.all_sum(total)) / info.world
        if not np.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at iteration {it + 1}: training diverged (lower train.base_lr, or start from an init)"
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        done = it + 1
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if done % s.log_every == 0 or done == s.iterations:
            log(f"iter {done}/{s.iterations} loss {loss_value:.4f} lr {lr:.3e} ({position + (done - start) * per_iter} crops)")
            if tensorboard is not None and info.is_main:
                tensorboard.add_scalar("train/loss", loss_value, done)
                tensorboard.add_scalar("train/lr", lr, done)
        if tensorboard is not None and info.is_main and (done % s.checkpoint_every == 0 or done == s.iterations):
            pred, lab = prediction_images(out, y, palette)
            tensorboard.add_images("train/prediction", pred, done, dataformats="NHWC")
            tensorboard.add_images("train/label", lab, done, dataformats="NHWC")
        if done % s.checkpoint_every == 0 or done == s.iterations:
            save(done, checkpoint_dir / f"iter_{done}.pth")
    bar.close()
    del stream
    final = checkpoint_dir / "final.pth"
    if info.is_main:
        save_checkpoint(final, {"state_dict": model.state_dict(), **(extra_state or {}), "iteration": s.iterations})
    seconds = time.perf_counter() - t0
    log(f"trained {s.iterations - start} iterations in {seconds:.1f} s (resumed from {start}); final loss {loss_value:.4f}")
    return TrainResult(s.iterations, start, loss_value, seconds, final)
