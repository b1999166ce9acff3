"""ResNet-50/101 backbones for DeepLab v3/v3+ with atrous convolution, Multi-Grid and cascaded blocks.

Sources: He et al. 2016 (bottleneck ResNet); DeepLab v3 Sec. 3.1 (output_stride by replacing strides with
atrous rates), Sec. 3.2 (block5-block7 as copies of block4), Sec. 3.2.1 (Multi-Grid unit rates), Sec. 4
("when output_stride = 8, block3 and block4 contain atrous convolution with rate = 2 and rate = 4").

Parameter names follow the common PyTorch layout so that an ImageNet checkpoint in that layout loads with
``load_state_dict`` (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, each ``Bottleneck`` with ``conv1``,
``bn1``, ``conv2``, ``bn2``, ``conv3``, ``bn3``, ``downsample.0`` (1x1 conv), ``downsample.1`` (BN)); the
stride sits on ``conv2`` (the 3x3) of the first unit of layer2-layer4 ("ResNet v1.5"), where the
TensorFlow release of the papers puts it on the last unit of the previous block.

Deep stem (``root="3x3-conv"``, the "ResNet-101 with a deep stem" of PSPNet and of the papers' TensorFlow
``resnet_v1_101_beta``): three 3x3 convolutions 64 (stride 2), 64, 128, named as the deep-stem ResNets of
timm: ``conv1.0`` (conv), ``conv1.1`` (BN), ``conv1.3`` (conv), ``conv1.4`` (BN), ``conv1.6`` (conv) and
``bn1`` (BN of the third conv), then the 3x3 max pooling; layer1 then takes 128 channels.

Dilation rule (one rate per block, as the papers): walking layer2, layer3, layer4 (and layer5-layer7 of the
cascade), a layer whose stride-2 would take the stride past ``output_stride`` gets stride 1 and its rate
doubles; every unit of a layer runs at the layer's rate times its Multi-Grid unit rate, where Multi-Grid
applies to layer4 and the cascaded layers (v3 Sec. 3.2.1: output_stride 16, Multi_Grid (1, 2, 4) -> rates
(2, 4, 8) in block4). The cascaded layers (v3 Sec. 3.2) have stride 2 in their first unit, which atrous
convolution replaces, so their rates double block after block: at output_stride 16, block4-block7 run at 2,
4, 8, 16 (times Multi-Grid).

Input of ``ResNetBackbone.forward``: (N, 3, H, W) float32 in the space the weights expect (the DeepLab model
converts the pipeline's mean-subtracted BGR first, see ``deeplab_v1.models.deeplabv3``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .aspp import BN_MOMENTUM, batch_norm, init_conv_bn
from .state_dict import strip_module_prefix

#: Units per layer (layer1..layer4) of the bottleneck ResNets.
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
ROOTS: tuple[str, ...] = ("7x7", "3x3-conv")
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)


class Bottleneck(nn.Module):
    """Bottleneck unit: 1x1 ``planes`` -> 3x3 ``planes`` (stride, dilation) -> 1x1 ``4 * planes``, BN after
    each, ReLU after the first two and after the residual sum; ``downsample`` (1x1 conv with the unit's
    stride + BN) on the shortcut when the shape changes.

    Shapes: (N, inplanes, H, W) -> (N, 4 * planes, H / stride, W / stride) (rounded up).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = batch_norm(planes, bn_momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = batch_norm(planes, bn_momentum)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = batch_norm(width, bn_momentum)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                            batch_norm(width, bn_momentum))

    def set_stride_dilation(self, stride: int, dilation: int) -> None:
        """Set the 3x3 convolution's stride / rate (padding = rate) and the shortcut's stride in place.

        Raises:
            ValueError: a stride of 2 on a unit built without a shortcut convolution.
        """
        if stride != 1 and self.downsample is None:
            raise ValueError("a unit without a downsample shortcut cannot take stride 2")
        self.conv2.stride = (stride, stride)
        self.conv2.dilation = (dilation, dilation)
        self.conv2.padding = (dilation, dilation)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _check_multi_grid(multi_grid: Sequence[int], units: int) -> tuple[int, ...]:
    grid = tuple(int(r) for r in multi_grid)
    if len(grid) != units or min(grid) < 1:
        raise ValueError(f"multi_grid must be {units} positive unit rates (one per unit of block4), got {multi_grid!r}")
    return grid


class ResNetBackbone(nn.Module):
    """ResNet-50/101 feature extractor with atrous convolution (no global pooling, no fc).

    Args:
        depth: 50 or 101.
        root: stem, ``"7x7"`` (one 7x7/2 conv 64) or ``"3x3-conv"`` (deep stem, three 3x3 convs 64/64/128).
        output_stride: 8, 16 or 32; stride of the last feature map (v3 Sec. 3.1).
        multi_grid: unit rates of the three units of layer4 and of each cascaded layer (v3 Sec. 3.2.1).
        num_cascade: number of cascaded copies of block4 (0-3: block5, block6, block7; v3 Sec. 3.2), named
            ``layer5`` ... ``layer7``; they have no ImageNet weights.
        bn_momentum: BN momentum (torch convention; 0.0003 = the papers' decay 0.9997).

    ``forward`` returns ``{"low_level": layer1 output (N, 256, H/4, W/4), "out": last layer output
    (N, 2048, H/output_stride, W/output_stride)}`` (sides rounded up: 513 -> 129, 33 at 16, 65 at 8).

    Raises:
        ValueError: unknown depth / root / output_stride, bad multi_grid or num_cascade.
    """

    def __init__(self, depth: int = 101, root: str = "7x7", output_stride: int = 16,
                 multi_grid: Sequence[int] = (1, 2, 4), num_cascade: int = 0,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        key = f"resnet{depth}"
        if key not in RESNET_LAYERS:
            raise ValueError(f"ResNet depth must be 50 or 101, got {depth!r}")
        if root not in ROOTS:
            raise ValueError(f"root must be one of {ROOTS}, got {root!r}")
        if not 0 <= num_cascade <= 3:
            raise ValueError(f"num_cascade must be 0..3 (block5-block7), got {num_cascade!r}")
        self.depth, self.root, self.num_cascade = depth, root, num_cascade
        self.multi_grid = _check_multi_grid(multi_grid, RESNET_LAYERS[key][3])
        if root == "7x7":
            self.conv1: nn.Module = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            stem_out = 64
        else:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False), batch_norm(64, bn_momentum), nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, bias=False), batch_norm(64, bn_momentum), nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, 3, padding=1, bias=False),
            )
            stem_out = 128
        self.bn1 = batch_norm(stem_out, bn_momentum)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem_out
        layer_units = list(RESNET_LAYERS[key]) + [RESNET_LAYERS[key][3]] * num_cascade
        for i, units in enumerate(layer_units, start=1):
            planes = 64 * 2 ** min(i - 1, 3)
            stride = 1 if i == 1 else 2
            blocks = [Bottleneck(inplanes, planes, stride, bn_momentum=bn_momentum)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes, bn_momentum=bn_momentum) for _ in range(units - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.num_layers = len(layer_units)
        self.out_channels = inplanes
        self.low_level_channels = 256
        self.output_stride = 0
        self.set_output_stride(output_stride)
        init_conv_bn(self)  # new layers (training from scratch, the cascaded blocks)

    def layers(self) -> list[nn.Sequential]:
        """layer1 ... layer4 (and the cascaded layer5 ... layer7) in order."""
        return [getattr(self, f"layer{i}") for i in range(1, self.num_layers + 1)]

    def layer_rates(self, output_stride: int) -> list[tuple[int, list[int]]]:
        """(stride, per-unit rates) of every layer for ``output_stride`` (see the module docstring).

        Raises:
            ValueError: ``output_stride`` not 8, 16 or 32.
        """
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        current, rate, plan = 4, 1, []
        for i, layer in enumerate(self.layers(), start=1):
            stride = 1
            if i > 1:
                if current < output_stride:
                    stride, current = 2, current * 2
                else:
                    rate *= 2
            grid = self.multi_grid if i >= 4 else (1,) * len(layer)
            plan.append((stride, [rate * g for g in grid]))
        return plan

    def set_output_stride(self, output_stride: int) -> None:
        """Change strides and rates in place to extract features at ``output_stride`` (8, 16 or 32); the
        parameters stay the same (v3 Sec. 4.1: train at 16, evaluate at 8).

        Raises:
            ValueError: ``output_stride`` not 8, 16 or 32.
        """
        plan = self.layer_rates(output_stride)
        for layer, (stride, rates) in zip(self.layers(), plan):
            for u, (unit, r) in enumerate(zip(layer, rates)):
                unit.set_stride_dilation(stride if u == 0 else 1, r)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        x = low_level
        for layer in self.layers()[1:]:
            x = layer(x)
        return {"low_level": low_level, "out": x}


@dataclass
class LoadReport:
    """What ``load_resnet_checkpoint`` did.

    Attributes:
        loaded: keys copied into the backbone.
        ignored: checkpoint keys dropped on purpose (the ImageNet classifier ``fc.*``).
        missing: backbone keys the checkpoint lacks (the cascaded ``layer5``-``layer7`` are expected here).
        unexpected: checkpoint keys the backbone does not have (other than ``fc.*``).
    """

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        return (f"loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} (fc.*), "
                f"missing {len(self.missing)} [{short(self.missing)}], "
                f"unexpected {len(self.unexpected)} [{short(self.unexpected)}]")


def load_resnet_checkpoint(
    backbone: ResNetBackbone, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load an ImageNet ResNet checkpoint in the common PyTorch layout into ``backbone``.

    ``fc.*`` is ignored; a ``module.`` prefix (DataParallel) and a ``state_dict`` wrapper are removed;
    ``num_batches_tracked`` may be absent. A file is read with ``torch.load(weights_only=True)``.

    Args:
        backbone: the ResNet backbone (``model.backbone`` of a DeepLab v3/v3+ ResNet model).
        path_or_state_dict: a ``.pth`` file or a mapping from parameter names to tensors.
        strict: raise when backbone keys other than the cascaded layers are missing, or when the checkpoint
            has unexpected keys; with ``strict=False`` they are only listed in the report.

    Returns:
        A ``LoadReport`` (``str()`` gives one line for logs).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a tensor's shape differs (the message names the key and both shapes; e.g. a deep-stem
            checkpoint for a ``root="7x7"`` backbone), or, with ``strict``, missing / unexpected keys.
    """
    if isinstance(path_or_state_dict, Mapping):
        state = dict(path_or_state_dict)
        source = "state_dict"
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ResNet checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        source = path
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = dict(state["state_dict"])
    state = strip_module_prefix(state)
    report = LoadReport()
    own = backbone.state_dict()
    cascade = tuple(f"layer{i}." for i in range(5, 8))
    to_load, mismatched = {}, []
    for key, value in state.items():
        if key.startswith("fc."):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, backbone {tuple(own[key].shape)}")
        else:
            to_load[key] = value
    if mismatched:
        raise ValueError(f"{source}: {len(mismatched)} tensors do not fit ResNet-{backbone.depth} "
                         f"(root={backbone.root!r}): " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    report.missing = [k for k in own if k not in to_load and not k.endswith("num_batches_tracked")]
    report.loaded = sorted(to_load)
    hard_missing = [k for k in report.missing if not k.startswith(cascade)]
    if strict and (hard_missing or report.unexpected):
        raise ValueError(f"{source} does not match ResNet-{backbone.depth} (root={backbone.root!r}): "
                         f"missing {hard_missing[:10]}{' ...' if len(hard_missing) > 10 else ''}, "
                         f"unexpected {report.unexpected[:10]}{' ...' if len(report.unexpected) > 10 else ''}")
    backbone.load_state_dict(to_load, strict=False)
    return report


__all__ = ["Bottleneck", "LoadReport", "OUTPUT_STRIDES", "RESNET_LAYERS", "ROOTS", "ResNetBackbone",
           "load_resnet_checkpoint"]
