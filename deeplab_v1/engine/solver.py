"""Caffe's SGD solver, as the release's ``solver.prototxt`` runs it.

Source: ``solver.prototxt`` (base_lr 0.001, lr_policy "step", gamma 0.1, stepsize 2000, momentum 0.9,
weight_decay 0.0005) and the layers' ``blobs_lr`` / ``weight_decay`` multipliers in ``train.prototxt``
(weights x1, biases x2 and no decay; fc8 x10 / x20). v3 (DeepLab v3 Sec. 4) uses the "poly" policy.

Caffe's update differs from ``torch.optim.SGD`` in where the learning rate enters: Caffe keeps
``v = momentum * v + lr * (grad + decay * w)`` and ``w -= v`` (the velocity carries the lr it was made
with, which matters at each lr step), torch keeps ``v = momentum * v + grad``, ``w -= lr * v``.
``CaffeSGD`` implements Caffe's form.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def caffe_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, classifier_lr_mult: float = 10.0,
    classifier_prefixes: tuple[str, ...] = ("fc8", "msc.", "classifier", "aspp", "decoder"),
) -> list[dict]:
    """Parameter groups with Caffe's multipliers: weights lr x1 decay x1, biases lr x2 decay 0, and the
    newly initialised classifier layers (fc8 and the MSc branches in v1; the v3 heads) x``classifier_lr_mult``.

    Each group carries ``lr_mult`` so the schedule can rescale it. BatchNorm parameters (v3) count as
    biases (no decay). Parameters with ``requires_grad=False`` are left out.
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith(".bias") or p.ndim == 1
        new_layer = name.startswith(classifier_prefixes) and not name.startswith("backbone")
        lr_mult = (2.0 if is_bias else 1.0) * (classifier_lr_mult if new_layer else 1.0)
        decay_mult = 0.0 if is_bias else 1.0
        groups.setdefault((lr_mult, decay_mult), []).append(p)
    return [
        {"params": ps, "lr": base_lr * lr_mult, "lr_mult": lr_mult, "weight_decay": weight_decay * decay_mult}
        for (lr_mult, decay_mult), ps in sorted(groups.items())
    ]


def learning_rate(iteration: int, *, base_lr: float, policy: str, gamma: float = 0.1, step_size: int = 2000,
                  power: float = 0.9, max_iter: int = 1) -> float:
    """Caffe's lr policies at ``iteration`` (0-based): ``step``: base_lr * gamma^floor(it / step_size);
    ``poly``: base_lr * (1 - it / max_iter)^power.

    Raises:
        ValueError: unknown policy.
    """
    if policy == "step":
        return base_lr * gamma ** (iteration // step_size)
    if policy == "poly":
        return base_lr * max(0.0, 1.0 - iteration / max(1, max_iter)) ** power
    raise ValueError(f"unknown lr policy {policy!r}; expected 'step' or 'poly'")


class CaffeSGD(torch.optim.Optimizer):
    """SGD with momentum and L2 decay in Caffe's form (see the module docstring).

    Args:
        params: parameter groups, each with ``lr`` and ``weight_decay`` (already multiplied).
        momentum: 0.9 in the release.
    """

    def __init__(self, params: Iterable, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": 0.0, "weight_decay": 0.0, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if decay:
                    grad = grad.add(p, alpha=decay)
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(momentum).add_(grad, alpha=lr)
                p.sub_(v)
        return None

    def set_lr(self, rate: float) -> None:
        """Set every group's lr to ``rate * lr_mult``."""
        for group in self.param_groups:
            group["lr"] = rate * group.get("lr_mult", 1.0)
