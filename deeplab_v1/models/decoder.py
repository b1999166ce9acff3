"""The DeepLab v3+ decoder (Chen et al., 2018, Sec. 3.1 "Proposed decoder", Sec. 4.1, Fig. 2).

Low-level features (ResNet ``layer1`` output, "Conv2 before striding"; Xception entry-flow ``block2``'s
second separable convolution) are reduced to 48 channels by a 1x1 convolution + BN + ReLU (Table 1); the
encoder output (the 256-channel ASPP feature map) is bilinearly upsampled to their size (x4 at encoder
output_stride 16), concatenated with them, refined by two 3x3 convolutions with 256 filters + BN + ReLU
(Table 2) and classified by a 1x1 convolution. The final "upsample by 4" of Fig. 2 is left to the caller:
the model returns logits at stride 4 and the trainer / inference upsample them to the label size.

Upsampling uses ``align_corners=True``, which maps the 8k + 1 grids of the papers' 513 crops onto each other
exactly (33 -> 129 is (33 - 1) * 4 + 1), as the TensorFlow release does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .aspp import BN_MOMENTUM, conv_bn_relu

#: Channels of the reduced low-level features (v3+ Table 1: 48).
LOW_LEVEL_REDUCED = 48


class Decoder(nn.Module):
    """v3+ decoder: [1x1 48 on low-level] ++ upsample(encoder) -> 3x3 256 -> 3x3 256 -> 1x1 classifier.

    Args:
        low_level_channels: channels of the low-level features (256 for ResNet layer1 and Xception).
        encoder_channels: channels of the encoder output (256, the ASPP projection).
        num_classes: classifier output channels.
        channels: filters of the two 3x3 convolutions (256).
        separable: atrous separable convolutions for the two 3x3 convolutions (v3+ Table 5 "SC").
        bn_momentum: BN momentum (torch convention).

    Shapes: ``forward(encoder (N, encoder_channels, h, w), low_level (N, low_level_channels, H4, W4))`` ->
    (N, num_classes, H4, W4) float32 logits. Parameter names: ``reduce``, ``refine.0``, ``refine.1``,
    ``classifier``.

    Raises:
        ValueError: ``num_classes`` < 1.
    """

    def __init__(self, low_level_channels: int, num_classes: int, encoder_channels: int = 256,
                 channels: int = 256, separable: bool = False, bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.reduce = conv_bn_relu(low_level_channels, LOW_LEVEL_REDUCED, 1, bn_momentum=bn_momentum)
        self.refine = nn.Sequential(
            conv_bn_relu(encoder_channels + LOW_LEVEL_REDUCED, channels, 3, separable=separable, bn_momentum=bn_momentum),
            conv_bn_relu(channels, channels, 3, separable=separable, bn_momentum=bn_momentum),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, encoder: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low = self.reduce(low_level)
        up = F.interpolate(encoder, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.refine(torch.cat([up, low], dim=1)))


__all__ = ["Decoder", "LOW_LEVEL_REDUCED"]
