"""Modified aligned Xception-65 of DeepLab v3+ (Sec. 3.2, Fig. 3) with atrous separable convolution.

Structure (v3+ Fig. 3; channel lists of the papers' TensorFlow ``xception_65``):

- entry flow: ``conv1`` 3x3/2 32 + BN + ReLU, ``conv2`` 3x3 64 + BN + ReLU, then three Xception blocks
  ``block1`` [128, 128, 128] /2, ``block2`` [256, 256, 256] /2, ``block3`` [728, 728, 728] /2, each with a
  1x1 strided convolution + BN on the shortcut;
- middle flow: 16 blocks [728, 728, 728], stride 1, identity shortcut;
- exit flow: ``block1`` [728, 1024, 1024] /2 with a 1x1 convolution shortcut, ``block2`` [1536, 1536, 2048]
  without shortcut.

Every separable convolution is ``AtrousSeparableConv2d`` (depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 ->
BN -> ReLU): v3+ Sec. 3.2 (3) adds BN and ReLU after each depthwise convolution "similar to MobileNet".
Max pooling is replaced by the stride-2 third separable convolution of a block (Sec. 3.2 (2)), so
output_stride is set by replacing strides with atrous rates: a block whose stride would pass the target
output_stride runs with stride 1 at the current rate and every later block at twice that rate (the exact
equivalent of the strided network). Multi-Grid unit rates, if given, multiply the rates of the three
separable convolutions of exit-flow ``block2`` (the papers found no gain for Xception and use (1, 1, 1)).

Low-level features for the v3+ decoder: the output of the second separable convolution of entry-flow
``block2`` (256 channels, stride 4, before the block's striding), as the TensorFlow release.

Module names are our own (``entry_flow.conv1`` ... ``exit_flow.block2``); no ImageNet checkpoint loader is
provided for this backbone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .aspp import BN_MOMENTUM, AtrousSeparableConv2d, batch_norm, init_conv_bn

OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
MIDDLE_FLOW_BLOCKS = 16


class XceptionBlock(nn.Module):
    """Three atrous separable convolutions (the third with the block's stride) plus a shortcut.

    Args:
        in_channels: input channels.
        depth_list: output channels of the three separable convolutions.
        stride: stride of the third separable convolution (1 or 2).
        shortcut: ``"conv"`` (1x1 conv with the stride + BN), ``"sum"`` (identity) or ``"none"``.
        bn_momentum: BN momentum (torch convention).

    Shapes: (N, in_channels, H, W) -> (N, depth_list[-1], ceil(H / stride), ceil(W / stride)).
    Names: ``sepconv1``, ``sepconv2``, ``sepconv3``, ``shortcut`` (``shortcut.0`` conv, ``shortcut.1`` BN).

    Raises:
        ValueError: unknown shortcut, or an identity shortcut whose shapes do not match.
    """

    def __init__(self, in_channels: int, depth_list: Sequence[int], stride: int, shortcut: str,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        if shortcut not in ("conv", "sum", "none"):
            raise ValueError(f"shortcut must be 'conv', 'sum' or 'none', got {shortcut!r}")
        if shortcut == "sum" and (stride != 1 or in_channels != depth_list[-1]):
            raise ValueError("an identity ('sum') shortcut needs stride 1 and equal input / output channels")
        chans = [in_channels, *depth_list]
        for i in range(3):
            self.add_module(f"sepconv{i + 1}", AtrousSeparableConv2d(chans[i], chans[i + 1], bn_momentum=bn_momentum))
        self.shortcut_kind = shortcut
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, depth_list[-1], 1, stride=stride, bias=False),
                                       batch_norm(depth_list[-1], bn_momentum)) if shortcut == "conv" else None)
        self.out_channels = depth_list[-1]
        self.set_stride_rates(stride, (1, 1, 1))

    def set_stride_rates(self, stride: int, rates: Sequence[int]) -> None:
        """Set the block's stride (on ``sepconv3`` and the shortcut) and the three depthwise atrous rates.

        Raises:
            ValueError: a stride other than 1 on an identity shortcut block, or a bad rate.
        """
        if stride != 1 and self.shortcut_kind == "sum":
            raise ValueError("a block with an identity shortcut cannot take stride 2")
        for i, r in enumerate(rates):
            getattr(self, f"sepconv{i + 1}").set_stride_dilation(stride if i == 2 else 1, int(r))
        if self.shortcut is not None:
            self.shortcut[0].stride = (stride, stride)

    def forward(self, x: torch.Tensor, return_second: bool = False):
        """(N, C, H, W) -> block output; with ``return_second`` also the output of ``sepconv2``."""
        second = self.sepconv2(self.sepconv1(x))
        out = self.sepconv3(second)
        if self.shortcut_kind == "conv":
            out = out + self.shortcut(x)
        elif self.shortcut_kind == "sum":
            out = out + x
        return (out, second) if return_second else out


class XceptionBackbone(nn.Module):
    """Modified aligned Xception-65 feature extractor (v3+ Sec. 3.2).

    Args:
        output_stride: 8, 16 or 32.
        multi_grid: unit rates of exit-flow ``block2``'s three separable convolutions (default (1, 1, 1)).
        bn_momentum: BN momentum (torch convention).

    ``forward`` returns ``{"low_level": (N, 256, H/4, W/4), "out": (N, 2048, H/output_stride,
    W/output_stride)}`` (sides rounded up: 513 -> 129, 33 at output_stride 16).

    Raises:
        ValueError: output_stride not 8/16/32, or multi_grid not three positive rates.
    """

    def __init__(self, output_stride: int = 16, multi_grid: Sequence[int] = (1, 1, 1),
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        grid = tuple(int(r) for r in multi_grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"multi_grid must be three positive unit rates, got {multi_grid!r}")
        self.multi_grid = grid
        m = bn_momentum
        self.entry_flow = nn.Module()
        ef = self.entry_flow
        ef.conv1 = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), batch_norm(32, m), nn.ReLU(inplace=True))
        ef.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), batch_norm(64, m), nn.ReLU(inplace=True))
        ef.block1 = XceptionBlock(64, (128, 128, 128), 2, "conv", m)
        ef.block2 = XceptionBlock(128, (256, 256, 256), 2, "conv", m)
        ef.block3 = XceptionBlock(256, (728, 728, 728), 2, "conv", m)
        self.middle_flow = nn.Sequential(*[XceptionBlock(728, (728, 728, 728), 1, "sum", m) for _ in range(MIDDLE_FLOW_BLOCKS)])
        self.exit_flow = nn.Module()
        self.exit_flow.block1 = XceptionBlock(728, (728, 1024, 1024), 2, "conv", m)
        self.exit_flow.block2 = XceptionBlock(1024, (1536, 1536, 2048), 1, "none", m)
        self.out_channels = 2048
        self.low_level_channels = 256
        self.output_stride = 0
        self.set_output_stride(output_stride)
        init_conv_bn(self)

    def blocks(self) -> list[XceptionBlock]:
        """All Xception blocks in order (entry 3, middle 16, exit 2)."""
        ef, xf = self.entry_flow, self.exit_flow
        return [ef.block1, ef.block2, ef.block3, *self.middle_flow, xf.block1, xf.block2]

    def set_output_stride(self, output_stride: int) -> None:
        """Replace strides by atrous rates in place for ``output_stride`` (8, 16 or 32).

        Raises:
            ValueError: ``output_stride`` not 8, 16 or 32.
        """
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        current, rate = 2, 1  # after entry_flow.conv1
        blocks = self.blocks()
        for i, block in enumerate(blocks):
            wants_stride = 2 if block.shortcut_kind == "conv" else 1
            grid = self.multi_grid if i == len(blocks) - 1 else (1, 1, 1)
            if wants_stride == 2 and current >= output_stride:
                # The stride-2 convolution becomes stride 1 at the current rate; later blocks see twice the rate.
                block.set_stride_rates(1, [rate * g for g in grid])
                rate *= 2
            else:
                block.set_stride_rates(wants_stride, [rate * g for g in grid])
                current *= wants_stride
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ef = self.entry_flow
        x = ef.block1(ef.conv2(ef.conv1(x)))
        x, low_level = ef.block2(x, return_second=True)
        x = self.middle_flow(ef.block3(x))
        x = self.exit_flow.block2(self.exit_flow.block1(x))
        return {"low_level": low_level, "out": x}


__all__ = ["OUTPUT_STRIDES", "XceptionBackbone", "XceptionBlock"]
