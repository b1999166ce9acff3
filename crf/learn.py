"""Fitting the dense CRF's kernel weights and label compatibility by gradient on cached scores.

The paper picks ``w1``, ``sigma_alpha``, ``sigma_beta`` by grid search on held-out images (DeepLab v1
Sec. 5); its Sec. 6 names end-to-end learning as the next step. :func:`fit_crf` starts from given
parameters (e.g. the grid's best), keeps the kernel widths (they define the lattices) and fits the
listed parameters of a :class:`~crf.layer.DenseCRFLayer` by minimising the mean cross-entropy of the
mean-field marginals Q to the ground truth (void 255 ignored), over mini-batches of images, with early
stopping on a held-out share of the images. Each image's lattices are built once and reused by every
step.

Source: Krähenbühl & Koltun ICML 2013 (parameter learning of dense CRFs); Zheng et al. ICCV 2015;
issue #24 item 2.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .confusion import confusion, miou, pixel_accuracy
from .dense import dense_crf
from .errors import CRFInputError
from .inputs import PROB_EPSILON, check_inputs
from .layer import LEARNABLE, CRFLattices, DenseCRFLayer
from .params import CRFParams

__all__ = ["FitResult", "fit_crf", "score_crfs"]

#: The ground truth's void label, ignored by the objective.
IGNORE_LABEL = 255


@dataclass
class FitResult:
    """What :func:`fit_crf` found; :meth:`to_dict` is JSON-serialisable.

    Attributes:
        learn: the fitted parameters' names.
        initial: the parameters the fit started from. params: the fitted ones (``w1``/``w2`` learned or
            as given; widths as given; ``iterations`` the number the fit ran).
        compatibility: ``C x C`` label compatibility (densecrf's sign: ``-I`` is Potts with weight 1;
            kernel k's compatibility is ``w_k`` times it), symmetric.
        objective: ``{"fit": {"before", "after"}, "held_out": {"before", "after"} or None}``: the mean
            cross-entropy per labelled pixel (nats) at the initial and the returned parameters.
        fit_images, held_out_images: indices into the inputs. epochs_run, best_epoch (0 = the initial
            parameters were best), steps: optimiser steps taken. history: per epoch the mean mini-batch
            loss and the held-out objective. settings: the fit's arguments. seconds: wall time.
    """

    learn: list[str]
    initial: CRFParams
    params: CRFParams
    compatibility: list[list[float]]
    objective: dict
    fit_images: list[int]
    held_out_images: list[int]
    epochs_run: int
    best_epoch: int
    steps: int
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON types only (the parameters as dicts)."""
        out = asdict(self)
        out["initial"], out["params"] = self.initial.to_dict(), self.params.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "FitResult":
        """Inverse of :meth:`to_dict`. Raises CRFInputError (a ValueError) for missing or unknown keys."""
        known = set(cls.__dataclass_fields__)
        if not isinstance(values, dict) or set(values) - known or {"learn", "params", "compatibility"} - set(values):
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise CRFInputError(f"a CRF fit result needs the keys {sorted(known)}, got {got}")
        values = dict(values)
        values["initial"] = CRFParams.from_dict(values["initial"])
        values["params"] = CRFParams.from_dict(values["params"])
        return cls(**values)


def _checked_item(index: int, image, inputs, label, inputs_are: str, classes: int | None):
    """(image uint8 (H, W, 3), scores float32 (C, H, W), label int64 (H, W)) of item ``index``."""
    where = f"item {index}"
    if inputs_are == "probs":
        try:
            image, probs = check_inputs(image, inputs)
        except (TypeError, ValueError) as exc:
            raise CRFInputError(f"{where}: {exc}") from exc
        scores = np.log(np.maximum(probs, PROB_EPSILON))
    else:
        scores = np.asarray(inputs, dtype=np.float32)
        image = np.asarray(image)
        if scores.ndim != 3 or image.shape != (*scores.shape[1:], 3) or image.dtype != np.uint8:
            raise CRFInputError(f"{where}: scores must be (C, H, W) and the image uint8 (H, W, 3), got "
                                f"{scores.shape} and {image.shape} {image.dtype}")
        if not np.isfinite(scores).all():
            raise CRFInputError(f"{where}: scores must be finite")
    if classes is not None and scores.shape[0] != classes:
        raise CRFInputError(f"{where}: C={scores.shape[0]} classes, item 0 has C={classes}")
    label = np.asarray(label)
    if label.shape != scores.shape[1:] or not np.issubdtype(label.dtype, np.integer):
        raise CRFInputError(f"{where}: labels must be integers of shape {scores.shape[1:]}, got {label.shape} {label.dtype}")
    bad = (label != IGNORE_LABEL) & ((label < 0) | (label >= scores.shape[0]))
    if bad.any():
        raise CRFInputError(f"{where}: label values {sorted(set(label[bad].tolist()))[:5]} are neither a class "
                            f"0..{scores.shape[0] - 1} nor {IGNORE_LABEL}")
    return image, np.ascontiguousarray(scores, dtype=np.float32), label.astype(np.int64)


def _split(count: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 <= held_out < 1:
        raise CRFInputError(f"held_out must be a share in [0, 1), got {held_out!r}")
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_held = 0 if held_out == 0 else min(count - 1, max(1, round(held_out * count)))
    if held_out > 0 and count < 2:
        raise CRFInputError(f"held_out={held_out} needs at least 2 images, got {count}")
    return sorted(order[n_held:]), sorted(order[:n_held])


def fit_crf(
    images: Sequence[np.ndarray],
    probs_or_scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    params: CRFParams,
    *,
    learn: Sequence[str] = LEARNABLE,
    inputs_are: str = "probs",
    iterations: int | None = None,
    epochs: int = 10,
    batch: int = 4,
    held_out: float = 0.25,
    patience: int = 2,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[dict], None] | None = None,
) -> FitResult:
    """Fit the listed CRF parameters by gradient on cached class maps.

    Args:
        images: B RGB uint8 ``(H_b, W_b, 3)`` arrays (sizes may differ).
        probs_or_scores: B float ``(C, H_b, W_b)`` arrays: probabilities (``inputs_are="probs"``; the
            unary is ``-log(max(P, PROB_EPSILON))`` as in the post-hoc CRF) or logits (``"scores"``).
        labels: B integer ``(H_b, W_b)`` ground truths, classes ``0..C-1`` and 255 (void, ignored).
        params: the starting parameters (their widths define the lattices and stay fixed).
        learn: which of ``"w1"``, ``"w2"``, ``"compatibility"`` to fit (non-empty).
        iterations: mean-field iterations during the fit; None = ``params.iterations``.
        epochs: passes over the fit share (most); batch: images per optimiser step (Adam, ``lr``).
        held_out: share of the images kept out of the fit (chosen with ``seed``); their objective is
            evaluated after every epoch, the best epoch's parameters are returned and the fit stops after
            ``patience`` epochs without improvement. 0 = no held-out share (the last epoch is returned).
        device: where to compute; progress: called with each epoch's history entry.

    Returns:
        :class:`FitResult` (``to_dict()`` for JSON).

    Raises:
        CRFInputError (a ValueError): inputs of different lengths or none, a bad item (named by index), a
            bad ``learn``, ``inputs_are``, ``held_out``, ``epochs``, ``batch``, ``patience`` or ``lr``, a
            held-out share with fewer than 2 images, or no labelled pixel in the fit share.
    """
    if not (len(images) == len(probs_or_scores) == len(labels)) or len(images) == 0:
        raise CRFInputError(f"images, probs_or_scores and labels must be non-empty and of equal length, got "
                            f"{len(images)}, {len(probs_or_scores)} and {len(labels)}")
    if inputs_are not in ("probs", "scores"):
        raise CRFInputError(f"inputs_are must be 'probs' or 'scores', got {inputs_are!r}")
    if isinstance(learn, str) or not learn:
        raise CRFInputError(f"learn must be a non-empty sequence of names from {list(LEARNABLE)}, got {learn!r}")
    for name, value, low in (("epochs", epochs, 1), ("batch", batch, 1), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CRFInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise CRFInputError(f"lr must be a finite number > 0, got {lr!r}")
    items, classes = [], None
    for index, item in enumerate(zip(images, probs_or_scores, labels)):
        items.append(_checked_item(index, *item, inputs_are, classes))
        classes = items[0][1].shape[0]
    fit_ids, held_ids = _split(len(items), held_out, seed)
    start = time.perf_counter()
    dev = torch.device(device)
    layer = DenseCRFLayer(classes, params, learn=learn, iterations=iterations).to(dev)
    data = []  # (lattices, scores (1, C, H, W), labels (1, H, W), labelled pixels)
    for image, scores, label in items:
        rgb = torch.from_numpy(image).to(dev).permute(2, 0, 1)[None]
        data.append((layer.prepare(rgb), torch.from_numpy(scores).to(dev)[None],
                     torch.from_numpy(label).to(dev)[None], int((label != IGNORE_LABEL).sum())))
    if sum(data[i][3] for i in fit_ids) == 0:
        raise CRFInputError("the fit share has no labelled pixel (every label is 255)")

    def objective(ids: list[int]) -> float | None:
        total, count = 0.0, sum(data[i][3] for i in ids)
        if not ids or count == 0:
            return None
        with torch.no_grad():
            for i in ids:
                total += float(_cross_entropy(layer, data[i], reduction="sum"))
        return total / count

    before = {"fit": objective(fit_ids), "held_out": objective(held_ids)}
    best = (before["held_out"], 0, _snapshot(layer))
    optimizer = torch.optim.Adam(layer.parameters(), lr=float(lr))
    rng = np.random.default_rng(seed + 1)
    history, steps, epoch, stale = [], 0, 0, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(fit_ids).tolist()
        losses = []
        for b0 in range(0, len(order), batch):
            chunk = order[b0 : b0 + batch]
            count = sum(data[i][3] for i in chunk)
            if count == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for i in chunk:  # one image's graph at a time: memory of one image, gradients summed
                loss = _cross_entropy(layer, data[i], reduction="sum") / count
                loss.backward()
                loss_value += float(loss.detach())
            optimizer.step()
            steps += 1
            losses.append(loss_value)
        held = objective(held_ids)
        entry = {"epoch": epoch, "fit_batch_loss": float(np.mean(losses)), "held_out": held,
                 **{k: v for k, v in _values(layer).items() if k != "compatibility"}}
        history.append(entry)
        if progress is not None:
            progress(entry)
        if held is None:
            best = (None, epoch, _snapshot(layer))
        elif held < best[0]:
            best, stale = (held, epoch, _snapshot(layer)), 0
        else:
            stale += 1
            if stale >= patience:
                break
    layer.load_state_dict(best[2])
    after = {"fit": objective(fit_ids), "held_out": objective(held_ids)}
    values = _values(layer)
    fitted = CRFParams.from_dict({**params.to_dict(), "w1": values["w1"], "w2": values["w2"],
                                  "iterations": layer.iterations or params.iterations})
    return FitResult(
        learn=list(layer.learn), initial=params, params=fitted, compatibility=values["compatibility"],
        objective={"fit": {"before": before["fit"], "after": after["fit"]},
                   "held_out": None if not held_ids else {"before": before["held_out"], "after": after["held_out"]}},
        fit_images=fit_ids, held_out_images=held_ids, epochs_run=epoch, best_epoch=best[1], steps=steps,
        history=history, seconds=time.perf_counter() - start,
        settings={"inputs_are": inputs_are, "iterations": layer.iterations, "epochs": epochs, "batch": batch,
                  "held_out": held_out, "patience": patience, "lr": float(lr), "seed": seed},
    )


def score_crfs(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    crfs: dict[str, tuple[CRFParams, object] | None],
    *,
    trimap_width: int = 5,
    band: str = "void",
    backend: str = "pydensecrf",
    device: str = "cpu",
) -> dict:
    """mIoU, pixel accuracy and trimap mIoU of several CRFs (and no CRF) on the same images, to compare the
    grid's best with a fitted CRF on images neither was chosen on (issue #24 item 4).

    Args:
        images, probs, labels: B RGB uint8 ``(H, W, 3)``, ``(C, H, W)`` probabilities, integer ``(H, W)``
            ground truths (255 void).
        crfs: name -> ``(params, compatibility)`` (compatibility a ``(C, C)`` matrix in densecrf's
            convention, or None for Potts), or None for the DCNN's own labels (``argmax P``).
        trimap_width: the band width, pixels; band: ``"void"`` or ``"boundary"`` (``crf.trimap``).
        backend, device: as for :func:`crf.dense.dense_crf` (the same one for every CRF).

    Returns:
        ``{"images": B, "trimap_width": w, "band": band, <name>: {"miou", "pixel_accuracy", "trimap_miou"}}``
        (fractions 0..1, NaN where nothing was counted): one confusion matrix over all images, the trimap's
        over the band's pixels (as the evaluation scores a split).

    Raises:
        CRFInputError (a ValueError): inputs of different lengths or none, or what ``dense_crf`` raises.
    """
    from .trimap import trimap_band

    if not (len(images) == len(probs) == len(labels)) or len(images) == 0:
        raise CRFInputError(f"images, probs and labels must be non-empty and of equal length, got "
                            f"{len(images)}, {len(probs)} and {len(labels)}")
    c = int(np.asarray(probs[0]).shape[0])
    whole = {name: np.zeros((c, c), np.int64) for name in crfs}
    near = {name: np.zeros((c, c), np.int64) for name in crfs}
    for image, p, label in zip(images, probs, labels):
        label = np.asarray(label)
        in_band = trimap_band(label, trimap_width, band=band)
        for name, crf in crfs.items():
            q = p if crf is None else dense_crf(image, p, crf[0], backend=backend, device=device,
                                                 compatibility=crf[1])
            pred = np.asarray(q).argmax(0)
            whole[name] += confusion(label, pred, c)
            near[name] += confusion(label, pred, c, mask=in_band)
    out: dict = {"images": len(images), "trimap_width": trimap_width, "band": band}
    for name in crfs:
        out[name] = {"miou": miou(whole[name]), "pixel_accuracy": pixel_accuracy(whole[name]),
                     "trimap_miou": miou(near[name])}
    return out


def _cross_entropy(layer: DenseCRFLayer, item: tuple[CRFLattices, torch.Tensor, torch.Tensor, int],
                   reduction: str) -> torch.Tensor:
    lattices, scores, label, _ = item
    return F.cross_entropy(layer(None, scores, lattices=lattices), label, ignore_index=IGNORE_LABEL,
                           reduction=reduction)


def _snapshot(layer: DenseCRFLayer) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _values(layer: DenseCRFLayer) -> dict:
    with torch.no_grad():
        return {"w1": float(layer.kernel_weight("w1")), "w2": float(layer.kernel_weight("w2")),
                "compatibility": layer.compatibility().cpu().double().tolist()}
