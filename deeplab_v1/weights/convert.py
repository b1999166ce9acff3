"""The conversion API under its first name: re-exports of the modules it was split into.

- ``mapping``: matching source layers to the model, shape checks, fc6/fc7 decimation (``map_source_layers``,
  ``caffe_sources``);
- ``loading``: opening a weights file and loading it into a model (``load_init``);
- ``export``: writing checkpoints of ours and ``.caffemodel`` files (``convert_weights``,
  ``convert_caffemodel``, ``export_caffemodel``, ``model_to_caffe_layers``);
- ``checkpoint``: the checkpoint reader and writer (``load_checkpoint``, ``file_sha256``);
- ``cli``: the ``deeplab convert`` command (``main``).

New code imports from those modules (or from ``deeplab_v1.weights``); this one stays for existing callers.
"""

from __future__ import annotations

import sys

from .checkpoint import file_sha256, load_checkpoint
from .cli import main
from .errors import WeightsError
from .export import (
    CONVERTER_VERSION,
    convert_caffemodel,
    convert_weights,
    export_caffemodel,
    model_to_caffe_layers,
)
from .loading import load_init
from .mapping import caffe_sources, map_source_layers
from .report import ConversionReport, InitReport, SourceLayer

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
    "file_sha256",
    "load_checkpoint",
    "load_init",
    "model_to_caffe_layers",
    "export_caffemodel",
    "main",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
