"""The network a run starts from and the one it tests: built by name, initialised from ``model.init``.

Reads: ``model.init`` (a ``.caffemodel``, a checkpoint of ours or an ImageNet backbone);
``checkpoints/final.pth`` (``trained_model``).

With ``model.crf_rnn.enabled`` the network is ``models.crf_rnn.CRFasRNN`` (the CRF as its last layer):
``model.init`` fills its network (``dcnn``) as it fills the plain one and leaves the CRF layer at
``model.crf_rnn.params``, unless it is a checkpoint of a CRF-as-RNN model (``crf.*`` keys), which fills both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..context import RunContext, StageError
from ..models import CRFasRNN, build_model, release_spec
from ..models.crf_rnn import network_state
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
    source = f"{init.name} (sha256 {file_sha256(init)[:12]})"
    net = model.dcnn if isinstance(model, CRFasRNN) else model  # CRF-as-RNN: the network inside
    if net is not model and _load_crf_rnn_checkpoint(model, init):
        return model, f"{source}: whole CRF-as-RNN model (network and CRF layer) from a checkpoint of ours"
    if release_spec(ctx.cfg.model.name) is not None:  # a v1 variant: the Caffe release's formats
        report = load_init(net, ctx.cfg.model.name, init, num_classes=ctx.cfg.model.num_classes)
    else:
        report = _init_v3(ctx, net, init)
    layer = "; CRF layer at its initial parameters (model.crf_rnn.params)" if net is not model else ""
    return model, f"{source}: {report}{layer}"


def _load_crf_rnn_checkpoint(model: CRFasRNN, path: Path) -> bool:
    """Load ``path`` into the whole ``model`` when it is a checkpoint of a CRF-as-RNN model (its state dict
    has ``crf.*`` keys); False (nothing loaded) for any other file, which then initialises the network alone.

    Raises:
        StageError: a CRF-as-RNN checkpoint that does not fit the model (names the file and the keys).
    """
    if path.suffix.lower() == ".caffemodel":
        return False
    try:
        inner = checkpoint_state_dict(read_checkpoint(path))
    except ValueError:
        return False  # not a torch file: the network's loaders say what it is
    if not isinstance(inner, dict) or not any(str(k).startswith("crf.") for k in inner):
        return False
    try:
        model.load_state_dict(inner)
    except RuntimeError as exc:
        raise StageError(f"model.init: {path} is a CRF-as-RNN checkpoint that does not fit "
                         f"{type(model.dcnn).__name__} with this layer: {str(exc).splitlines()[0]}") from exc
    return True


def _init_v3(ctx: RunContext, model: torch.nn.Module, path: Path) -> str:
    """A v3/v3+ model from our checkpoint (whole model) or an ImageNet ResNet checkpoint in the common
    PyTorch layout (backbone only; the heads keep their initialisation)."""
    try:
        state = read_checkpoint(path)
    except ValueError as exc:
        raise StageError(f"model.init: cannot read {path}: {exc}") from exc
    inner = checkpoint_state_dict(state)
    if isinstance(inner, dict):
        model.load_state_dict(network_state(inner))
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
