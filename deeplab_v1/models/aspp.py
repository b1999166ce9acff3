"""Atrous Spatial Pyramid Pooling with image-level features (DeepLab v3) and atrous separable convolution
(DeepLab v3+).

Sources: DeepLab v3 (Chen et al., 2017) Sec. 3.3 and Fig. 5: one 1x1 convolution and three 3x3 atrous
convolutions at rates (6, 12, 18) for output_stride 16 (doubled for output_stride 8), all with 256 filters
and batch normalization, plus image-level features (global average pooling -> 1x1 convolution 256 -> BN ->
bilinear upsampling); the five branches are concatenated and projected by a 1x1 convolution with 256 filters
and BN. DeepLab v3+ (Chen et al., 2018) Sec. 3.1 "atrous separable convolution": a depthwise 3x3 atrous
convolution followed by a pointwise 1x1 convolution, each followed by BN and ReLU (Sec. 3.2, "similar to
MobileNet"), used in ASPP and decoder when ``separable=True`` (Table 5, "SC").

All tensors are (N, C, H, W) float32. The module names (``branches``, ``pooling``, ``project``) are the
paper's parts; the classifier is not part of ASPP (see ``deeplab_v1.models.deeplabv3``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import KeyedDropout

#: ASPP rates of the three 3x3 branches at output_stride 16 (v3 Sec. 3.3); scaled by 16 / output_stride.
ASPP_RATES_OS16: tuple[int, int, int] = (6, 12, 18)

#: BN momentum of the papers: moving-average decay 0.9997 (v3 Sec. 4.1) is torch momentum 1 - 0.9997.
BN_MOMENTUM: float = 0.0003


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """ASPP rates for an encoder output_stride: (6, 12, 18) at 16, (12, 24, 36) at 8, (3, 6, 9) at 32.

    Source: v3 Sec. 3.3 ("the rates are doubled when output_stride = 8"); the value at 32 follows the same
    rule (the rates keep the same field of view in pixels of the input image).

    Raises:
        ValueError: ``output_stride`` not in (8, 16, 32).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)


def batch_norm(channels: int, bn_momentum: float = BN_MOMENTUM) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` with the papers' moving-average decay (torch ``momentum = 1 - decay``)."""
    if not 0.0 < bn_momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in (0, 1] (torch convention, 1 - decay), got {bn_momentum!r}")
    return nn.BatchNorm2d(channels, momentum=bn_momentum)


def init_conv_bn(module: nn.Module) -> None:
    """Initialise layers trained from scratch: convolutions He-normal (fan_out, ReLU), BN gamma 1, beta 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AtrousSeparableConv2d(nn.Module):
    """Atrous separable convolution: depthwise 3x3 (stride, dilation) -> BN -> ReLU -> pointwise 1x1 -> BN
    [-> ReLU].

    Source: v3+ Sec. 3.1 (depthwise convolution with atrous rate, then pointwise) and Sec. 3.2 (BN and ReLU
    after the depthwise convolution, as MobileNet). Padding equals the dilation, so with stride 1 the output
    has the input's size and with stride 2 an odd side ``2k + 1`` becomes ``k + 1`` (TensorFlow "SAME").

    Args:
        in_channels, out_channels: channels of input and output.
        dilation: atrous rate of the depthwise convolution (>= 1).
        stride: stride of the depthwise convolution (1 or 2).
        relu_after_pointwise: apply ReLU after the pointwise BN (True in ASPP / decoder).
        bn_momentum: BN momentum (torch convention).

    Shapes: (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)) for odd sides.
    Parameter names: ``depthwise``, ``depthwise_bn``, ``pointwise``, ``pointwise_bn``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilation: int = 1,
        stride: int = 1,
        relu_after_pointwise: bool = True,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=dilation,
                                   dilation=dilation, groups=in_channels, bias=False)
        self.depthwise_bn = batch_norm(in_channels, bn_momentum)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pointwise_bn = batch_norm(out_channels, bn_momentum)
        self.relu_after_pointwise = relu_after_pointwise
        self.set_stride_dilation(stride, dilation)

    def set_stride_dilation(self, stride: int, dilation: int) -> None:
        """Change the depthwise convolution's stride and atrous rate in place (no new parameters).

        Raises:
            ValueError: stride not 1 or 2, or dilation < 1.
        """
        if stride not in (1, 2) or dilation < 1:
            raise ValueError(f"stride must be 1 or 2 and dilation >= 1, got stride={stride}, dilation={dilation}")
        self.depthwise.stride = (stride, stride)
        self.depthwise.dilation = (dilation, dilation)
        self.depthwise.padding = (dilation, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise_bn(self.depthwise(x)))
        x = self.pointwise_bn(self.pointwise(x))
        return F.relu(x) if self.relu_after_pointwise else x


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, separable: bool = False,
    bn_momentum: float = BN_MOMENTUM,
) -> nn.Module:
    """A 1x1 or 3x3 convolution (no bias) -> BN -> ReLU, or for a 3x3 with ``separable=True`` the atrous
    separable convolution. Used by the ASPP branches and the v3+ decoder.

    Raises:
        ValueError: ``kernel_size`` not 1 or 3.
    """
    if kernel_size not in (1, 3):
        raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
    if kernel_size == 3 and separable:
        return AtrousSeparableConv2d(in_channels, out_channels, dilation=dilation, bn_momentum=bn_momentum)
    padding = dilation if kernel_size == 3 else 0
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        batch_norm(out_channels, bn_momentum),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level features: global average pooling -> 1x1 conv 256 -> BN -> ReLU -> bilinear upsampling to
    the input's size (v3 Sec. 3.3).

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W). In training mode BN needs N >= 2 (the pooled
    map has one value per channel and image).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = batch_norm(out_channels, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = F.relu(self.bn(self.conv(F.adaptive_avg_pool2d(x, 1))))
        # Upsampling a 1x1 map is a broadcast; written as interpolation to follow the paper's description.
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab v3 ASPP: [1x1 conv, three 3x3 atrous convs at ``rates``, image pooling] -> concat (5 x 256)
    -> 1x1 conv 256 + BN + ReLU (-> dropout).

    Args:
        in_channels: channels of the backbone's last feature map (2048 for ResNet and Xception-65).
        rates: atrous rates of the 3x3 branches ((6, 12, 18) at output_stride 16; see ``aspp_rates``).
        out_channels: filters of every branch and of the projection (256 in the paper).
        separable: atrous separable convolutions in the 3x3 branches (v3+ Sec. 3.1, Table 5 "SC").
        dropout: dropout after the projection. Not in the papers' text; the TensorFlow release applies
            dropout with keep probability 0.9 here, hence 0.1 by default.
        bn_momentum: BN momentum (torch convention).

    Shapes: (N, in_channels, h, w) -> (N, out_channels, h, w).

    Raises:
        ValueError: ``rates`` not three or more positive integers.
    """

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int] = ASPP_RATES_OS16,
        out_channels: int = 256,
        separable: bool = False,
        dropout: float = 0.1,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if len(rates) < 1 or min(rates) < 1:
            raise ValueError(f"ASPP rates must be positive integers, got {rates}")
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, out_channels, 1, bn_momentum=bn_momentum)])
        for r in rates:
            self.branches.append(conv_bn_relu(in_channels, out_channels, 3, r, separable, bn_momentum))
        self.pooling = ASPPPooling(in_channels, out_channels, bn_momentum)
        self.project = conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1, bn_momentum=bn_momentum)
        self.dropout = KeyedDropout(dropout)
        self.out_channels = out_channels

    @property
    def rates(self) -> tuple[int, ...]:
        """The atrous rates of the 3x3 branches as they are now."""
        out = []
        for branch in list(self.branches)[1:]:
            conv = branch.depthwise if isinstance(branch, AtrousSeparableConv2d) else branch[0]
            out.append(conv.dilation[0])
        return tuple(out)

    def set_rates(self, rates: Sequence[int]) -> None:
        """Change the atrous rates of the 3x3 branches in place (used when switching output_stride).

        Raises:
            ValueError: a different number of rates than branches, or a rate < 1.
        """
        rates = tuple(int(r) for r in rates)
        if len(rates) != len(self.branches) - 1 or min(rates) < 1:
            raise ValueError(f"need {len(self.branches) - 1} positive rates, got {rates}")
        for branch, r in zip(list(self.branches)[1:], rates):
            if isinstance(branch, AtrousSeparableConv2d):
                branch.set_stride_dilation(1, r)
            else:
                branch[0].dilation = (r, r)
                branch[0].padding = (r, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        feats.append(self.pooling(x))
        return self.dropout(self.project(torch.cat(feats, dim=1)))


__all__ = ["ASPP", "ASPPPooling", "ASPP_RATES_OS16", "AtrousSeparableConv2d", "BN_MOMENTUM", "aspp_rates",
           "batch_norm", "conv_bn_relu"]
