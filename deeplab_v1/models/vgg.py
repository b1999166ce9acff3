"""DeepLab v1: VGG-16 with the hole (atrous) algorithm, every variant of the paper.

Sources: DeepLab v1 paper (Chen et al., ICLR 2015) Sec. 3.1 (hole algorithm), Sec. 3.2 (fc6 decimated to
4x4 / 3x3, 1024 channels), Sec. 4.3 (multi-scale prediction, MSc) and Table 2; the deeplab-public
prototxts ``DeepLab``, ``DeepLab-LargeFOV``, ``DeepLab-MSc``, ``DeepLab-MSc-LargeFOV``.

Layer names follow the Caffe release (``conv1_1`` ... ``fc8``; the MSc branches ``data_conv``,
``data_fc``, ``data_ms``, ``pool1_conv`` ... ``pool4_ms``) so that a converted ``.caffemodel`` maps one
blob to one parameter. ``fc8`` stands for the release's ``fc8_pascal`` / ``fc8_voc12``.

Input: (N, 3, H, W) float32, BGR 0..255 with the per-channel mean subtracted (see
``deeplab_v1.data.transforms``). Output: (N, num_classes, h, w) float32 raw fc8 scores at output_stride 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

#: VGG-16 conv blocks: (number of convs, channels) per block.
_VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


@dataclass(frozen=True)
class VGGDeepLabSpec:
    """The hyper-parameters that distinguish the v1 variants (one row of paper Table 2).

    Attributes:
        pool_kernel: kernel of pool1-pool4 (2 for ``vgg128_noup`` DeepLab, 3 for LargeFOV). pool1-3 use
            stride 2 pad 1; pool4 stride 1 with pad 0 (kernel 2) or pad 1 (kernel 3).
        fc6_kernel: fc6 spatial size (7, 4 or 3).
        fc6_dilation: fc6 atrous rate, the paper's "input stride" (4, 8 or 12).
        fc_channels: fc6/fc7 width (4096 or 1024).
        pool5a: LargeFOV's extra 3x3 stride-1 average pooling after pool5.
        msc: add the five multi-scale branches of the MSc prototxts (paper Sec. 4.3).
        train_crop: the release's training crop size (pixels).
        test_size: the release's test padding size (pixels).
    """

    pool_kernel: int
    fc6_kernel: int
    fc6_dilation: int
    fc_channels: int
    pool5a: bool
    msc: bool
    train_crop: int
    test_size: int

    @property
    def fc6_padding(self) -> int:
        """Padding that keeps the fc6 output the size of its input: (k - 1) * dilation / 2, floored.

        Gives the prototxt values: 4x4 hole 4 -> pad 6, 3x3 hole 12 -> pad 12.
        """
        return (self.fc6_kernel - 1) * self.fc6_dilation // 2


SPECS: dict[str, VGGDeepLabSpec] = {
    "deeplab": VGGDeepLabSpec(2, 4, 4, 4096, False, False, 306, 514),
    "deeplab-7x7": VGGDeepLabSpec(2, 7, 4, 4096, False, False, 306, 514),
    "deeplab-4x4": VGGDeepLabSpec(2, 4, 8, 4096, False, False, 306, 514),
    "deeplab-largefov": VGGDeepLabSpec(3, 3, 12, 1024, True, False, 321, 513),
    # The released DeepLab-MSc prototxt uses the kernel-3 pooling and 321/513 sizes of LargeFOV with the
    # 4x4/hole-4/4096 fc6 of DeepLab.
    "deeplab-msc": VGGDeepLabSpec(3, 4, 4, 4096, False, True, 321, 513),
    "deeplab-msc-largefov": VGGDeepLabSpec(3, 3, 12, 1024, True, True, 321, 513),
}

#: MSc branches: (name, input channels, stride of the 3x3 conv) from the MSc prototxts.
_MSC_BRANCHES: tuple[tuple[str, int, int], ...] = (
    ("data", 3, 8),
    ("pool1", 64, 4),
    ("pool2", 128, 2),
    ("pool3", 256, 1),
    ("pool4", 512, 1),
)


class MScBranch(nn.Module):
    """One multi-scale branch: conv 3x3 128 (stride s, pad 1) -> ReLU -> dropout -> conv 1x1 128 ->
    ReLU -> dropout -> conv 1x1 num_classes (``<name>_conv``, ``<name>_fc``, ``<name>_ms``).

    Source: DeepLab-MSc prototxts; paper Sec. 4.3 (the 5 x 128 channels concatenated before the
    classifier are, equivalently, five 1x1 classifiers whose scores are summed with fc8).
    """

    def __init__(self, in_channels: int, stride: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 128, 3, stride=stride, padding=1)
        self.fc = nn.Conv2d(128, 128, 1)
        self.ms = nn.Conv2d(128, num_classes, 1)
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.relu(self.conv(x)))
        x = self.drop(self.relu(self.fc(x)))
        return self.ms(x)


class DeepLabVGG(nn.Module):
    """VGG-16 DeepLab v1 with the hole algorithm (output_stride 8).

    pool4 and pool5 keep stride 1; conv5_x use dilation 2 and fc6 dilation ``spec.fc6_dilation``
    (paper Sec. 3.1). Pooling rounds the output size up as Caffe does (``ceil_mode=True``); convolutions
    round down. Dropout 0.5 after fc6 and fc7.

    Args:
        spec: the variant's hyper-parameters (see ``SPECS``).
        num_classes: classes of fc8 (21 for PASCAL VOC).

    Shapes: input (N, 3, H, W) float32 mean-subtracted BGR; output (N, num_classes, h, w); for
    ``deeplab`` 306 -> 39x39, for ``deeplab-largefov`` 321 -> 41x41 and 513 -> 65x65.

    Raises:
        ValueError: ``num_classes`` < 1.
    """

    def __init__(self, spec: VGGDeepLabSpec, num_classes: int = 21) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.spec = spec
        self.num_classes = num_classes
        self.output_stride = 8
        in_ch = 3
        k = spec.pool_kernel
        for b, (n, ch) in enumerate(_VGG16_BLOCKS, start=1):
            dilation = 2 if b == 5 else 1
            for i in range(1, n + 1):
                self.add_module(f"conv{b}_{i}", nn.Conv2d(in_ch, ch, 3, padding=dilation, dilation=dilation))
                in_ch = ch
            if b <= 3:  # pool1-3: kernel k, stride 2, pad 1
                pool = nn.MaxPool2d(k, stride=2, padding=1, ceil_mode=True)
            elif b == 4:  # pool4: stride 1 (hole algorithm), pad 1 for kernel 3, 0 for kernel 2
                pool = nn.MaxPool2d(k, stride=1, padding=(k - 1) // 2, ceil_mode=True)
            else:  # pool5: 3x3 stride 1 pad 1 in every variant
                pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
            self.add_module(f"pool{b}", pool)
        self.pool5a = (
            nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True) if spec.pool5a else None
        )
        self.fc6 = nn.Conv2d(
            512, spec.fc_channels, spec.fc6_kernel, padding=spec.fc6_padding, dilation=spec.fc6_dilation
        )
        self.fc7 = nn.Conv2d(spec.fc_channels, spec.fc_channels, 1)
        self.fc8 = nn.Conv2d(spec.fc_channels, num_classes, 1)
        self.drop6 = nn.Dropout(0.5)
        self.drop7 = nn.Dropout(0.5)
        self.relu = nn.ReLU(inplace=True)
        self.msc = nn.ModuleDict()
        if spec.msc:
            for name, ch, stride in _MSC_BRANCHES:
                self.msc[name] = MScBranch(ch, stride, num_classes)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise as the release does for new layers: fc8 and the MSc branches Gaussian std 0.01, zero
        bias (prototxt ``weight_filler { type: "gaussian" std: 0.01 }``). The VGG layers, which the release
        always loads from ImageNet, get Kaiming-normal weights for training from scratch, with conv1_1
        divided by 64 so that BGR 0..255 inputs (RMS about 64 after mean subtraction) give unit-scale
        activations; without that, lr 0.001 diverges from random weights.
        """
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if name == "fc8" or name.startswith("msc."):
                    nn.init.normal_(m.weight, std=0.01, generator=generator)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
                    if name == "conv1_1":
                        with torch.no_grad():
                            m.weight.div_(64.0)
                nn.init.zeros_(m.bias)

    def caffe_layer_names(self) -> list[str]:
        """Caffe names of the layers holding parameters (``conv1_1`` ... ``fc8``, ``data_conv`` ...)."""
        names = [f"conv{b}_{i}" for b, (n, _) in enumerate(_VGG16_BLOCKS, 1) for i in range(1, n + 1)]
        names += ["fc6", "fc7", "fc8"]
        for branch in self.msc:
            names += [f"{branch}_conv", f"{branch}_fc", f"{branch}_ms"]
        return names

    def caffe_layer(self, name: str) -> nn.Conv2d:
        """The module holding the Caffe layer ``name`` (see ``caffe_layer_names``).

        Raises:
            KeyError: no such layer in this variant.
        """
        for branch in self.msc:
            for part in ("conv", "fc", "ms"):
                if name == f"{branch}_{part}":
                    return getattr(self.msc[branch], part)
        if name in self.caffe_layer_names():
            return getattr(self, name)
        raise KeyError(f"layer {name!r} is not part of this model; known: {self.caffe_layer_names()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps: dict[str, torch.Tensor] = {"data": x}
        h = x
        for b, (n, _) in enumerate(_VGG16_BLOCKS, start=1):
            for i in range(1, n + 1):
                h = self.relu(getattr(self, f"conv{b}_{i}")(h))
            h = getattr(self, f"pool{b}")(h)
            taps[f"pool{b}"] = h
        if self.pool5a is not None:
            h = self.pool5a(h)
        h = self.drop6(self.relu(self.fc6(h)))
        h = self.drop7(self.relu(self.fc7(h)))
        out = self.fc8(h)
        for name, branch in self.msc.items():
            score = branch(taps[name])
            if score.shape != out.shape:
                raise ValueError(
                    f"MSc branch {name}_ms gives {tuple(score.shape[-2:])} scores but fc8 gives {tuple(out.shape[-2:])} "
                    f"for input {tuple(x.shape[-2:])}: use input sides of 8k + 1 pixels (321, 513) as the release"
                )
            out = out + score
        return out


def build_vgg_deeplab(name: str, *, num_classes: int = 21) -> DeepLabVGG:
    """Build a v1 variant by name (``deeplab``, ``deeplab-7x7``, ``deeplab-4x4``, ``deeplab-largefov``,
    ``deeplab-msc``, ``deeplab-msc-largefov``).

    Raises:
        KeyError: unknown variant name (the message lists the known ones).
    """
    if name not in SPECS:
        raise KeyError(f"unknown DeepLab v1 variant {name!r}; known: {sorted(SPECS)}")
    return DeepLabVGG(SPECS[name], num_classes=num_classes)


def score_size(name: str, size: int) -> int:
    """Score-map side for an input side ``size`` (pixels), from the variant's layer arithmetic with
    Caffe's rounding (pooling up, convolution down; a window never starts in the right padding).
    ``score_size("deeplab", 306) == 39``; ``score_size("deeplab-largefov", 513) == 65``.

    Raises:
        KeyError: unknown variant name.
    """
    spec = SPECS[name]
    k = spec.pool_kernel
    for stride, pad in ((2, 1), (2, 1), (2, 1), (1, (k - 1) // 2)):
        out = -(-(size + 2 * pad - k) // stride) + 1
        if (out - 1) * stride >= size + pad:
            out -= 1
        size = out
    return size  # pool5, pool5a and fc6 keep the size


BUILDERS: dict[str, Callable[..., nn.Module]] = {name: partial(build_vgg_deeplab, name) for name in SPECS}
