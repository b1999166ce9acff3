"""Match a weights source, layer by layer, to a DeepLab v1 network, checking every shape.

Layer matching (Caffe sources): a Caffe layer feeds the model layer of the same name (``conv1_1`` ...
``fc7``, MSc ``data_conv`` ... ``pool4_ms``, see ``DeepLabVGG.caffe_layer_names``), except the classifier:
the release names it ``fc8_<dataset>`` (``fc8_voc12``, ``fc8_pascal``, ``fc8_${EXP}`` in the prototxts),
so ``fc8`` or any one layer named ``fc8_<anything>`` feeds our ``fc8``.

A source is treated as an **ImageNet classifier** (an init model) when its fc6 is an InnerProduct layer,
when it has a layer named exactly ``fc8`` with 1000 outputs (and the model does not have 1000 classes), or
when it has no classifier layer (``fc8`` / ``fc8_*``) at all. Then, as in paper Sec. 3.2: fc6/fc7 are
reshaped to convolutions and decimated to the model's fc6 kernel and width (``decimation``), the 1000-way
fc8 is dropped (listed as unused), and fc8 and the MSc branches are allowed to start new. For any other
source every layer of the model must be in the file with exactly the model's shapes, unless named in
``allow_new`` or (fc8) ``reinit_fc8``.

A state dict of ours is matched key by key, grouped by layer (``map_state_dict``), with the same rules but
without fc8 renaming or decimation. Every shape is checked; the errors (``WeightsError``) name the layer
and both shapes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .caffemodel import CaffeNet
from .decimation import decimate_fc6, decimate_fc7, decimation_indices
from .errors import WeightsError
from .report import ConversionReport, SourceLayer

__all__ = ["IMAGENET_CLASSES", "caffe_sources", "map_source_layers", "map_state_dict"]

#: Outputs of an ImageNet classifier's fc8.
IMAGENET_CLASSES = 1000

_IMAGENET_FC8_NOTE = "the file's ImageNet classifier, dropped; fc8 starts new (gaussian std 0.01)"
_REINIT_FC8_HINT = "pass reinit_fc8=True / --reinit-fc8 to start fc8 anew"


# ------------------------------------------------------------------------------------ shared by both


def _msc_layer_names(model: nn.Module) -> list[str]:
    """The model's MSc branch layers (``DeepLabVGG.msc_layer_names``), none for other models."""
    names = getattr(model, "msc_layer_names", None)
    return names() if callable(names) else []


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


def _msc_start_new(model: nn.Module, source_layers: set[str], report: ConversionReport) -> list[str]:
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


# -------------------------------------------------------------------------------------- Caffe sources


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


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _is_classifier(name: str) -> bool:
    return name == "fc8" or name.startswith("fc8_")


def _looks_imagenet(sources: Mapping[str, SourceLayer], model: nn.Module) -> bool:
    if "fc6" in sources and sources["fc6"].type == "InnerProduct":
        return True
    if not any(_is_classifier(n) for n in sources):
        return True  # no classifier at all: an init model (decimated VGG-16 saved without fc8)
    fc8 = sources.get("fc8")
    if fc8 is not None and fc8.blobs and getattr(model, "num_classes", None) != IMAGENET_CLASSES:
        return int(np.shape(fc8.blobs[0])[0]) == IMAGENET_CLASSES
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


class _SkipLayer(Exception):
    """Internal: the current layer is done (a problem was recorded, or it starts new)."""


class _LayerMatcher:
    """One pass of ``map_source_layers`` over the model's Caffe layers: collects the loaded tensors, the
    layers left new, the problems found, and the fc6 channels decimation kept (fc7 follows them)."""

    def __init__(
        self, sources: Mapping[str, SourceLayer], model: nn.Module, report: ConversionReport, *,
        imagenet: bool, reinit_fc8: bool,
    ) -> None:
        self.sources, self.model, self.report = sources, model, report
        self.imagenet, self.reinit_fc8 = imagenet, reinit_fc8
        self.prefix = {id(m): n for n, m in model.named_modules()}
        self.fc8_candidates = [n for n in sources if _is_classifier(n)]
        self.consumed: set[str] = set()
        self.loaded: dict[str, torch.Tensor] = {}
        self.missing: list[str] = []
        self.problems: list[str] = []
        self.fc6_channels: Optional[list[int]] = None  # fc6 output channels kept by decimation
        self.fc6_source_width = 0

    def match(self, name: str) -> None:
        """Match model layer ``name``: load it, leave it new (``missing``) or record a problem."""
        module = self.model.caffe_layer(name)
        try:
            src_name = self._source_for(name)
            label = name if src_name == name else f"{name} (file layer {src_name!r})"
            w, b = self._blobs(self.sources[src_name], label, module)
            note = f"from {src_name}" if src_name != name else ""
            w, b, note = self._decimate(name, label, w, b, tuple(module.weight.shape), note)
            self._check_shapes(name, src_name, label, w, b, module)
        except _SkipLayer:
            return
        key = self.prefix[id(module)]
        self.loaded[f"{key}.weight"] = w.contiguous()
        self.loaded[f"{key}.bias"] = b.contiguous()
        self.report.loaded.append(name)
        if note:
            self.report.notes[name] = note

    def _problem(self, text: str) -> _SkipLayer:
        self.problems.append(text)
        return _SkipLayer()

    def _start_new(self, name: str) -> _SkipLayer:
        self.missing.append(name)
        return _SkipLayer()

    def _source_for(self, name: str) -> str:
        """The source layer feeding ``name`` (fc8: the one ``fc8`` / ``fc8_*``; an ImageNet source's
        classifier is dropped and fc8 starts new)."""
        if name != "fc8":
            src_name = name if name in self.sources else None
        elif self.imagenet:
            for c in self.fc8_candidates:
                self.consumed.add(c)
                self.report.unused.append(c)
                self.report.notes[c] = _IMAGENET_FC8_NOTE
            raise self._start_new(name)
        elif len(self.fc8_candidates) > 1:
            raise WeightsError(f"{self.report.source}: more than one classifier layer for fc8: {self.fc8_candidates}")
        else:
            src_name = self.fc8_candidates[0] if self.fc8_candidates else None
        if src_name is None:
            raise self._start_new(name)
        self.consumed.add(src_name)
        return src_name

    def _blobs(self, layer: SourceLayer, label: str, module: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        """[weight, bias] of a Convolution / InnerProduct layer, the weight as a convolution's."""
        if layer.type not in ("Convolution", "InnerProduct"):
            raise self._problem(f"{label}: layer type {layer.type!r}, expected Convolution or InnerProduct")
        if len(layer.blobs) != 2:
            raise self._problem(f"{label}: {len(layer.blobs)} blobs, expected 2 (weight and bias)")
        w, b = _tensor(layer.blobs[0]), _tensor(layer.blobs[1])
        return _as_conv_weight(w, module), b

    def _decimate(
        self, name: str, label: str, w: torch.Tensor, b: torch.Tensor, shape_w: tuple, note: str
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """ImageNet sources: fc6 decimated to the model's kernel and width, fc7 to fc6's kept channels
        (paper Sec. 3.2); anything else unchanged."""
        if not self.imagenet or tuple(w.shape) == shape_w:
            return w, b, note
        if name == "fc6" and w.dim() == 4:
            return self._decimate_fc6(label, w, b, shape_w)
        if name == "fc7" and self.fc6_channels is not None:
            return self._decimate_fc7(label, w, b, shape_w, self.fc6_channels)
        return w, b, note

    def _decimate_fc6(
        self, label: str, w: torch.Tensor, b: torch.Tensor, shape_w: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        try:
            w_new, b_new, sp, ch = decimate_fc6(w, b, shape_w[2], shape_w[0])
        except ValueError as exc:
            raise self._problem(f"{label}: cannot decimate {tuple(w.shape)} to {shape_w} ({exc})") from None
        note = f"decimated {tuple(w.shape)} -> {tuple(w_new.shape)}: rows/cols {sp}"
        if len(ch) != w.shape[0]:
            note += f", output channels {ch[0]}, {ch[1]}, ..., {ch[-1]} (step {ch[1] - ch[0]})"
            self.fc6_channels, self.fc6_source_width = ch, w.shape[0]
        return w_new, b_new, note

    def _decimate_fc7(
        self, label: str, w: torch.Tensor, b: torch.Tensor, shape_w: tuple, fc6_channels: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        # fc7's inputs are fc6's outputs: keep fc6's channel subset there, and the same stride on the
        # outputs (4096 -> 1024: [0, 4, ..., 4092] on both sides)
        if w.dim() != 4 or w.shape[1] != self.fc6_source_width or shape_w[1] != len(fc6_channels):
            raise self._problem(f"{label}: cannot decimate {tuple(w.shape)} to {shape_w} after fc6")
        try:
            out_ch = decimation_indices(w.shape[0], shape_w[0], spatial=False)
        except ValueError as exc:
            raise self._problem(f"{label}: cannot decimate {tuple(w.shape)} to {shape_w} ({exc})") from None
        source_shape = tuple(w.shape)
        w, b = decimate_fc7(w, b, fc6_channels, out_ch)
        note = f"decimated {source_shape} -> {tuple(w.shape)}: inputs are fc6's kept channels, outputs the same stride"
        return w, b, note

    def _check_shapes(
        self, name: str, src_name: str, label: str, w: torch.Tensor, b: torch.Tensor, module: nn.Conv2d
    ) -> None:
        shape_w, shape_b = tuple(module.weight.shape), tuple(module.bias.shape)
        if tuple(w.shape) == shape_w and tuple(b.shape) == shape_b:
            return
        if name == "fc8" and self.reinit_fc8:
            self.report.unused.append(src_name)
            self.report.notes["fc8"] = f"re-initialised: file {src_name} weight {tuple(w.shape)} vs model {shape_w}"
            raise self._start_new(name)
        text = f"{label}: file weight {tuple(w.shape)} bias {tuple(b.shape)} vs model weight {shape_w} bias {shape_b}"
        if name == "fc8" and w.dim() == 4 and w.shape[1:] == shape_w[1:]:
            text += f" (the file's classifier has {w.shape[0]} classes, the model {shape_w[0]}; {_REINIT_FC8_HINT})"
        raise self._problem(text)

    def finish(self, allowed: set[str]) -> None:
        """Raise for the problems found and the missing layers not allowed new; fill the report."""
        source, report = self.report.source, self.report
        if self.problems:
            raise WeightsError(f"{source}: weights do not fit {report.model}:\n  " + "\n  ".join(self.problems))
        not_allowed = [n for n in self.missing if n not in allowed]
        if not_allowed:
            have = [n for n in self.sources if n not in self.consumed]
            raise WeightsError(
                f"{source}: layers of {report.model} missing from the file: {not_allowed}; file layers holding "
                f"weights that match none: {have or 'none'}. Pass allow_new=[...] (--allow-new) to start them "
                "anew" + (" or reinit_fc8=True for fc8" if "fc8" in not_allowed else "")
            )
        report.new = self.missing
        report.unused += [n for n in self.sources if n not in self.consumed]


def _require_caffe_names(model: nn.Module, source: str) -> None:
    if not hasattr(model, "caffe_layer_names"):
        raise WeightsError(
            f"{source}: {type(model).__name__} has no Caffe layer names; Caffe and ImageNet VGG-16 weights fit "
            "only the DeepLab v1 VGG-16 models"
        )


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
    _require_caffe_names(model, source)
    names: list[str] = model.caffe_layer_names()
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

    matcher = _LayerMatcher(sources, model, report, imagenet=imagenet, reinit_fc8=reinit_fc8)
    for name in names:
        matcher.match(name)
    matcher.finish(allowed)
    return matcher.loaded, report


# ---------------------------------------------------------------------------------- state dicts of ours


def _layer_prefixes(model: nn.Module) -> dict[str, str]:
    """state-dict prefix -> report name (the Caffe name for DeepLab v1 models, else the prefix)."""
    if hasattr(model, "caffe_layer_names"):
        mods = {id(m): n for n, m in model.named_modules()}
        return {mods[id(model.caffe_layer(c))]: c for c in model.caffe_layer_names()}
    return {}


def _layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _state_dict_mismatch(
    sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], pre: str, label: str, bad: list[str],
    *, reinit_fc8: bool, report: ConversionReport,
) -> Optional[str]:
    """The problem text for a layer whose tensors have other shapes than the model's; None when it is fc8
    and ``reinit_fc8`` (noted in the report; the layer then starts new)."""
    if label == "fc8" and reinit_fc8:
        report.notes["fc8"] = (
            f"re-initialised: checkpoint weight {tuple(sd[pre + '.weight'].shape)} vs model "
            f"{tuple(model_sd[pre + '.weight'].shape)}"
        )
        return None
    text = "; ".join(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}" for k in bad)
    if label == "fc8":
        text += (
            f" (the checkpoint's fc8 has {sd[pre + '.weight'].shape[0]} classes, the model "
            f"{model_sd[pre + '.weight'].shape[0]}; {_REINIT_FC8_HINT})"
        )
    return f"{label}: {text}"


def map_state_dict(
    sd: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    source: str,
    model_name: str,
    reinit_fc8: bool,
    allow_new: Iterable[str],
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Match a state dict of ours to the model key by key, grouped by layer (same rules as Caffe sources,
    without fc8 renaming or decimation).

    Raises:
        WeightsError: a layer with only some of its tensors or other shapes (names the keys and both
            shapes; fc8: both class counts), layers missing and not allowed new.
    """
    caffe = _layer_prefixes(model)
    names = list(caffe.values())
    allowed = _expand_allow_new(allow_new, model, names) if names else set(allow_new)
    if reinit_fc8:
        allowed.add("fc8")
    report = ConversionReport(source=source, source_kind="checkpoint", model=model_name)
    present_layers = {caffe[_layer_of(k)] for k in sd if _layer_of(k) in caffe}
    allowed.update(_msc_start_new(model, present_layers, report))
    model_sd = model.state_dict()
    groups: dict[str, list[str]] = {}
    for key in model_sd:
        groups.setdefault(_layer_of(key), []).append(key)
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
            problem = _state_dict_mismatch(sd, model_sd, pre, label, bad, reinit_fc8=reinit_fc8, report=report)
            if problem is None:
                missing.append(label)
            else:
                problems.append(problem)
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
    report.unused = sorted({_layer_of(k) for k in sd if _layer_of(k) not in groups})
    return loaded, report
