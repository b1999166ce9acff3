"""A tiny network with the pipeline's model interface, for tests of the pipeline (not of a network).

``tiny-test``: three 3x3 stride-2 convolutions (8 channels, ReLU) and a 1x1 classifier ``fc8``: the
output_stride 8 of the DeepLab v1 models, about 1.4k parameters instead of LargeFOV's 20.5M, so a test of
the stages, the run folder, resume or the CRF runs in a fraction of a second per image. Not a result and
not a reproduction: no shipped experiment uses it.

Input: (N, 3, H, W) float32 mean-subtracted BGR (as every model here). Output: (N, num_classes,
ceil(H / 8), ceil(W / 8)) float32 scores; ``output_stride`` is 8.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class TinyDeepLab(nn.Module):
    """Three stride-2 3x3 convs (ReLU) and a 1x1 ``fc8`` classifier: output stride 8.

    Args:
        num_classes: classifier output channels (21 for PASCAL VOC).
        width: channels of the three convolutions.

    Raises:
        ValueError: ``num_classes`` or ``width`` < 1.
    """

    output_stride = 8

    def __init__(self, num_classes: int = 21, width: int = 8) -> None:
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be >= 1, got {num_classes} and {width}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.fc8 = nn.Conv2d(width, num_classes, 1)
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x / 64.0))  # the input is mean-subtracted 0..255: bring it near unit scale
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc8(x)


def tiny_test(*, num_classes: int = 21) -> TinyDeepLab:
    """The ``tiny-test`` model (see the module docstring)."""
    return TinyDeepLab(num_classes=num_classes)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"tiny-test": tiny_test}

__all__ = ["BUILDERS", "TinyDeepLab", "tiny_test"]
