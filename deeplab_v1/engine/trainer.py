"""Iteration-based training as the release's Caffe solver runs it.

Source: ``solver.prototxt`` and ``train.prototxt`` of deeplab-public (see ``solver.py``); paper Sec. 3.1
("the sum of cross-entropy terms for each spatial position in the CNN output map (subsampled by 8)",
"targets are the ground truth labels (subsampled by 8)"); DeepLab v3 Sec. 4 for the v3 options (poly lr,
logits upsampled to the labels, random scaling, BN fine-tuned or frozen).

Determinism and resume: the sample order is a permutation per epoch drawn from (seed, epoch); the crop and
mirror of a sample from (seed, epoch, index); dropout from (seed, iteration). A resumed run therefore
continues exactly as an uninterrupted one. Checkpoints ``checkpoints/iter_<N>.pth`` are written atomically
every ``checkpoint_every`` iterations and at the end; ``checkpoints/final.pth`` holds the trained weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.datasets import TrainDataset
from ..data.lists import Sample
from ..errors import DeepLabError
from .checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint
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


def _batch_indices(position: int, count: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, index) of the ``count`` samples starting at global sample ``position``."""
    out = []
    perms: dict[int, np.ndarray] = {}
    for p in range(position, position + count):
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append((epoch, int(perms[epoch][p % n])))
    return out


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
) -> TrainResult:
    """Train ``model`` for ``settings.iterations`` iterations, resuming from the last checkpoint.

    Args:
        model: built and initialised (the runner loads ``init:``); trained in place.
        samples: training samples (image + label paths).
        settings: the experiment's ``train:`` section (``deeplab_v1.config.TrainConfig``): solver, lr
            multipliers, crop, mirror, scaling, label mode, checkpoint and log intervals.
        checkpoint_dir: where ``iter_<N>.pth`` and ``final.pth`` go.
        crop_size: the crop side in pixels (``settings.crop_size`` or the variant's release crop).
        label_pad_beg: the label shrink's ``pad_beg`` (``VGGDeepLabSpec.train_label_pad_beg``).
        seed: the experiment's seed (data order, crops, dropout).
        num_classes: label values above it (but 255) are errors.
        extra_state: metadata stored in every checkpoint (model name, options, config).

    Returns:
        ``TrainResult`` with the final checkpoint path.

    Raises:
        ValueError: no samples, a score/label size mismatch (wrong crop for the model), or a checkpoint
            that belongs to another model.
    """
    if not samples:
        raise ValueError("no training samples")
    device = torch.device(device)
    s = settings
    dataset = TrainDataset(
        samples, crop_size, mirror=s.mirror, seed=seed,
        label_shrink=8 if s.label_mode == "shrink" else None, label_pad_beg=label_pad_beg,
        num_classes=num_classes, scale_range=tuple(s.scale_range) if s.scale_range else None,
    )
    model.to(device)
    groups = caffe_param_groups(model, s.base_lr, s.weight_decay, s.classifier_lr_mult,
                                lr_mult=dict(s.lr_mult) if s.lr_mult else None)
    optimizer = CaffeSGD(groups, momentum=s.momentum)
    checkpoint_dir = Path(checkpoint_dir)
    start = 0
    found = load_latest_checkpoint(checkpoint_dir, warn=log)
    if found is not None:
        last, state = found
        if extra_state and state.get("model") not in (None, extra_state.get("model")):
            raise CheckpointError(f"{last}: checkpoint of model {state.get('model')!r}, this run trains {extra_state.get('model')!r}")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        start = int(state["iteration"])
        log(f"resuming from {last.name} (iteration {start})")
    per_iter = s.batch_size * s.iter_size
    t0 = time.perf_counter()
    loss_value = float("nan")

    def save(iteration: int, path: Path) -> None:
        save_checkpoint(path, {
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "iteration": iteration, **(extra_state or {}),
        })

    bar = tqdm(range(start, s.iterations), initial=start, total=s.iterations, desc="train", disable=not progress,
               dynamic_ncols=True)
    model.train()
    if hasattr(model, "bn_frozen") and getattr(model, "bn_frozen"):
        model.apply(lambda m: m.eval() if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
    for it in bar:
        lr = learning_rate(it, base_lr=s.base_lr, policy=s.lr_policy, gamma=s.gamma, step_size=s.step_size,
                           power=s.power, max_iter=s.iterations)
        optimizer.set_lr(lr)
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed * 1_000_003 + it)
        total = 0.0
        for k in range(s.iter_size):
            idx = _batch_indices((it * s.iter_size + k) * s.batch_size, s.batch_size, len(dataset), seed)
            images, labels = [], []
            for epoch, i in idx:
                dataset.set_epoch(epoch)
                img, lab = dataset[i]
                images.append(img)
                labels.append(lab)
            x = torch.stack(images).to(device)
            y = torch.stack(labels).to(device).long()
            out = model(x)
            if s.label_mode == "upsample":
                out = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=True)
            elif out.shape[-2:] != y.shape[-2:]:
                raise ValueError(
                    f"score map {tuple(out.shape[-2:])} and shrunk labels {tuple(y.shape[-2:])} differ: crop "
                    f"{crop_size} does not suit this model (the release uses 321, or 306 for 'deeplab')"
                )
            loss = segmentation_loss(out, y)
            (loss / s.iter_size).backward()
            total += float(loss.detach()) / s.iter_size
        if not np.isfinite(total):
            raise TrainingDiverged(
                f"loss is {total} at iteration {it + 1}: training diverged (lower train.base_lr, or start from an init)"
            )
        optimizer.step()
        loss_value = total
        done = it + 1
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if done % s.log_every == 0 or done == s.iterations:
            log(f"iter {done}/{s.iterations} loss {loss_value:.4f} lr {lr:.3e} ({done * per_iter} crops)")
        if done % s.checkpoint_every == 0 or done == s.iterations:
            save(done, checkpoint_dir / f"iter_{done}.pth")
    bar.close()
    final = checkpoint_dir / "final.pth"
    save_checkpoint(final, {"state_dict": model.state_dict(), **(extra_state or {}), "iteration": s.iterations})
    seconds = time.perf_counter() - t0
    log(f"trained {s.iterations - start} iterations in {seconds:.1f} s (resumed from {start}); final loss {loss_value:.4f}")
    return TrainResult(s.iterations, start, loss_value, seconds, final)
