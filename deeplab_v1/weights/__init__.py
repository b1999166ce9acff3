"""Weights: read/write Caffe ``.caffemodel`` files without Caffe, map them (and ImageNet VGG-16 weights,
and checkpoints of ours) onto the DeepLab v1 networks, with fc6/fc7 decimation (paper Sec. 3.2).

- ``caffemodel``: ``read_caffemodel`` / ``write_caffemodel`` (both Caffe layouts, V1 and V2).
- ``convert``: ``convert_caffemodel``, ``load_init``, ``load_checkpoint``, ``export_caffemodel`` and the
  ``deeplab convert`` command (``main``).
- ``imagenet``: ImageNet VGG-16 in the PyTorch layout -> DeepLab initial weights (``imagenet_to_deeplab``).
"""

from .caffemodel import CaffeLayer, CaffeModelError, CaffeNet, read_caffemodel, write_caffemodel
from .convert import (
    ConversionReport,
    InitReport,
    WeightsError,
    convert_caffemodel,
    convert_weights,
    export_caffemodel,
    load_checkpoint,
    load_init,
)
from .imagenet import decimation_indices, imagenet_to_deeplab

__all__ = [
    "CaffeLayer",
    "CaffeModelError",
    "CaffeNet",
    "ConversionReport",
    "InitReport",
    "WeightsError",
    "convert_caffemodel",
    "convert_weights",
    "decimation_indices",
    "export_caffemodel",
    "imagenet_to_deeplab",
    "load_checkpoint",
    "load_init",
    "read_caffemodel",
    "write_caffemodel",
]
