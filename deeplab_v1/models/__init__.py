"""Networks by name: the DeepLab v1 VGG-16 variants, (optionally) the DeepLab v3/v3+ heads, and
``tiny-test`` (a few convolutions with the same interface, for pipeline tests).

``build_model(name, num_classes=21, **options)`` is the one entry point; ``MODEL_NAMES`` lists the names;
``release_spec(name)`` gives a v1 variant's release hyper-parameters (crop, test size). The option
``crf_rnn={...}`` appends the fully connected CRF as a trainable last layer to any of them (``crf_rnn.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from . import tiny, vgg
from .crf_rnn import CRFasRNN, crf_rnn as crf_rnn_model
from .vgg import VGGDeepLabSpec

_BUILDERS: dict[str, Callable[..., nn.Module]] = dict(vgg.BUILDERS)
try:  # DeepLab v3/v3+ (ResNet / Xception backbones); optional module of the same pipeline
    from . import deeplabv3 as _v3

    _BUILDERS.update(_v3.BUILDERS)
except ImportError:  # pragma: no cover - present in the full package
    pass
_BUILDERS.update(tiny.BUILDERS)  # last: the names of the paper's models come first in messages

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int = 21, *, crf_rnn: Optional[dict] = None, **options: Any) -> nn.Module:
    """Build a segmentation network by name.

    Args:
        name: one of ``MODEL_NAMES``: ``deeplab``, ``deeplab-7x7``, ``deeplab-4x4``, ``deeplab-largefov``,
            ``deeplab-msc``, ``deeplab-msc-largefov`` (v1, VGG-16), the v3/v3+ names and ``tiny-test``.
        num_classes: output channels of the classifier (21 for PASCAL VOC).
        crf_rnn: the keyword arguments of ``crf_rnn.crf_rnn`` (``params``, ``learn``, ``iterations_train``,
            ``iterations_test``; ``config.CRFRNNConfig.build_options``): the network wrapped in a
            :class:`CRFasRNN` (the CRF as its last layer, full-resolution logits). None: the plain network.
        **options: variant options (v3/v3+: ``output_stride``, ``multi_grid``, ``separable``, ``root``).

    Returns:
        An ``nn.Module`` mapping (N, 3, H, W) float32 mean-subtracted BGR to (N, num_classes, h, w) scores;
        it has an ``output_stride`` attribute.

    Raises:
        KeyError: unknown name (the message lists the known names).
        TypeError: an option the variant does not take.
        ValueError: a bad ``crf_rnn`` value (the layer's message).
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    model = _BUILDERS[name](num_classes=num_classes, **options)
    return model if crf_rnn is None else crf_rnn_model(model, num_classes, **crf_rnn)


def release_spec(name: str) -> Optional[VGGDeepLabSpec]:
    """The DeepLab v1 variant's hyper-parameters (``models.vgg.SPECS``: training crop, test size, label
    shrink), or None for the models that have no Caffe release (v3/v3+, ``tiny-test``)."""
    return vgg.SPECS.get(name)


__all__ = ["CRFasRNN", "MODEL_NAMES", "build_model", "release_spec"]
