"""Load initial weights into a DeepLab v1 network (the experiment's ``model.init``): open the file, tell
its kind by content, resolve the state dict inside, and map it (``mapping``) onto the model.

Sources accepted (``load_init`` tells them apart by content, not by name):

- a ``.caffemodel`` of the deeplab-public release (``train_iter_6000.caffemodel``, V1 layout) or of any
  Caffe (V2 layout), read by ``deeplab_v1.weights.caffemodel``;
- Caffe's ImageNet VGG-16 (``VGG_ILSVRC_16_layers.caffemodel``: fc6/fc7/fc8 are InnerProduct layers) or
  an already decimated init such as the release's ``vgg16_20M.caffemodel``;
- an ImageNet VGG-16 state dict in the common PyTorch layout (``features.0.weight`` ...; see
  ``deeplab_v1.weights.imagenet``);
- a checkpoint of ours: ``{"state_dict": ...}`` (written by ``convert_caffemodel`` or at the end of
  training) or ``{"model_state": ...}`` (the trainer's resumable checkpoints), or a bare state dict; of a
  CRF-as-RNN model (``dcnn.*``, ``crf.*``), its network part.

How layers are matched, and when a source counts as an ImageNet classifier: ``deeplab_v1.weights.mapping``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from ..models.crf_rnn import network_state
from ..models.state_dict import strip_module_prefix
from .caffemodel import CaffeModelError, read_caffemodel
from .checkpoint import CheckpointError, checkpoint_state_dict, load_torch_file
from .errors import WeightsError
from .imagenet import imagenet_layers, is_imagenet_vgg16
from .mapping import caffe_sources, map_source_layers, map_state_dict
from .report import ConversionReport, InitReport, SourceLayer

__all__ = ["Opened", "load_init", "open_weights"]

#: An opened weights file: ``("caffemodel", CaffeNet)`` or ``("torch", whatever torch.load gave)``.
Opened = tuple[str, Any]


def open_weights(path: Path) -> Opened:
    """Read a weights file: a ``.caffemodel`` by its suffix, else ``torch.load(weights_only=True)``, else
    (a ``.caffemodel`` under another name) the Caffe reader.

    Raises:
        WeightsError: the file is missing, or neither a PyTorch file nor a ``.caffemodel``.
        CaffeModelError: a damaged ``.caffemodel`` (by its suffix).
    """
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix.lower() == ".caffemodel":
        return "caffemodel", read_caffemodel(path)
    try:
        return "torch", load_torch_file(path)
    except CheckpointError as torch_err:  # not a torch file: perhaps a .caffemodel under another name
        try:
            return "caffemodel", read_caffemodel(path)
        except CaffeModelError as caffe_exc:
            raise WeightsError(
                f"{path}: neither a PyTorch checkpoint ({str(torch_err).split(': ', 1)[-1]}) nor a .caffemodel ({caffe_exc})"
            ) from caffe_exc


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch file: a checkpoint's ``state_dict`` / ``model_state`` or the bare dict,
    without a DataParallel ``module.`` prefix; of a CRF-as-RNN model's, the network's (``network_state``)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    sd = checkpoint_state_dict(obj)
    if sd is None:
        sd = obj
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict")
    sd = network_state(strip_module_prefix(sd))
    non_tensor = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise WeightsError(f"{path}: not a state dict (non-tensor entries {non_tensor[:5]})")
    return sd


def _resolve(
    model: nn.Module,
    model_name: str,
    path: Path,
    *,
    reinit_fc8: bool,
    allow_new: Iterable[str],
    input_space: str,
    opened: Optional[Opened] = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map whatever ``path`` holds onto the model: ``({state-dict key: tensor}, report)``."""
    kind, obj = opened if opened is not None else open_weights(path)
    if kind == "caffemodel":
        return map_source_layers(
            caffe_sources(obj), model, source=str(path), source_kind=f"caffemodel-{obj.format}",
            reinit_fc8=reinit_fc8, allow_new=allow_new, model_name=model_name,
        )
    sd = _state_dict(obj, path)
    if is_imagenet_vgg16(sd):
        layers, extra = imagenet_layers(sd, input_space=input_space)
        loaded, report = map_source_layers(
            {n: SourceLayer(n, t, b) for n, (t, b) in layers.items()}, model, source=str(path),
            source_kind=f"imagenet-{input_space}", reinit_fc8=reinit_fc8, allow_new=allow_new, imagenet=True,
            model_name=model_name,
        )
        report.unused += extra
        return loaded, report
    loaded, report = map_state_dict(
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
    opened: Optional[Opened] = None,
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
        opened: ``path`` already read (``open_weights``), so it is not read again.

    Returns:
        An ``InitReport``: loaded / new / unused layers.

    Raises:
        WeightsError: the weights do not fit (see ``map_source_layers``), the file is unreadable or of an
            unknown kind, ``num_classes`` disagrees with the model.
        CaffeModelError: a damaged ``.caffemodel``.
    """
    path = Path(path)
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
