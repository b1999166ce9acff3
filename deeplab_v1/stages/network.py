"""The network a run starts from and the one it tests: built by name, initialised from ``model.init``.

Reads: ``model.init`` (a ``.caffemodel``, a checkpoint of ours or an ImageNet backbone);
``checkpoints/final.pth`` (``trained_model``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..context import RunContext, StageError
from ..models import build_model, release_spec
from ..weights.checkpoint import checkpoint_state_dict, file_sha256, load_checkpoint, read_checkpoint
from ..weights.loading import load_init


def build(ctx: RunContext) -> torch.nn.Module:
    """The experiment's network, freshly initialised (seeded with the experiment's seed)."""
    m = ctx.cfg.model
    torch.manual_seed(ctx.cfg.seed)
    return build_model(m.name, m.num_classes, **m.options())


def initial_model(ctx: RunContext) -> tuple[torch.nn.Module, str]:
    """(network with ``model.init`` loaded, a one-line description of the init for the record).

    v1: ``weights.load_init`` (release / ImageNet ``.caffemodel``, checkpoints, ImageNet ``.pth``);
    v3/v3+: a checkpoint of ours (whole model) or an ImageNet ResNet (backbone only).

    Raises:
        StageError: an init the model cannot take (the message names the file).
    """
    model = build(ctx)
    init = ctx.cfg.model.init
    if init is None:
        return model, "random weights (no init given)"
    if release_spec(ctx.cfg.model.name) is not None:  # a v1 variant: the Caffe release's formats
        report = load_init(model, ctx.cfg.model.name, init, num_classes=ctx.cfg.model.num_classes)
    else:
        report = _init_v3(ctx, model, init)
    return model, f"{init.name} (sha256 {file_sha256(init)[:12]}): {report}"


def _init_v3(ctx: RunContext, model: torch.nn.Module, path: Path) -> str:
    """A v3/v3+ model from our checkpoint (whole model) or an ImageNet ResNet checkpoint in the common
    PyTorch layout (backbone only; the heads keep their initialisation)."""
    try:
        state = read_checkpoint(path)
    except ValueError as exc:
        raise StageError(f"model.init: cannot read {path}: {exc}") from exc
    inner = checkpoint_state_dict(state)
    if isinstance(inner, dict):
        model.load_state_dict(inner)
        return "whole model from a checkpoint of ours"
    load_backbone = getattr(model, "load_imagenet_backbone", None)  # the model says what it can load
    try:
        if load_backbone is None:
            raise NotImplementedError(f"{ctx.cfg.model.name} has no ImageNet backbone to load")
        return load_backbone(path)
    except NotImplementedError as exc:
        raise StageError(f"model.init: {path} is not a checkpoint of ours, and {exc}; "
                         "train from our checkpoint or set model.init: null") from exc


def trained_model(ctx: RunContext) -> torch.nn.Module:
    """The network the test stage runs, in eval mode on the run's device: ``checkpoints/final.pth`` when
    the run trained, else the initial weights; v3/v3+ at ``test.output_stride`` when set."""
    final = ctx.layout.final_checkpoint
    if final.is_file():
        model = build(ctx)
        model.load_state_dict(load_checkpoint(final)["state_dict"])
    else:
        model, _ = initial_model(ctx)
    if ctx.cfg.test.output_stride and release_spec(ctx.cfg.model.name) is None:
        model.set_output_stride(ctx.cfg.test.output_stride)
    return model.to(ctx.device).eval()
