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

import fnmatch
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..models.crf_rnn import CRFasRNN

#: The layer name of a ``CRFasRNN`` model's CRF parameters (``train.lr_mult`` pattern ``crf``).
CRF_LAYER = "crf"


def layer_name_of(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the layer name that ``lr_mult`` patterns match: the Caffe layer name for the v1
    models (``conv1_1``, ``fc8``, ``pool3_ms`` ...; ``DeepLabVGG.caffe_layer_names``), else the module
    path (``backbone.layer1.0.conv1``, ``aspp.project.0``). A ``CRFasRNN`` model's network parameters
    (``dcnn.*``) have the network's own layer names, its CRF parameters (``crf.*``) the name ``crf``."""
    if isinstance(model, CRFasRNN):
        inner = {f"dcnn.{k}": v for k, v in layer_name_of(model.dcnn).items()}
        return {**inner, **{f"crf.{k}": CRF_LAYER for k, _ in model.crf.named_parameters()}}
    out = {name: name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
    if hasattr(model, "caffe_layer_names"):
        prefix = {id(m): n for n, m in model.named_modules()}
        for layer in model.caffe_layer_names():
            mod = prefix[id(model.caffe_layer(layer))]
            for pname, _ in model.caffe_layer(layer).named_parameters():
                out[f"{mod}.{pname}"] = layer
    return out


def match_lr_mult(layer: str, lr_mult: Mapping[str, Sequence[float]]) -> Optional[tuple[float, float]]:
    """The (weight, bias) multipliers of the first ``lr_mult`` pattern (``fnmatch`` glob, case-sensitive)
    that matches ``layer``, or None."""
    for pattern, mults in lr_mult.items():
        if fnmatch.fnmatchcase(layer, pattern):
            return float(mults[0]), float(mults[1])
    return None


def unmatched_lr_mult(model: nn.Module, patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the ``lr_mult`` patterns that match no layer of ``model``, in their order; the model's layer names
    (``layer_name_of``), sorted): a pattern that matches nothing is a typo, checked before any work."""
    layers = sorted(set(layer_name_of(model).values()))
    return [p for p in patterns if not any(fnmatch.fnmatchcase(layer, p) for layer in layers)], layers


def caffe_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, classifier_lr_mult: float = 10.0,
    classifier_prefixes: tuple[str, ...] = ("fc8", "msc.", "classifier", "aspp", "decoder"),
    lr_mult: Optional[Mapping[str, Sequence[float]]] = None,
) -> list[dict]:
    """Parameter groups with Caffe's multipliers (``blobs_lr`` and ``weight_decay`` of ``train.prototxt``).

    Default: weights lr x1 decay x1, biases lr x2 decay 0, and the newly initialised classifier layers (fc8
    and the MSc branches in v1; the v3 heads) x``classifier_lr_mult`` (the release's fc8 x10 / x20).

    ``lr_mult`` (``train.lr_mult`` of an experiment) overrides that per layer group: an ordered mapping of
    glob patterns over layer names (``layer_name_of``) to ``[weight, bias]`` multipliers, first match
    wins; layers no pattern matches keep the default. A multiplier of 0 freezes that blob (Caffe
    ``blobs_lr: 0``): it is left out of the groups and its ``requires_grad`` is switched off, so it stays
    bit-identical. Example, the release's DeepLab-MSc-LargeFOV (``train.prototxt``)::

        {"conv*": [0, 0], "fc*": [0, 0], "*_conv": [1, 2], "*_fc": [1, 2], "*_ms": [1, 2]}

    Each group carries ``lr_mult`` so the schedule can rescale it. BatchNorm parameters (v3) count as
    biases (no decay). Parameters with ``requires_grad=False`` are left out.

    A ``CRFasRNN`` model (issue #24 item 3): the network's parameters as above (by their names inside
    ``dcnn``), the CRF layer's (kernel log-gains, compatibility) in a group of their own, lr x1 by default
    or the weight multiplier of the ``lr_mult`` pattern that matches ``crf``, never weight decay (decay
    would pull the compatibility towards 0, not towards its Potts start).
    """
    names = layer_name_of(model)
    wrapped = isinstance(model, CRFasRNN)
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    for full, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_crf = wrapped and names[full] == CRF_LAYER
        # the network's own parameter name, for the classifier rule below
        name = full[len("dcnn."):] if wrapped and full.startswith("dcnn.") else full
        is_bias = not is_crf and (name.endswith(".bias") or p.ndim == 1)
        explicit = match_lr_mult(names[full], lr_mult) if lr_mult else None
        if explicit is not None:
            lr_mult_p = explicit[1] if is_bias else explicit[0]
            if lr_mult_p == 0:
                p.requires_grad_(False)
                continue
        elif is_crf:
            lr_mult_p = 1.0
        else:
            new_layer = name.startswith(classifier_prefixes) and not name.startswith("backbone")
            lr_mult_p = (2.0 if is_bias else 1.0) * (classifier_lr_mult if new_layer else 1.0)
        decay_mult = 0.0 if is_bias or is_crf else 1.0
        groups.setdefault((lr_mult_p, decay_mult, is_crf), []).append(p)
    return [
        {"params": ps, "lr": base_lr * lr_mult, "lr_mult": lr_mult, "weight_decay": weight_decay * decay_mult}
        for (lr_mult, decay_mult, _), ps in sorted(groups.items())
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
