"""Map released Caffe weights, ImageNet VGG-16 weights and our checkpoints onto the DeepLab v1 networks.

Sources accepted (``load_init`` tells them apart by content, not by name):

- a ``.caffemodel`` of the deeplab-public release (``train_iter_6000.caffemodel``, V1 layout) or of any
  Caffe (V2 layout), read by ``deeplab_v1.weights.caffemodel``;
- Caffe's ImageNet VGG-16 (``VGG_ILSVRC_16_layers.caffemodel``: fc6/fc7/fc8 are InnerProduct layers) or
  an already decimated init such as the release's ``vgg16_20M.caffemodel``;
- an ImageNet VGG-16 state dict in the common PyTorch layout (``features.0.weight`` ...; see
  ``deeplab_v1.weights.imagenet``);
- a checkpoint of ours: ``{"state_dict": ...}`` (written by ``convert_caffemodel`` or at the end of
  training) or ``{"model_state": ...}`` (the trainer's resumable checkpoints), or a bare state dict.

Layer matching (Caffe sources): a Caffe layer feeds the model layer of the same name (``conv1_1`` ...
``fc7``, MSc ``data_conv`` ... ``pool4_ms``, see ``DeepLabVGG.caffe_layer_names``), except the classifier:
the release names it ``fc8_<dataset>`` (``fc8_voc12``, ``fc8_pascal``, ``fc8_${EXP}`` in the prototxts),
so ``fc8`` or any one layer named ``fc8_<anything>`` feeds our ``fc8``.

A source is treated as an **ImageNet classifier** (an init model) when its fc6 is an InnerProduct layer,
when it has a layer named exactly ``fc8`` with 1000 outputs (and the model does not have 1000 classes), or
when it has no classifier layer (``fc8`` / ``fc8_*``) at all. Then, as in
paper Sec. 3.2: fc6/fc7 are reshaped to convolutions and decimated to the model's fc6 kernel and width
(``deeplab_v1.weights.imagenet.decimation_indices``), the 1000-way fc8 is dropped (listed as unused), and
fc8 and the MSc branches are allowed to start new. For any other source every layer of the model must be
in the file with exactly the model's shapes, unless named in ``allow_new`` or (fc8) ``reinit_fc8``.

Every shape is checked; the errors (``WeightsError``) name the layer and both shapes.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from .caffemodel import CaffeLayer, CaffeModelError, CaffeNet, read_caffemodel, write_caffemodel

__all__ = [
    "CONVERTER_VERSION",
    "WeightsError",
    "SourceLayer",
    "ConversionReport",
    "InitReport",
    "map_source_layers",
    "caffe_sources",
    "convert_caffemodel",
    "convert_weights",
    "load_checkpoint",
    "load_init",
    "model_to_caffe_layers",
    "export_caffemodel",
    "main",
]

#: Stored in every checkpoint this module writes (``meta.converter_version``).
CONVERTER_VERSION = "1.0"

_IMAGENET_CLASSES = 1000


class WeightsError(ValueError):
    """Weights that do not fit the model: a shape mismatch, a layer missing from the file, a different
    class count in fc8, an unreadable or unrecognised file. The message names the file, the layer and
    the shapes involved."""


@dataclass
class SourceLayer:
    """A parameter layer of a weights source in Caffe terms.

    Attributes:
        name: the layer name in the source (``conv1_1``, ``fc8_voc12``).
        type: ``"Convolution"`` or ``"InnerProduct"`` (other types are refused when mapped).
        blobs: [weight, bias]: convolution (out, in, kh, kw) or InnerProduct (out, in), bias (out,);
            numpy arrays or tensors, float32.
    """

    name: str
    type: str
    blobs: list


@dataclass
class ConversionReport:
    """What a conversion did, layer by layer (Caffe layer names of the model).

    Attributes:
        source: the file (or description) read.
        source_kind: ``caffemodel-V1``, ``caffemodel-V2``, ``imagenet-torchvision``, ``imagenet-caffe``
            or ``checkpoint``; ``+imagenet`` is appended to a caffemodel kind treated as an ImageNet
            classifier (module docstring).
        model: the model's name.
        loaded: model layers whose weights came from the source.
        new: model layers left at their fresh initialisation (allowed: fc8/MSc for ImageNet sources,
            ``reinit_fc8``, ``allow_new``).
        unused: source layers (or checkpoint keys' layers) holding weights that were not used.
        notes: per layer, how it was made (``fc8``: ``from fc8_voc12``; ``fc6``: the decimation).
    """

    source: str
    source_kind: str
    model: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, list, dict), so a checkpoint holding it loads with ``weights_only``."""
        return asdict(self)

    def format(self) -> str:
        """A multi-line, human-readable account (the ``deeplab convert`` output)."""
        lines = [
            f"source: {self.source} ({self.source_kind})",
            f"model: {self.model}",
            f"loaded ({len(self.loaded)}): {', '.join(self.loaded) or '-'}",
            f"new ({len(self.new)}): {', '.join(self.new) or '-'}",
            f"unused ({len(self.unused)}): {', '.join(self.unused) or '-'}",
        ]
        lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        def short(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

        text = f"{self.source_kind}: loaded {len(self.loaded)} layers"
        if self.new:
            text += f"; new: {short(self.new)}"
        if self.unused:
            text += f"; unused: {short(self.unused)}"
        return text


class InitReport(ConversionReport):
    """What ``load_init`` did (same fields as ``ConversionReport``); its ``str`` is the one-line summary
    the experiment runner logs for ``model.init``."""


# --------------------------------------------------------------------------------------------- mapping


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _msc_layer_names(model: nn.Module) -> list[str]:
    return [f"{b}_{part}" for b in getattr(model, "msc", {}) for part in ("conv", "fc", "ms")]


def _expand_allow_new(allow_new: Iterable[str], model: nn.Module, names: Sequence[str]) -> set[str]:
    """``allow_new`` entries: Caffe layer names, ``msc`` (all MSc layers) or an MSc branch (``pool3``)."""
    msc = _msc_layer_names(model)
    out: set[str] = set()
    for entry in allow_new:
        if entry == "msc":
            out.update(msc)
        elif entry in names:
            out.add(entry)
        elif any(n.startswith(f"{entry}_") for n in msc):
            out.update(n for n in msc if n.startswith(f"{entry}_"))
        else:
            raise WeightsError(f"allow_new: {entry!r} is not a layer of this model; layers: {list(names)} or 'msc'")
    return out


def _msc_start_new(model: nn.Module, source_layers: set[str], report: "ConversionReport") -> list[str]:
    """The MSc layers that start new because the source has none of them: the release's MSc protocol
    (paper Sec. 4.3, ``DeepLab-MSc*/train.prototxt``) starts from a trained DeepLab / DeepLab-LargeFOV and
    adds the five branches, so a single-scale source fills the trunk and the branches keep their fillers.
    A source with some but not all branch layers gets no such pass (the missing ones are an error)."""
    msc = _msc_layer_names(model)
    if not msc or any(n in source_layers for n in msc):
        return []
    report.notes["msc"] = ("the source has no MSc branch: data_conv ... pool4_ms start new (the release's MSc "
                           "protocol: branches added to a trained DeepLab)")
    return msc


def _looks_imagenet(sources: Mapping[str, SourceLayer], model: nn.Module) -> bool:
    if "fc6" in sources and sources["fc6"].type == "InnerProduct":
        return True
    if not any(n == "fc8" or n.startswith("fc8_") for n in sources):
        return True  # no classifier at all: an init model (decimated VGG-16 saved without fc8)
    fc8 = sources.get("fc8")
    if fc8 is not None and fc8.blobs and getattr(model, "num_classes", None) != _IMAGENET_CLASSES:
        return int(np.shape(fc8.blobs[0])[0]) == _IMAGENET_CLASSES
    return False


def _as_conv_weight(w: torch.Tensor, target: nn.Conv2d) -> torch.Tensor:
    """InnerProduct (out, in) -> convolution weight. For a 1x1 target (fc7, fc8): (out, in, 1, 1). Else
    (fc6): (out, C, k, k) with C the target's input channels (pool5's 512, never decimated) and
    in == C * k * k (Caffe and PyTorch both flatten channel, row, column). Anything else is returned
    unchanged (and then fails the shape check)."""
    if w.dim() != 2:
        return w
    if tuple(target.kernel_size) == (1, 1):
        return w.reshape(w.shape[0], w.shape[1], 1, 1)
    in_channels = target.in_channels
    if w.shape[1] % in_channels:
        return w
    k = math.isqrt(w.shape[1] // in_channels)
    if k * k * in_channels != w.shape[1]:
        return w
    return w.reshape(w.shape[0], in_channels, k, k)


def map_source_layers(
    sources: Mapping[str, SourceLayer],
    model: nn.Module,
    *,
    source: str,
    source_kind: str,
    reinit_fc8: bool = False,
    allow_new: Iterable[str] = (),
    imagenet: Optional[bool] = None,
    model_name: Optional[str] = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Match Caffe-named source layers to the model's layers (module docstring) and check every shape.

    Args:
        sources: ``{source layer name: SourceLayer}``, only layers holding weights.
        model: a DeepLab v1 network (``caffe_layer_names`` / ``caffe_layer``); may live on the meta device.
        source: the file name for messages and the report.
        source_kind: see ``ConversionReport.source_kind``.
        reinit_fc8: a missing fc8 or one with a different class count starts new instead of failing.
        allow_new: model layers that may be missing from the source (Caffe names, ``msc``, a branch name).
        imagenet: treat the source as an ImageNet classifier (None: decide from the layers).
        model_name: the model's name for the report (default: its class name).

    Returns:
        (``{state-dict key: float32 tensor}`` of the loaded layers, report). Nothing is written to the
        model.

    Raises:
        WeightsError: the model has no Caffe layer names; a layer whose blobs do not fit (names the layer,
            the source layer and both shapes; fc8: both class counts); model layers missing from the
            source and not allowed new (lists them and the source's layers); two ``fc8_*`` layers.
    """
    from .imagenet import decimate_fc6, decimate_fc7, decimation_indices  # imagenet imports this module

    if not hasattr(model, "caffe_layer_names"):
        raise WeightsError(
            f"{source}: {type(model).__name__} has no Caffe layer names; Caffe and ImageNet VGG-16 weights fit "
            "only the DeepLab v1 VGG-16 models"
        )
    names: list[str] = model.caffe_layer_names()
    prefix = {id(m): n for n, m in model.named_modules()}
    if imagenet is None:
        imagenet = _looks_imagenet(sources, model)
    kind = source_kind + ("+imagenet" if imagenet and not source_kind.startswith("imagenet") else "")
    report = ConversionReport(source=source, source_kind=kind, model=model_name or type(model).__name__)
    allowed = _expand_allow_new(allow_new, model, names)
    if imagenet:
        allowed.update(["fc8", *_msc_layer_names(model)])
    if reinit_fc8:
        allowed.add("fc8")
    allowed.update(_msc_start_new(model, set(sources), report))

    fc8_candidates = [n for n in sources if n == "fc8" or n.startswith("fc8_")]
    consumed: set[str] = set()
    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    problems: list[str] = []
    fc6_channels: Optional[list[int]] = None  # fc6 output channels kept by decimation
    fc6_source_width = 0
    for name in names:
        module = model.caffe_layer(name)
        key = prefix[id(module)]
        if name == "fc8":
            if imagenet:
                for c in fc8_candidates:
                    consumed.add(c)
                    report.unused.append(c)
                    report.notes[c] = "the file's ImageNet classifier, dropped; fc8 starts new (gaussian std 0.01)"
                missing.append(name)
                continue
            if len(fc8_candidates) > 1:
                raise WeightsError(f"{source}: more than one classifier layer for fc8: {fc8_candidates}")
            src_name = fc8_candidates[0] if fc8_candidates else None
        else:
            src_name = name if name in sources else None
        if src_name is None:
            missing.append(name)
            continue
        layer = sources[src_name]
        consumed.add(src_name)
        label = name if src_name == name else f"{name} (file layer {src_name!r})"
        if layer.type not in ("Convolution", "InnerProduct"):
            problems.append(f"{label}: layer type {layer.type!r}, expected Convolution or InnerProduct")
            continue
        if len(layer.blobs) != 2:
            problems.append(f"{label}: {len(layer.blobs)} blobs, expected 2 (weight and bias)")
            continue
        w, b = _tensor(layer.blobs[0]), _tensor(layer.blobs[1])
        w = _as_conv_weight(w, module)
        shape_w, shape_b = tuple(module.weight.shape), tuple(module.bias.shape)
        note = f"from {src_name}" if src_name != name else ""
        if imagenet and name == "fc6" and w.dim() == 4 and tuple(w.shape) != shape_w:
            try:
                w_new, b_new, sp, ch = decimate_fc6(w, b, shape_w[2], shape_w[0])
            except ValueError as exc:
                problems.append(f"{label}: cannot decimate {tuple(w.shape)} to {shape_w} ({exc})")
                continue
            note = f"decimated {tuple(w.shape)} -> {tuple(w_new.shape)}: rows/cols {sp}"
            if len(ch) != w.shape[0]:
                note += f", output channels {ch[0]}, {ch[1]}, ..., {ch[-1]} (step {ch[1] - ch[0]})"
                fc6_channels, fc6_source_width = ch, w.shape[0]
            w, b = w_new, b_new
        elif imagenet and name == "fc7" and fc6_channels is not None and tuple(w.shape) != shape_w:
            # fc7's inputs are fc6's outputs: keep fc6's channel subset there, and the same stride on the
            # outputs (4096 -> 1024: [0, 4, ..., 4092] on both sides)
            if w.dim() != 4 or w.shape[1] != fc6_source_width or shape_w[1] != len(fc6_channels):
                problems.append(f"{label}: cannot decimate {tuple(w.shape)} to {shape_w} after fc6")
                continue
            try:
                out_ch = decimation_indices(w.shape[0], shape_w[0], spatial=False)
            except ValueError as exc:
                problems.append(f"{label}: cannot decimate {tuple(w.shape)} to {shape_w} ({exc})")
                continue
            source_shape = tuple(w.shape)
            w, b = decimate_fc7(w, b, fc6_channels, out_ch)
            note = f"decimated {source_shape} -> {tuple(w.shape)}: inputs are fc6's kept channels, outputs the same stride"
        if tuple(w.shape) != shape_w or tuple(b.shape) != shape_b:
            if name == "fc8" and reinit_fc8:
                missing.append(name)
                report.unused.append(src_name)
                report.notes["fc8"] = f"re-initialised: file {src_name} weight {tuple(w.shape)} vs model {shape_w}"
                continue
            text = f"{label}: file weight {tuple(w.shape)} bias {tuple(b.shape)} vs model weight {shape_w} bias {shape_b}"
            if name == "fc8" and w.dim() == 4 and w.shape[1:] == shape_w[1:]:
                text += (
                    f" (the file's classifier has {w.shape[0]} classes, the model {shape_w[0]}; pass "
                    "reinit_fc8=True / --reinit-fc8 to start fc8 anew)"
                )
            problems.append(text)
            continue
        loaded[f"{key}.weight"] = w.contiguous()
        loaded[f"{key}.bias"] = b.contiguous()
        report.loaded.append(name)
        if note:
            report.notes[name] = note
    if problems:
        raise WeightsError(f"{source}: weights do not fit {report.model}:\n  " + "\n  ".join(problems))
    not_allowed = [n for n in missing if n not in allowed]
    if not_allowed:
        have = [n for n in sources if n not in consumed]
        raise WeightsError(
            f"{source}: layers of {report.model} missing from the file: {not_allowed}; file layers holding "
            f"weights that match none: {have or 'none'}. Pass allow_new=[...] (--allow-new) to start them "
            "anew" + (" or reinit_fc8=True for fc8" if "fc8" in not_allowed else "")
        )
    report.new = missing
    report.unused += [n for n in sources if n not in consumed]
    return loaded, report


def caffe_sources(net: CaffeNet) -> dict[str, SourceLayer]:
    """The layers of a parsed ``.caffemodel`` that hold weights, by name.

    Raises:
        WeightsError: two layers with weights share a name.
    """
    out: dict[str, SourceLayer] = {}
    for layer in net.layers:
        if not layer.blobs:
            continue
        if layer.name in out:
            raise WeightsError(f"{net.path or net.name}: two layers named {layer.name!r} hold weights")
        out[layer.name] = SourceLayer(layer.name, layer.type, list(layer.blobs))
    return out


def _layer_prefixes(model: nn.Module) -> dict[str, str]:
    """state-dict prefix -> report name (the Caffe name for DeepLab v1 models, else the prefix)."""
    if hasattr(model, "caffe_layer_names"):
        mods = {id(m): n for n, m in model.named_modules()}
        return {mods[id(model.caffe_layer(c))]: c for c in model.caffe_layer_names()}
    return {}


def _map_state_dict(
    sd: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    source: str,
    model_name: str,
    reinit_fc8: bool,
    allow_new: Iterable[str],
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Match a state dict of ours to the model key by key, grouped by layer (same rules as Caffe sources,
    without fc8 renaming or decimation)."""
    caffe = _layer_prefixes(model)
    names = list(caffe.values())
    allowed = _expand_allow_new(allow_new, model, names) if names else set(allow_new)
    if reinit_fc8:
        allowed.add("fc8")
    report = ConversionReport(source=source, source_kind="checkpoint", model=model_name)
    present_layers = {caffe[k.rsplit(".", 1)[0]] for k in sd if k.rsplit(".", 1)[0] in caffe}
    allowed.update(_msc_start_new(model, present_layers, report))
    groups: dict[str, list[str]] = {}
    for key in model.state_dict():
        groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
    model_sd = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    missing: list[str] = []
    for pre, keys in groups.items():
        label = caffe.get(pre, pre)
        present = [k for k in keys if k in sd]
        if not present:
            missing.append(label)
            continue
        if len(present) != len(keys):
            problems.append(f"{label}: checkpoint lacks {sorted(set(keys) - set(present))}")
            continue
        bad = [k for k in keys if tuple(sd[k].shape) != tuple(model_sd[k].shape)]
        if bad:
            if label == "fc8" and reinit_fc8:
                missing.append(label)
                report.notes["fc8"] = (
                    f"re-initialised: checkpoint weight {tuple(sd[pre + '.weight'].shape)} vs model "
                    f"{tuple(model_sd[pre + '.weight'].shape)}"
                )
                continue
            text = "; ".join(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}" for k in bad)
            if label == "fc8":
                text += (
                    f" (the checkpoint's fc8 has {sd[pre + '.weight'].shape[0]} classes, the model "
                    f"{model_sd[pre + '.weight'].shape[0]}; pass reinit_fc8=True / --reinit-fc8 to start fc8 anew)"
                )
            problems.append(f"{label}: {text}")
            continue
        for k in keys:
            loaded[k] = sd[k]
        report.loaded.append(label)
    if problems:
        raise WeightsError(f"{source}: weights do not fit {model_name}:\n  " + "\n  ".join(problems))
    not_allowed = [n for n in missing if n not in allowed]
    if not_allowed:
        raise WeightsError(
            f"{source}: layers of {model_name} missing from the checkpoint: {not_allowed}. Pass allow_new=[...] "
            "(--allow-new) to start them anew"
        )
    report.new = missing
    seen = set(groups)
    report.unused = sorted({k.rsplit(".", 1)[0] for k in sd if k.rsplit(".", 1)[0] not in seen})
    return loaded, report


# --------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Load a checkpoint of ours with ``torch.load(weights_only=True)`` on the CPU.

    Returns:
        The checkpoint dict: ``{"model", "num_classes", "state_dict", "meta"}`` as written by
        ``convert_caffemodel``, or a trainer checkpoint (``model_state``, ...).

    Raises:
        WeightsError: the file is missing, not loadable with ``weights_only=True``, not a dict, or has
            neither ``state_dict`` nor ``model_state``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many exception types for foreign or damaged files
        raise WeightsError(f"{path}: not a checkpoint loadable with weights_only=True ({exc})") from exc
    if not isinstance(obj, dict) or not ({"state_dict", "model_state"} & set(obj)):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{path}: not a checkpoint of ours (no 'state_dict' or 'model_state'; found {found})")
    return obj


def _open_weights(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix.lower() == ".caffemodel":
        return "caffemodel", read_caffemodel(path)
    try:
        return "torch", torch.load(path, map_location="cpu", weights_only=True)
    except Exception as torch_exc:  # not a torch file: perhaps a .caffemodel under another name
        try:
            return "caffemodel", read_caffemodel(path)
        except CaffeModelError as caffe_exc:
            raise WeightsError(
                f"{path}: neither a PyTorch checkpoint ({torch_exc}) nor a .caffemodel ({caffe_exc})"
            ) from caffe_exc


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _resolve(
    model: nn.Module,
    model_name: str,
    path: Path,
    *,
    reinit_fc8: bool,
    allow_new: Iterable[str],
    input_space: str,
    opened: Optional[tuple[str, Any]] = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    from .imagenet import imagenet_layers, is_imagenet_vgg16

    kind, obj = opened if opened is not None else _open_weights(path)
    if kind == "caffemodel":
        return map_source_layers(
            caffe_sources(obj), model, source=str(path), source_kind=f"caffemodel-{obj.format}",
            reinit_fc8=reinit_fc8, allow_new=allow_new, model_name=model_name,
        )
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    sd = obj.get("state_dict", obj.get("model_state", obj))
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict")
    sd = _strip_module(sd)
    non_tensor = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise WeightsError(f"{path}: not a state dict (non-tensor entries {non_tensor[:5]})")
    if is_imagenet_vgg16(sd):
        layers, extra = imagenet_layers(sd, input_space=input_space)
        loaded, report = map_source_layers(
            {n: SourceLayer(n, t, b) for n, (t, b) in layers.items()}, model, source=str(path),
            source_kind=f"imagenet-{input_space}", reinit_fc8=reinit_fc8, allow_new=allow_new, imagenet=True,
            model_name=model_name,
        )
        report.unused += extra
        return loaded, report
    loaded, report = _map_state_dict(
        sd, model, source=str(path), model_name=model_name, reinit_fc8=reinit_fc8, allow_new=allow_new
    )
    if isinstance(obj.get("model"), str) and obj["model"] != model_name:
        report.notes["model"] = f"checkpoint of {obj['model']!r} loaded into {model_name!r}"
    return loaded, report


def load_init(
    model: nn.Module,
    model_name: str,
    path: Union[str, Path],
    *,
    num_classes: int,
    reinit_fc8: bool = False,
    allow_new: Iterable[str] = (),
    input_space: str = "torchvision",
) -> InitReport:
    """Load initial weights into ``model`` in place (the experiment's ``model.init``).

    Args:
        model: the freshly built network (``build_model(model_name, num_classes)``); layers left new keep
            the initialisation they have.
        model_name: its name (for messages and the report).
        path: a ``.caffemodel`` (release or ImageNet VGG-16), a checkpoint of ours (``state_dict`` or
            ``model_state``), a bare state dict, or an ImageNet VGG-16 ``.pth`` in the PyTorch layout.
        num_classes: the model's class count (checked against ``model.num_classes``).
        reinit_fc8, allow_new: see ``map_source_layers``.
        input_space: for an ImageNet ``.pth``: ``"torchvision"`` (RGB 0..1, converted) or ``"caffe"``.

    Returns:
        An ``InitReport``: loaded / new / unused layers.

    Raises:
        WeightsError: the weights do not fit (see ``map_source_layers``), the file is unreadable or of an
            unknown kind, ``num_classes`` disagrees with the model.
        CaffeModelError: a damaged ``.caffemodel``.
    """
    return _load_init(
        model, model_name, Path(path), num_classes=num_classes, reinit_fc8=reinit_fc8, allow_new=allow_new,
        input_space=input_space,
    )


def _load_init(
    model: nn.Module,
    model_name: str,
    path: Path,
    *,
    num_classes: int,
    reinit_fc8: bool,
    allow_new: Iterable[str],
    input_space: str,
    opened: Optional[tuple[str, Any]] = None,
) -> InitReport:
    have = getattr(model, "num_classes", num_classes)
    if have != num_classes:
        raise WeightsError(f"load_init: num_classes={num_classes} but the model {model_name} has {have}")
    loaded, report = _resolve(
        model, model_name, path, reinit_fc8=reinit_fc8, allow_new=allow_new, input_space=input_space,
        opened=opened,
    )
    result = model.load_state_dict(loaded, strict=False)
    if result.unexpected_keys:  # cannot happen: keys come from the model itself
        raise WeightsError(f"{path}: unexpected keys {result.unexpected_keys}")
    return InitReport(**report.to_dict())


# --------------------------------------------------------------------------------------------- writing


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_atomic(path: Path, obj: dict) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def convert_weights(
    src: Union[str, Path],
    dst: Union[str, Path],
    model_name: str,
    num_classes: int = 21,
    *,
    reinit_fc8: bool = False,
    allow_new: Iterable[str] = (),
    input_space: str = "torchvision",
    seed: int = 0,
) -> ConversionReport:
    """Convert any source ``load_init`` accepts into a checkpoint of ours for ``model_name``.

    The model is built with ``num_classes``; layers left new are initialised from ``seed`` (fc8 and MSc
    branches: Gaussian std 0.01, zero bias). The checkpoint, written atomically, is
    ``{"model": model_name, "num_classes": num_classes, "state_dict": ..., "meta": {"source": file name,
    "sha256": of the source file, "converter_version": CONVERTER_VERSION, "report": report.to_dict()}}``
    and loads with ``torch.load(weights_only=True)``.

    Raises:
        WeightsError, CaffeModelError: see ``load_init``; KeyError: unknown model name.
    """
    return _convert(
        Path(src), Path(dst), model_name, num_classes, reinit_fc8=reinit_fc8, allow_new=allow_new,
        input_space=input_space, seed=seed,
    )


def _convert(
    src: Path,
    dst: Path,
    model_name: str,
    num_classes: int,
    *,
    reinit_fc8: bool,
    allow_new: Iterable[str],
    input_space: str,
    seed: int,
    opened: Optional[tuple[str, Any]] = None,
) -> ConversionReport:
    from ..models import build_model

    model = build_model(model_name, num_classes)
    if hasattr(model, "reset_parameters"):
        model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    report = _load_init(
        model, model_name, src, num_classes=num_classes, reinit_fc8=reinit_fc8, allow_new=allow_new,
        input_space=input_space, opened=opened,
    )
    report = ConversionReport(**report.to_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "source": src.name,
        "sha256": file_sha256(src),
        "converter_version": CONVERTER_VERSION,
        "seed": seed,
        "report": report.to_dict(),
    }
    _save_atomic(dst, {"model": model_name, "num_classes": num_classes, "state_dict": state, "meta": meta})
    return report


def convert_caffemodel(
    src: Union[str, Path],
    dst: Union[str, Path],
    model_name: str,
    num_classes: int = 21,
    *,
    reinit_fc8: bool = False,
    allow_new: Iterable[str] = (),
    seed: int = 0,
) -> ConversionReport:
    """Convert a ``.caffemodel`` (release model or ImageNet VGG-16, V1 or V2 layout) into a checkpoint of
    ours (format: ``convert_weights``).

    Args:
        src: the ``.caffemodel``.
        dst: the ``.pth`` to write.
        model_name: a DeepLab v1 variant (``deeplab-largefov`` for ``train_iter_6000.caffemodel`` of
            DeepLab-LargeFOV, ...).
        num_classes: fc8's classes (21 for PASCAL VOC); must equal the file's unless ``reinit_fc8``.
        reinit_fc8, allow_new: see ``map_source_layers``.
        seed: seed of the layers that start new.

    Raises:
        CaffeModelError: ``src`` is not a readable ``.caffemodel``.
        WeightsError: the weights do not fit the model (names the layer and both shapes).
    """
    src = Path(src)
    net = read_caffemodel(src)  # whatever its suffix: the reader's message for anything else
    return _convert(
        src, Path(dst), model_name, num_classes, reinit_fc8=reinit_fc8, allow_new=allow_new,
        input_space="caffe", seed=seed, opened=("caffemodel", net),
    )


def model_to_caffe_layers(model: nn.Module, *, fc8_name: str = "fc8_voc12") -> list[CaffeLayer]:
    """A DeepLab v1 model's weights as Caffe ``Convolution`` layers (the release's names; fc8 as
    ``fc8_name``), for ``write_caffemodel``: weight (out, in, kh, kw), bias (out,), float32.

    Raises:
        WeightsError: the model has no Caffe layer names.
    """
    if not hasattr(model, "caffe_layer_names"):
        raise WeightsError(f"{type(model).__name__} has no Caffe layer names")
    layers = []
    for name in model.caffe_layer_names():
        m = model.caffe_layer(name)
        blobs = [m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy()]
        layers.append(CaffeLayer(fc8_name if name == "fc8" else name, "Convolution", blobs))
    return layers


def export_caffemodel(
    model: nn.Module, path: Union[str, Path], *, format: str = "V1", fc8_name: str = "fc8_voc12", name: str = ""
) -> Path:
    """Write a DeepLab v1 model's weights as a ``.caffemodel`` (``format`` ``"V1"`` as the release, or
    ``"V2"``); parameter layers only, the network definition stays in the prototxt."""
    return write_caffemodel(path, model_to_caffe_layers(model, fc8_name=fc8_name), format=format, name=name)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``deeplab convert IN OUT --model NAME [--num-classes 21] [--reinit-fc8] [--allow-new LAYER]
    [--input-space torchvision|caffe] [--seed 0]``.

    Args:
        argv: the arguments after ``convert`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success (the report is printed), 1 when the weights do not fit or the file is unreadable
        (the error is printed to stderr). Argument errors exit through argparse (status 2).
    """
    from ..models.vgg import SPECS

    parser = argparse.ArgumentParser(
        prog="deeplab convert",
        description="Convert a .caffemodel (deeplab-public release or ImageNet VGG-16), an ImageNet VGG-16 "
        ".pth (PyTorch layout) or a checkpoint into a checkpoint of a DeepLab v1 model.",
    )
    parser.add_argument("src", type=Path, metavar="IN", help=".caffemodel or .pth to read")
    parser.add_argument("dst", type=Path, metavar="OUT", help="checkpoint (.pth) to write")
    parser.add_argument("--model", required=True, choices=sorted(SPECS), help="DeepLab v1 variant")
    parser.add_argument("--num-classes", type=int, default=21, help="classes of fc8 (default 21)")
    parser.add_argument("--reinit-fc8", action="store_true", help="start fc8 anew if its class count differs")
    parser.add_argument("--allow-new", action="append", default=[], metavar="LAYER",
                        help="a layer that may be missing from IN and starts new (repeatable; 'msc' = MSc branches)")
    parser.add_argument("--input-space", choices=["torchvision", "caffe"], default="torchvision",
                        help="input of an ImageNet VGG-16 .pth: torchvision (RGB 0..1, converted) or caffe (BGR 0..255)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layers that start new")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = convert_weights(
            args.src, args.dst, args.model, args.num_classes, reinit_fc8=args.reinit_fc8,
            allow_new=args.allow_new, input_space=args.input_space, seed=args.seed,
        )
    except (WeightsError, CaffeModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.format())
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
