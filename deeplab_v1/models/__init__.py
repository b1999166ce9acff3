"""Networks by name: the DeepLab v1 VGG-16 variants and (optionally) the DeepLab v3/v3+ heads.

``build_model(name, num_classes=21, **options)`` is the one entry point; ``MODEL_NAMES`` lists the names.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from . import vgg

_BUILDERS: dict[str, Callable[..., nn.Module]] = dict(vgg.BUILDERS)
try:  # DeepLab v3/v3+ (ResNet / Xception backbones); optional module of the same pipeline
    from . import deeplabv3 as _v3

    _BUILDERS.update(_v3.BUILDERS)
except ImportError:  # pragma: no cover - present in the full package
    pass

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int = 21, **options: Any) -> nn.Module:
    """Build a segmentation network by name.

    Args:
        name: one of ``MODEL_NAMES``: ``deeplab``, ``deeplab-7x7``, ``deeplab-4x4``, ``deeplab-largefov``,
            ``deeplab-msc``, ``deeplab-msc-largefov`` (v1, VGG-16) and the v3/v3+ names.
        num_classes: output channels of the classifier (21 for PASCAL VOC).
        **options: variant options (v3/v3+: ``output_stride``, ``multi_grid``, ``separable``, ``root``).

    Returns:
        An ``nn.Module`` mapping (N, 3, H, W) float32 mean-subtracted BGR to (N, num_classes, h, w) scores;
        it has an ``output_stride`` attribute.

    Raises:
        KeyError: unknown name (the message lists the known names).
        TypeError: an option the variant does not take.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes=num_classes, **options)


__all__ = ["MODEL_NAMES", "build_model"]
