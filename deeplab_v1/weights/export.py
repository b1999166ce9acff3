"""Write weights: any source ``load_init`` accepts as a checkpoint of ours (``convert_weights``,
``convert_caffemodel``), and a DeepLab v1 model as a ``.caffemodel`` (``export_caffemodel``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .caffemodel import CaffeLayer, read_caffemodel, write_caffemodel
from .checkpoint import file_sha256, save_checkpoint
from .errors import WeightsError
from .loading import Opened, load_init
from .report import ConversionReport

__all__ = [
    "CONVERTER_VERSION",
    "convert_caffemodel",
    "convert_weights",
    "export_caffemodel",
    "model_to_caffe_layers",
]

#: Stored in every checkpoint this module writes (``meta.converter_version``).
CONVERTER_VERSION = "1.0"


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
    opened: Optional[Opened] = None,
) -> ConversionReport:
    """Convert any source ``load_init`` accepts into a checkpoint of ours for ``model_name``.

    The model is built with ``num_classes``; layers left new are initialised from ``seed`` (fc8 and MSc
    branches: Gaussian std 0.01, zero bias). The checkpoint, written atomically, is
    ``{"model": model_name, "num_classes": num_classes, "state_dict": ..., "meta": {"source": file name,
    "sha256": of the source file, "converter_version": CONVERTER_VERSION, "report": report.to_dict()}}``
    and loads with ``torch.load(weights_only=True)``. ``opened``: ``src`` already read (``open_weights``).

    Raises:
        WeightsError, CaffeModelError: see ``load_init``; KeyError: unknown model name.
    """
    from ..models import build_model

    src, dst = Path(src), Path(dst)
    model = build_model(model_name, num_classes)
    if hasattr(model, "reset_parameters"):
        model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    report = load_init(
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
    save_checkpoint(dst, {"model": model_name, "num_classes": num_classes, "state_dict": state, "meta": meta})
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
    net = read_caffemodel(Path(src))  # whatever its suffix: the reader's message for anything else
    return convert_weights(
        src, dst, model_name, num_classes, reinit_fc8=reinit_fc8, allow_new=allow_new,
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
