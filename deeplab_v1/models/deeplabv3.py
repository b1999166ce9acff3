"""DeepLab v3 and v3+ models registered in ``deeplab_v1.models.build_model``.

Names (``BUILDERS``):

- ``deeplabv3-resnet101``, ``deeplabv3-resnet50``: ResNet + ASPP with image pooling + 1x1 classifier
  (v3 Sec. 3.3, Fig. 5); logits at the encoder output_stride (16 by default).
- ``deeplabv3-cascade-resnet101``: ResNet-101 with block5-block7 cascaded after block4 and a 1x1 classifier
  on the last block (v3 Sec. 3.2, Fig. 3 (b), Tables 2-4); no ASPP. Multi-Grid default (1, 2, 1), the best
  cascade of v3 Table 3.
- ``deeplabv3plus-resnet101``: v3 encoder (ResNet-101 + ASPP) + decoder on layer1 (v3+ Sec. 3.1, Fig. 2).
- ``deeplabv3plus-xception65``: modified aligned Xception-65 + ASPP + decoder, atrous separable
  convolutions in ASPP and decoder by default (v3+ Sec. 3.2, Table 5 "SC").

Options (keyword-only): ``output_stride`` (8 / 16 / 32, default 16; the encoder's), ``multi_grid`` (unit
rates of block4 and the cascaded blocks; default (1, 2, 4), (1, 2, 1) for the cascade, (1, 1, 1) for
Xception's exit flow), ``separable`` (default False for ResNet, True for Xception), ``root`` (ResNet stem,
``"7x7"`` or ``"3x3-conv"``), ``num_classes``, ``bn_momentum`` (default 0.0003, the papers' decay 0.9997),
``input_space`` and ``dropout`` (after the ASPP projection).

Input: (N, 3, H, W) float32 in the pipeline's convention, BGR 0..255 minus the mean (B, G, R) =
(104.008, 116.669, 122.675) (Caffe, ``deeplab_v1.data.transforms``). ImageNet ResNet weights in the common
PyTorch layout expect RGB / 255 normalised by mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225);
``input_space="torchvision"`` (the default) converts inside ``forward`` (an exact per-channel affine map and a
channel flip, no parameters), ``"caffe"`` feeds the input as it is, ``"inception"`` gives RGB scaled to
[-1, 1] (the space of the papers' TensorFlow Xception weights).

Output: (N, num_classes, h, w) float32 logits at the model's ``output_stride`` (v3: the encoder's, e.g.
513 -> 33x33 at 16, 65x65 at 8; v3+: stride 4 after the decoder, 513 -> 129x129). The model does not
upsample to the input size: the trainer upsamples logits to the label size (v3 Sec. 4.1 "upsampling
logits"), inference upsamples them to the image (corner-aligned, (h - 1) * stride + 1 = 513).

Every model has ``output_stride`` (stride of the returned logits), ``encoder_output_stride``,
``set_output_stride(os)`` (train at 16, evaluate at 8: strides, rates and ASPP rates change in place) and
``freeze_bn(flag)`` (BN layers in eval mode with frozen parameters, v3 Sec. 4.1 second stage).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from ..pixel_means import MEAN_BGR, TORCHVISION_MEAN_RGB, TORCHVISION_STD_RGB
from .aspp import ASPP, BN_MOMENTUM, aspp_rates, init_conv_bn
from .decoder import Decoder
from .resnet import ResNetBackbone, load_resnet_checkpoint
from .xception import XceptionBackbone

#: The pipeline's mean (B, G, R), 0..255: ``deeplab_v1.pixel_means.MEAN_BGR`` under the name this
#: module has always exported.
CAFFE_MEAN_BGR = MEAN_BGR
INPUT_SPACES: tuple[str, ...] = ("caffe", "torchvision", "inception")


class InputSpace(nn.Module):
    """Maps the pipeline's mean-subtracted BGR 0..255 input to the space the backbone's weights expect.

    ``"caffe"``: identity. ``"torchvision"``: BGR -> RGB, add the Caffe mean, divide by 255, normalise by
    ImageNet mean / std. ``"inception"``: BGR -> RGB, add the mean, ``x / 127.5 - 1``. The constants are
    non-persistent buffers (not in ``state_dict``).

    Shapes: (N, 3, H, W) -> (N, 3, H, W) float32.

    Raises:
        ValueError: unknown space; ``forward`` on an input without 3 channels.
    """

    def __init__(self, space: str) -> None:
        super().__init__()
        if space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, got {space!r}")
        self.space = space
        mean_rgb = torch.tensor(CAFFE_MEAN_BGR[::-1])
        if space == "torchvision":
            std = torch.tensor(TORCHVISION_STD_RGB)
            scale = 1.0 / (255.0 * std)
            bias = (mean_rgb / 255.0 - torch.tensor(TORCHVISION_MEAN_RGB)) / std
        else:  # inception (caffe does not use them)
            scale = torch.full((3,), 1.0 / 127.5)
            bias = mean_rgb / 127.5 - 1.0
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bias", bias.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) mean-subtracted BGR input, got shape {tuple(x.shape)}")
        if self.space == "caffe":
            return x
        return x.flip(1) * self.scale + self.bias

    def extra_repr(self) -> str:
        return f"space={self.space!r}"


def freeze_batchnorm(model: nn.Module, flag: bool = True) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode (running statistics used and not updated) and set
    ``requires_grad = not flag`` on its weight and bias. Returns the number of BN layers touched.

    A later ``model.train()`` switches them back to training mode unless the model re-applies the freeze
    (the DeepLab models here do, see ``freeze_bn``). Source: v3 Sec. 4.1 ("freeze batch normalization
    parameters" for the output_stride 8 stage).
    """
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if flag:
                m.eval()
            else:
                m.train(model.training)
            for p in m.parameters(recurse=False):
                p.requires_grad_(not flag)
            count += 1
    return count


def _init_head(module: nn.Module, classifier: nn.Conv2d) -> None:
    init_conv_bn(module)
    # The classifier is initialised as the release's new layers: Gaussian std 0.01, zero bias.
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class _DeepLabV3Base(nn.Module):
    """Shared behaviour: input space, output_stride switching, BN freezing."""

    backbone: ResNetBackbone | XceptionBackbone
    aspp: ASPP | None

    def __init__(self, backbone: nn.Module, input_space: str) -> None:
        super().__init__()
        self.input_space = InputSpace(input_space)
        self.backbone = backbone
        self.bn_frozen = False

    @property
    def encoder_output_stride(self) -> int:
        """Stride of the backbone's last feature map (8, 16 or 32)."""
        return self.backbone.output_stride

    def set_output_stride(self, output_stride: int) -> None:
        """Switch the encoder output_stride in place (8, 16 or 32): backbone strides / atrous rates and the
        ASPP rates ((6, 12, 18) at 16, doubled at 8); no parameter changes (v3 Sec. 4.1, Table 10).

        Raises:
            ValueError: ``output_stride`` not 8, 16 or 32.
        """
        rates = aspp_rates(output_stride)  # validates first, so nothing changes on a bad value
        self.backbone.set_output_stride(output_stride)
        if self.aspp is not None:
            self.aspp.set_rates(rates)

    def load_imagenet_backbone(self, path: str | os.PathLike) -> str:
        """Load an ImageNet checkpoint in the common PyTorch layout into the backbone (the heads keep their
        initialisation); returns a one-line report for the run's record.

        Raises:
            NotImplementedError: a backbone whose ImageNet checkpoints cannot be loaded yet (Xception-65).
            FileNotFoundError, ValueError: see ``models.resnet.load_resnet_checkpoint``.
        """
        if not isinstance(self.backbone, ResNetBackbone):
            raise NotImplementedError("ImageNet Xception-65 checkpoints cannot be loaded yet")
        return f"ImageNet ResNet backbone: {load_resnet_checkpoint(self.backbone, path)}"

    def freeze_bn(self, flag: bool = True) -> None:
        """Freeze (``flag=True``) or unfreeze every BN layer: eval mode (running mean / variance fixed) and
        no gradient for gamma / beta. The freeze survives ``model.train()``."""
        self.bn_frozen = flag
        freeze_batchnorm(self, flag)

    def train(self, mode: bool = True) -> "_DeepLabV3Base":
        super().train(mode)
        if self.bn_frozen:
            freeze_batchnorm(self, True)
        return self


class DeepLabV3(_DeepLabV3Base):
    """DeepLab v3: backbone -> ASPP -> 1x1 classifier, or (``aspp=None``) the cascade model: backbone with
    block5-block7 -> 1x1 classifier on its 2048 channels.

    Args:
        backbone: ``ResNetBackbone`` or ``XceptionBackbone``.
        num_classes: classifier output channels (21 for PASCAL VOC).
        aspp: the ASPP head, or None for the cascade model.
        input_space: see ``InputSpace``.

    Shapes: (N, 3, H, W) mean-subtracted BGR -> (N, num_classes, ceil(H / os), ceil(W / os)), os the
    encoder output_stride. In training mode N >= 2 is needed by the image-pooling BN.

    Raises:
        ValueError: ``num_classes`` < 1 or bad ``input_space``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, aspp: ASPP | None, input_space: str) -> None:
        super().__init__(backbone, input_space)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.aspp = aspp
        in_ch = aspp.out_channels if aspp is not None else backbone.out_channels
        self.classifier = nn.Conv2d(in_ch, num_classes, 1)
        _init_head(self.aspp if aspp is not None else nn.Identity(), self.classifier)

    @property
    def output_stride(self) -> int:
        """Stride of the returned logits (the encoder output_stride)."""
        return self.backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(self.input_space(x))["out"]
        if self.aspp is not None:
            feats = self.aspp(feats)
        return self.classifier(feats)


class DeepLabV3Plus(_DeepLabV3Base):
    """DeepLab v3+: backbone -> ASPP (the v3 encoder, 256 channels) -> decoder with the low-level features ->
    logits at stride 4 (v3+ Fig. 2 without the final x4 upsampling).

    Args:
        backbone: ``ResNetBackbone`` or ``XceptionBackbone``.
        num_classes: classifier output channels.
        aspp: the ASPP head.
        separable: atrous separable convolutions in the decoder.
        input_space: see ``InputSpace``.

    Shapes: (N, 3, H, W) -> (N, num_classes, ceil(H / 4), ceil(W / 4)) for any encoder output_stride.
    """

    output_stride = 4  # the decoder works on the stride-4 low-level features

    def __init__(self, backbone: nn.Module, num_classes: int, aspp: ASPP, separable: bool, input_space: str,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__(backbone, input_space)
        self.num_classes = num_classes
        self.aspp = aspp
        self.decoder = Decoder(backbone.low_level_channels, num_classes, aspp.out_channels, separable=separable,
                               bn_momentum=bn_momentum)
        _init_head(self.aspp, self.decoder.classifier)
        _init_head(self.decoder, self.decoder.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(self.input_space(x))
        return self.decoder(self.aspp(feats["out"]), feats["low_level"])


def _resnet(depth: int, *, head: str, num_classes: int, output_stride: int, multi_grid: Sequence[int],
            separable: bool, root: str, bn_momentum: float, input_space: str, dropout: float,
            num_cascade: int = 0) -> nn.Module:
    rates = aspp_rates(output_stride)
    if head == "cascade" and separable:
        raise ValueError("separable=True needs an ASPP head; the cascade model has none")
    backbone = ResNetBackbone(depth, root=root, output_stride=output_stride, multi_grid=multi_grid,
                              num_cascade=num_cascade, bn_momentum=bn_momentum)
    if head == "cascade":
        return DeepLabV3(backbone, num_classes, None, input_space)
    aspp = ASPP(backbone.out_channels, rates, separable=separable, dropout=dropout, bn_momentum=bn_momentum)
    if head == "v3":
        return DeepLabV3(backbone, num_classes, aspp, input_space)
    return DeepLabV3Plus(backbone, num_classes, aspp, separable, input_space, bn_momentum)


def deeplabv3_resnet101(*, num_classes: int = 21, output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 4),
                        separable: bool = False, root: str = "7x7", bn_momentum: float = BN_MOMENTUM,
                        input_space: str = "torchvision", dropout: float = 0.1) -> DeepLabV3:
    """DeepLab v3, ResNet-101 + ASPP(6, 12, 18 at output_stride 16) + image pooling (v3 Table 5 last row).

    Raises:
        ValueError: a bad option value (the message names it).
    """
    return _resnet(101, head="v3", num_classes=num_classes, output_stride=output_stride, multi_grid=multi_grid,
                   separable=separable, root=root, bn_momentum=bn_momentum, input_space=input_space, dropout=dropout)


def deeplabv3_resnet50(*, num_classes: int = 21, output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 4),
                       separable: bool = False, root: str = "7x7", bn_momentum: float = BN_MOMENTUM,
                       input_space: str = "torchvision", dropout: float = 0.1) -> DeepLabV3:
    """DeepLab v3 with ResNet-50 (same head as ``deeplabv3_resnet101``)."""
    return _resnet(50, head="v3", num_classes=num_classes, output_stride=output_stride, multi_grid=multi_grid,
                   separable=separable, root=root, bn_momentum=bn_momentum, input_space=input_space, dropout=dropout)


def deeplabv3_cascade_resnet101(*, num_classes: int = 21, output_stride: int = 16,
                                multi_grid: Sequence[int] = (1, 2, 1), separable: bool = False, root: str = "7x7",
                                bn_momentum: float = BN_MOMENTUM, input_space: str = "torchvision",
                                num_cascade: int = 3) -> DeepLabV3:
    """DeepLab v3 cascade model: ResNet-101 with ``num_cascade`` copies of block4 (block5 ... block7, rates
    doubling block after block) and a 1x1 classifier on the last block's 2048 channels (v3 Sec. 3.2, Fig. 3
    (b); best model block7 + Multi-Grid (1, 2, 1), Tables 3-4). The cascaded blocks start from random weights.

    Raises:
        ValueError: ``separable=True`` (no ASPP), ``num_cascade`` not 0..3, or another bad option.
    """
    return _resnet(101, head="cascade", num_classes=num_classes, output_stride=output_stride,
                   multi_grid=multi_grid, separable=separable, root=root, bn_momentum=bn_momentum,
                   input_space=input_space, dropout=0.0, num_cascade=num_cascade)


def deeplabv3plus_resnet101(*, num_classes: int = 21, output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 4),
                            separable: bool = False, root: str = "7x7", bn_momentum: float = BN_MOMENTUM,
                            input_space: str = "torchvision", dropout: float = 0.1) -> DeepLabV3Plus:
    """DeepLab v3+, ResNet-101 encoder (v3) + decoder on layer1 (v3+ Sec. 4.2, Table 3); logits at stride 4."""
    return _resnet(101, head="v3plus", num_classes=num_classes, output_stride=output_stride, multi_grid=multi_grid,
                   separable=separable, root=root, bn_momentum=bn_momentum, input_space=input_space, dropout=dropout)


def xception65_model(*, head: str = "v3plus", num_classes: int = 21, output_stride: int = 16,
                     multi_grid: Sequence[int] = (1, 1, 1), separable: bool = True,
                     bn_momentum: float = BN_MOMENTUM, input_space: str = "torchvision",
                     dropout: float = 0.1) -> nn.Module:
    """Xception-65 + ASPP, with (``head="v3plus"``) or without (``head="v3"``) the decoder (v3+ Table 5 rows).

    Raises:
        ValueError: unknown head or a bad option value.
    """
    if head not in ("v3", "v3plus"):
        raise ValueError(f"head must be 'v3' or 'v3plus', got {head!r}")
    rates = aspp_rates(output_stride)
    backbone = XceptionBackbone(output_stride, multi_grid, bn_momentum)
    aspp = ASPP(backbone.out_channels, rates, separable=separable, dropout=dropout, bn_momentum=bn_momentum)
    if head == "v3":
        return DeepLabV3(backbone, num_classes, aspp, input_space)
    return DeepLabV3Plus(backbone, num_classes, aspp, separable, input_space, bn_momentum)


def deeplabv3plus_xception65(*, num_classes: int = 21, output_stride: int = 16, multi_grid: Sequence[int] = (1, 1, 1),
                             separable: bool = True, bn_momentum: float = BN_MOMENTUM,
                             input_space: str = "torchvision", dropout: float = 0.1) -> DeepLabV3Plus:
    """DeepLab v3+, modified aligned Xception-65 + ASPP + decoder, atrous separable convolution in ASPP and
    decoder (v3+ Sec. 4.3, Table 5 "SC" rows); logits at stride 4. No ``root`` option (Xception's own stem)."""
    return xception65_model(head="v3plus", num_classes=num_classes, output_stride=output_stride,
                            multi_grid=multi_grid, separable=separable, bn_momentum=bn_momentum,
                            input_space=input_space, dropout=dropout)  # type: ignore[return-value]


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3-resnet101": deeplabv3_resnet101,
    "deeplabv3-resnet50": deeplabv3_resnet50,
    "deeplabv3-cascade-resnet101": deeplabv3_cascade_resnet101,
    "deeplabv3plus-resnet101": deeplabv3plus_resnet101,
    "deeplabv3plus-xception65": deeplabv3plus_xception65,
}

__all__ = ["BUILDERS", "CAFFE_MEAN_BGR", "DeepLabV3", "DeepLabV3Plus", "INPUT_SPACES", "InputSpace",
           "deeplabv3_cascade_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3plus_resnet101",
           "deeplabv3plus_xception65", "freeze_batchnorm", "xception65_model"]
