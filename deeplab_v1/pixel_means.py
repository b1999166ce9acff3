"""The pixel normalisations the pipeline and the networks share (a floor below ``data`` and ``models``).

``MEAN_BGR``: the Caffe release's per-channel mean (B, G, R), 0..255 (``mean_value`` in the deeplab-public
prototxts); the pipeline's input is BGR 0..255 minus it, no scaling. ``TORCHVISION_MEAN_RGB`` /
``TORCHVISION_STD_RGB``: the ImageNet normalisation of weights in the torchvision layout, (R, G, B) on the
0..1 scale: such weights expect ``(rgb / 255 - mean) / std``; ``weights.imagenet`` (VGG-16 conv1_1) and
``models.deeplabv3.InputSpace`` (ResNet / Xception) map the pipeline's input onto it.
"""

from __future__ import annotations

MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)
TORCHVISION_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)

__all__ = ["MEAN_BGR", "TORCHVISION_MEAN_RGB", "TORCHVISION_STD_RGB"]
