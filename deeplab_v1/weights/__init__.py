"""Weights: read/write Caffe ``.caffemodel`` files without Caffe, map them (and ImageNet VGG-16 weights,
and checkpoints of ours) onto the DeepLab v1 networks, with fc6/fc7 decimation (paper Sec. 3.2).

Floors, each importing only those below it:

- ``errors``: ``WeightsError``, ``CheckpointError``; ``caffemodel``: ``read_caffemodel`` /
  ``write_caffemodel`` (both Caffe layouts, V1 and V2), ``CaffeModelError``; ``checkpoint``: the one
  checkpoint reader/writer (``load_checkpoint``, ``read_checkpoint``, ``save_checkpoint``, ``file_sha256``);
  ``report``: ``SourceLayer``, ``ConversionReport``, ``InitReport``; ``decimation``: fc6/fc7 decimation.
- ``mapping``: source layers / state dicts matched to the model, every shape checked.
- ``imagenet``: ImageNet VGG-16 in the PyTorch layout -> DeepLab initial weights (``imagenet_to_deeplab``).
- ``loading``: ``load_init`` (any accepted file, told apart by content).
- ``export``: ``convert_weights``, ``convert_caffemodel``, ``export_caffemodel``.
- ``cli``: the ``deeplab convert`` command (``main``). ``convert``: the old single-module names, re-exported.
"""

from .caffemodel import CaffeLayer, CaffeModelError, CaffeNet, read_caffemodel, write_caffemodel
from .checkpoint import file_sha256, load_checkpoint, read_checkpoint, save_checkpoint
from .decimation import decimation_indices
from .errors import CheckpointError, WeightsError
from .export import convert_caffemodel, convert_weights, export_caffemodel
from .imagenet import imagenet_to_deeplab
from .loading import load_init
from .report import ConversionReport, InitReport

__all__ = [
    "CaffeLayer",
    "CaffeModelError",
    "CaffeNet",
    "CheckpointError",
    "ConversionReport",
    "InitReport",
    "WeightsError",
    "convert_caffemodel",
    "convert_weights",
    "decimation_indices",
    "export_caffemodel",
    "file_sha256",
    "imagenet_to_deeplab",
    "load_checkpoint",
    "load_init",
    "read_caffemodel",
    "read_checkpoint",
    "save_checkpoint",
    "write_caffemodel",
]
