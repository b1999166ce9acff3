"""DeepLab v1: VGG-16 with the hole (atrous) algorithm, every variant of the paper.

Sources: DeepLab v1 paper (Chen et al., ICLR 2015) Sec. 3.1 (hole algorithm), Sec. 3.2 (fc6 decimated to
4x4 / 3x3, 1024 channels), Sec. 4.3 (multi-scale prediction, MSc) and Table 2; the deeplab-public
prototxts ``DeepLab``, ``DeepLab-LargeFOV``, ``DeepLab-MSc``, ``DeepLab-MSc-LargeFOV``.

Layer names follow the Caffe release (``conv1_1`` ... ``fc8``; the MSc branches ``data_conv``,
``data_fc``, ``data_ms``, ``pool1_conv`` ... ``pool4_ms``) so that a converted ``.caffemodel`` maps one
blob to one parameter. ``fc8`` stands for the release's ``fc8_pascal`` / ``fc8_voc12``.

Input: (N, 3, H, W) float32, BGR 0..255 with the per-channel mean subtracted (see
``deeplab_v1.data.transforms``).

Two nets share one set of weights, as the release's ``train.prototxt`` and ``test.prototxt`` do:

- ``forward`` is the **training net**: (N, num_classes, h, w) raw fc8 scores at output_stride 8, the map
  the label-shrunk loss sees. DeepLab / 7x7 / 4x4 pool4 has no padding there (``train.prototxt``, pool4
  ``#pad: 1``); the MSc branches run at strides 8, 4, 2, 1, 1 and are summed with fc8 at stride 8.
- ``test_net`` is the **test net**: DeepLab / 7x7 / 4x4 pad pool4 by 1 (``test.prototxt``: a 514 input
  gives 67 score cells, not 65) and their ``fc8_crop`` (PADDING -7 / -8 after INTERP x8) puts score k on
  pixel 8k - 7 (``test_offset`` 7); LargeFOV keeps score k on pixel 8k; the MSc nets run the five branch
  convolutions at stride 1, upsample each by its own INTERP (data_ms none, pool1 x2, pool2 x4, pool3,
  pool4 and fc8 x8) and sum at full resolution (``test_stride`` 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import KeyedDropout

#: VGG-16 conv blocks: (number of convs, channels) per block.
_VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


@dataclass(frozen=True)
class VGGDeepLabSpec:
    """The hyper-parameters that distinguish the v1 variants (one row of paper Table 2).

    Attributes:
        pool_kernel: kernel of pool1-pool4 (2 for ``vgg128_noup`` DeepLab, 3 for LargeFOV). pool1-3 use
            stride 2 pad 1; pool4 stride 1 with pad 0 (kernel 2, training net) or pad 1 (kernel 3, and
            kernel 2 in the test net).
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
    def train_pool4_padding(self) -> int:
        """pool4's padding in ``train.prototxt``: 1 for kernel 3, none for kernel 2 (``#pad: 1``)."""
        return (self.pool_kernel - 1) // 2

    @property
    def train_label_pad_beg(self) -> int:
        """``pad_beg`` of the training net's ``label_shrink`` INTERP: -1 for the kernel-2 family (crop 306:
        labels 1, 9, ..., 305 meet the 39 score cells), 0 for LargeFOV and MSc (321: 0, 8, ..., 320)."""
        return -1 if self.pool_kernel == 2 else 0

    @property
    def test_pool4_padding(self) -> int:
        """pool4's padding in ``test.prototxt``: 1 in every variant (DeepLab: kernel 2 pad 1 stride 1)."""
        return 1

    @property
    def test_offset(self) -> int:
        """Pixels cropped at the top/left of the x8-upsampled test scores: 7 for the kernel-2 family
        (``fc8_crop``: PADDING ``pad_beg: -7``, so score k lands on pixel 8k - 7 as training's label k lands
        on 8(k - 1) + 1 with ``pad_beg: -1``), 0 for LargeFOV and MSc (score k on pixel 8k)."""
        return 7 if self.pool_kernel == 2 else 0

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

#: MSc branches: (name, input channels, stride of the 3x3 conv in train.prototxt, INTERP zoom_factor in
#: test.prototxt, where the conv has stride 1).
_MSC_BRANCHES: tuple[tuple[str, int, int, int], ...] = (
    ("data", 3, 8, 1),
    ("pool1", 64, 4, 2),
    ("pool2", 128, 2, 4),
    ("pool3", 256, 1, 8),
    ("pool4", 512, 1, 8),
)

#: Gaussian std of the MSc layers' weight fillers (``DeepLab-MSc*/train.prototxt``): ``*_conv`` and ``*_fc``
#: 0.001 but ``pool4_fc`` 0.005; ``*_ms`` 0.01 but ``pool3_ms``, which has no filler (Caffe's default
#: constant 0). Biases are constant 0.
MSC_FILLER_STD: dict[str, float] = {
    **{f"{b}_{part}": 0.001 for b, *_ in _MSC_BRANCHES for part in ("conv", "fc")},
    **{f"{b}_ms": 0.01 for b, *_ in _MSC_BRANCHES},
    "pool4_fc": 0.005,
    "pool3_ms": 0.0,
}


def caffe_interp(x: torch.Tensor, zoom: int) -> torch.Tensor:
    """Caffe ``INTERP`` with ``zoom_factor: zoom``: (N, C, h, w) -> (N, C, (h - 1) * zoom + 1, (w - 1) * zoom
    + 1), bilinear, corner-aligned (the input's first and last samples land on the output's)."""
    if zoom == 1:
        return x
    h, w = x.shape[-2:]
    return F.interpolate(x, size=((h - 1) * zoom + 1, (w - 1) * zoom + 1), mode="bilinear", align_corners=True)


class MScBranch(nn.Module):
    """One multi-scale branch: conv 3x3 128 (stride s, pad 1) -> ReLU -> dropout -> conv 1x1 128 ->
    ReLU -> dropout -> conv 1x1 num_classes (``<name>_conv``, ``<name>_fc``, ``<name>_ms``).

    Source: DeepLab-MSc prototxts; paper Sec. 4.3 (the 5 x 128 channels concatenated before the
    classifier are, equivalently, five 1x1 classifiers whose scores are summed with fc8).

    In the training net the 3x3 conv has the branch's stride (8, 4, 2, 1, 1), so every branch gives
    fc8's stride-8 grid; in the test net it has stride 1 (``test.prototxt``) and ``forward(x,
    test=True)`` gives the branch's scores at its input's resolution.
    """

    def __init__(self, in_channels: int, stride: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 128, 3, stride=stride, padding=1)
        self.fc = nn.Conv2d(128, 128, 1)
        self.ms = nn.Conv2d(128, num_classes, 1)
        self.drop = KeyedDropout(dropout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, test: bool = False) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, num_classes, ceil(H / stride), ceil(W / stride)); ``test``: stride 1."""
        if test:
            x = F.conv2d(x, self.conv.weight, self.conv.bias, stride=1, padding=1)
        else:
            x = self.conv(x)
        x = self.drop(self.relu(x))
        x = self.drop(self.relu(self.fc(x)))
        return self.ms(x)


class DeepLabVGG(nn.Module):
    """VGG-16 DeepLab v1 with the hole algorithm (output_stride 8).

    pool4 and pool5 keep stride 1; conv5_x use dilation 2 and fc6 dilation ``spec.fc6_dilation``
    (paper Sec. 3.1). Pooling rounds the output size up as Caffe does (``ceil_mode=True``); convolutions
    round down. Dropout 0.5 after fc6 and fc7.

    ``forward`` is the release's training net and ``test_net`` its test net (module docstring); both
    use the same parameters, so a checkpoint serves both.

    Args:
        spec: the variant's hyper-parameters (see ``SPECS``).
        num_classes: classes of fc8 (21 for PASCAL VOC).

    Shapes: input (N, 3, H, W) float32 mean-subtracted BGR; ``forward`` output (N, num_classes, h, w); for
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
            elif b == 4:  # pool4: stride 1 (hole algorithm); training net: pad 1 for kernel 3, 0 for kernel 2
                pool = nn.MaxPool2d(k, stride=1, padding=spec.train_pool4_padding, ceil_mode=True)
            else:  # pool5: 3x3 stride 1 pad 1 in every variant
                pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
            self.add_module(f"pool{b}", pool)
        # test.prototxt's pool4 (pad 1 in every variant); parameter-free
        self.pool4_test = nn.MaxPool2d(k, stride=1, padding=spec.test_pool4_padding, ceil_mode=True)
        self.pool5a = (
            nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True) if spec.pool5a else None
        )
        self.fc6 = nn.Conv2d(
            512, spec.fc_channels, spec.fc6_kernel, padding=spec.fc6_padding, dilation=spec.fc6_dilation
        )
        self.fc7 = nn.Conv2d(spec.fc_channels, spec.fc_channels, 1)
        self.fc8 = nn.Conv2d(spec.fc_channels, num_classes, 1)
        self.drop6 = KeyedDropout(0.5)
        self.drop7 = KeyedDropout(0.5)
        self.relu = nn.ReLU(inplace=True)
        self.msc = nn.ModuleDict()
        self._msc_zoom: dict[str, int] = {}
        if spec.msc:
            for name, ch, stride, zoom in _MSC_BRANCHES:
                self.msc[name] = MScBranch(ch, stride, num_classes)
                self._msc_zoom[name] = zoom
        self.reset_parameters()

    @property
    def test_stride(self) -> int:
        """Pixels per step of ``test_net``'s scores: 8, or 1 for MSc (fused at full resolution)."""
        return 1 if self.spec.msc else self.output_stride

    @property
    def test_offset(self) -> int:
        """Pixel p of the padded input sits at score coordinate (p + test_offset) / test_stride of
        ``test_net``'s output (7 for DeepLab / 7x7 / 4x4, see ``VGGDeepLabSpec.test_offset``; else 0)."""
        return 0 if self.spec.msc else self.spec.test_offset

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise as the release does for new layers: fc8 Gaussian std 0.01, zero bias (prototxt
        ``weight_filler { type: "gaussian" std: 0.01 }``); the MSc branches with ``MSC_FILLER_STD``
        (``DeepLab-MSc*/train.prototxt``: 0.001, 0.005 for pool4_fc, 0.01 for ``*_ms``, pool3_ms constant
        0). The VGG layers, which the release always loads from ImageNet, get Kaiming-normal weights for
        training from scratch, with conv1_1 divided by 64 so that BGR 0..255 inputs (RMS about 64 after
        mean subtraction) give unit-scale activations; without that, lr 0.001 diverges from random weights.
        """
        msc_modules = {id(self.caffe_layer(n)): n for n in self.msc_layer_names()}
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if id(m) in msc_modules:
                    std = MSC_FILLER_STD[msc_modules[id(m)]]
                    if std > 0:
                        nn.init.normal_(m.weight, std=std, generator=generator)
                    else:
                        nn.init.zeros_(m.weight)
                elif name == "fc8":
                    nn.init.normal_(m.weight, std=0.01, generator=generator)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
                    if name == "conv1_1":
                        with torch.no_grad():
                            m.weight.div_(64.0)
                nn.init.zeros_(m.bias)

    def msc_layer_names(self) -> list[str]:
        """Caffe names of the MSc branch layers (``data_conv`` ... ``pool4_ms``); empty without branches."""
        return [f"{branch}_{part}" for branch in self.msc for part in ("conv", "fc", "ms")]

    def caffe_layer_names(self) -> list[str]:
        """Caffe names of the layers holding parameters (``conv1_1`` ... ``fc8``, ``data_conv`` ...)."""
        names = [f"conv{b}_{i}" for b, (n, _) in enumerate(_VGG16_BLOCKS, 1) for i in range(1, n + 1)]
        return names + ["fc6", "fc7", "fc8"] + self.msc_layer_names()

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

    def _trunk(self, x: torch.Tensor, test: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """conv1_1 ... fc8: (fc8 scores, {"data", "pool1" ... "pool5": the MSc taps})."""
        taps: dict[str, torch.Tensor] = {"data": x}
        h = x
        for b, (n, _) in enumerate(_VGG16_BLOCKS, start=1):
            for i in range(1, n + 1):
                h = self.relu(getattr(self, f"conv{b}_{i}")(h))
            h = (self.pool4_test if (test and b == 4) else getattr(self, f"pool{b}"))(h)
            taps[f"pool{b}"] = h
        if self.pool5a is not None:
            h = self.pool5a(h)
        h = self.drop6(self.relu(self.fc6(h)))
        h = self.drop7(self.relu(self.fc7(h)))
        return self.fc8(h), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training net (``train.prototxt``): (N, 3, H, W) -> (N, num_classes, h, w) at stride 8.

        Raises:
            ValueError: an MSc branch's grid differs from fc8's (input sides other than 8k + 1).
        """
        return self._fuse(*self._trunk(x, test=False), x, test=False)

    def test_net(self, x: torch.Tensor) -> torch.Tensor:
        """The test net (``test.prototxt``), before its final INTERP x8 (which ``engine.inference`` applies
        when the scores are used, with ``test_offset`` as the PADDING crop).

        DeepLab / 7x7 / 4x4: pool4 padded by 1, so (N, 3, 514, 514) -> (N, C, 67, 67), score k on padded
        pixel 8k - 7. LargeFOV: the training net's layers, 513 -> 65, score k on pixel 8k. MSc: the
        ``fc_fusion`` sum of data_ms, INTERP(pool1_ms, 2), INTERP(pool2_ms, 4), INTERP(pool3_ms, 8),
        INTERP(pool4_ms, 8) and INTERP(fc8, 8): (N, 3, H, W) -> (N, C, H, W) for H, W of 8k + 1 pixels.

        Raises:
            ValueError: MSc branch sizes that do not meet (input sides other than 8k + 1).
        """
        return self._fuse(*self._trunk(x, test=True), x, test=True)

    def _fuse(self, out: torch.Tensor, taps: dict[str, torch.Tensor], x: torch.Tensor, test: bool) -> torch.Tensor:
        """fc8 plus the MSc branch scores (``fc_fusion``, ELTWISE SUM): at stride 8 in the training net, at
        full resolution after each branch's INTERP in the test net. Without branches, fc8 as it is."""
        if test and self.msc:
            out = caffe_interp(out, 8)
        for name, branch in self.msc.items():
            score = branch(taps[name], test=test)
            if test:
                score = caffe_interp(score, self._msc_zoom[name])
            if score.shape != out.shape:
                raise ValueError(
                    f"MSc {'test' if test else 'training'} net: branch {name}_ms gives {tuple(score.shape[-2:])} "
                    f"scores but fc8 gives {tuple(out.shape[-2:])} for input {tuple(x.shape[-2:])}: use input "
                    "sides of 8k + 1 pixels (321, 513) as the release"
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
