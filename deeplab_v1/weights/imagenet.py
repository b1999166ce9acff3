"""ImageNet VGG-16 -> DeepLab v1 initial weights (paper Sec. 3.2), from a PyTorch-layout VGG-16.

The common PyTorch layout of VGG-16 (the one torchvision uses) names the 13 convolutions
``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}`` (conv1_1 ... conv5_3) and the three fully connected
layers ``classifier.0`` (fc6, (4096, 25088)), ``classifier.3`` (fc7, (4096, 4096)) and ``classifier.6``
(fc8, (1000, 4096)), each with ``.weight`` and ``.bias``.

What the conversion does:

1. **Input space of conv1_1** (``input_space="torchvision"``, the default). torchvision's VGG-16 takes
   RGB scaled to 0..1 and normalised, ``x_tv[c] = (p[c] / 255 - mean[c]) / std[c]`` with
   mean = (0.485, 0.456, 0.406), std = (0.229, 0.224, 0.225) (R, G, B), while DeepLab (and Caffe's VGG-16)
   takes BGR 0..255 minus ``MEAN_BGR`` = (104.008, 116.669, 122.675): ``x[c'] = p[c'] - M[c']``. With c'
   the BGR index of RGB channel c, substituting ``p = x + M`` gives, for conv1_1 (weight W, bias b):

   - ``W'[:, c'] = W[:, c] / (255 * std[c])`` (input channels flipped RGB -> BGR and rescaled);
   - ``b' = b + sum_{c, kh, kw} W[:, c, kh, kw] * (M[c'] / 255 - mean[c]) / std[c]`` (the mean difference
     folded into the bias).

   The converted conv1_1 gives exactly the torchvision response wherever its 3x3 window lies inside the
   image. On the 1-pixel border the zero padding differs: DeepLab pads with the colour ``MEAN_BGR``
   (0 after subtraction), torchvision with its ImageNet mean (0 after normalisation); the two colours
   differ by less than 1.1 (0..255 scale), so border responses differ by ``W * 0.02`` or less.
   ``input_space="caffe"`` skips this step, for Caffe's VGG-16 re-saved in the PyTorch layout (already
   BGR 0..255 mean-subtracted).
2. **fc6/fc7 as convolutions.** fc6 (4096, 25088) is reshaped to (4096, 512, 7, 7) (both Caffe and PyTorch
   flatten pool5 as channel, row, column); fc7 to (4096, 4096, 1, 1).
3. **Decimation** ("spatially subsampling (by simple decimation)", paper Sec. 3.2) to the target fc6:
   7x7 -> 4x4 keeps rows and columns [0, 2, 4, 6]; 7x7 -> 3x3 keeps [0, 3, 6]; 4096 -> 1024 channels
   (LargeFOV) keeps every 4th output channel [0, 4, 8, ..., 4092] of fc6, and the same subset of fc7's
   outputs and of fc7's inputs (fc7's inputs are fc6's outputs). Whether the release's
   ``vgg16_20M.caffemodel`` was made with exactly these indices is not documented and cannot be checked
   here (the file is not available); the paper only says "simple decimation".
4. **New layers**: the 1000-way ImageNet fc8 is dropped; fc8 is new (Gaussian std 0.01, zero bias, as the
   release's ``weight_filler``), and so are the MSc branches (same filler).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ..data.transforms import MEAN_BGR, TORCHVISION_MEAN_RGB, TORCHVISION_STD_RGB
from ..models.state_dict import strip_module_prefix
from .decimation import decimate_fc6, decimate_fc7, decimation_indices
from .errors import WeightsError
from .mapping import map_source_layers
from .report import SourceLayer

__all__ = [
    "TORCHVISION_MEAN_RGB",  # defined in deeplab_v1.data.transforms (with MEAN_BGR), re-exported
    "TORCHVISION_STD_RGB",
    "VGG16_FEATURE_INDICES",
    "VGG16_CONV_NAMES",
    "decimation_indices",  # defined in .decimation, re-exported
    "decimate_fc6",
    "decimate_fc7",
    "torchvision_conv1_1_to_caffe",
    "is_imagenet_vgg16",
    "imagenet_layers",
    "imagenet_to_deeplab",
]

VGG16_CONV_NAMES: tuple[str, ...] = (
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
)
#: ``features.<i>`` index of each VGG-16 convolution in the PyTorch layout (ReLU/pool modules in between).
VGG16_FEATURE_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
#: ``classifier.<i>`` index of fc6, fc7, fc8 in the PyTorch layout.
VGG16_CLASSIFIER_INDICES: dict[str, int] = {"fc6": 0, "fc7": 3, "fc8": 6}


def torchvision_conv1_1_to_caffe(
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    mean_bgr: Sequence[float] = MEAN_BGR,
    mean_rgb: Sequence[float] = TORCHVISION_MEAN_RGB,
    std_rgb: Sequence[float] = TORCHVISION_STD_RGB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1_1 for RGB 0..1 normalised input -> conv1_1 for BGR 0..255 mean-subtracted input (module
    docstring, step 1).

    Args:
        weight: (64, 3, 3, 3) torchvision conv1_1 weight, input channels R, G, B.
        bias: (64,).
        mean_bgr: the mean DeepLab subtracts (0..255, B, G, R).
        mean_rgb, std_rgb: torchvision's normalisation (0..1, R, G, B).

    Returns:
        (weight, bias) with input channels B, G, R, computed in float64 and returned in the input dtype.
    """
    dtype = weight.dtype
    w = weight.double()
    std = torch.tensor(std_rgb, dtype=torch.float64, device=w.device)
    mean = torch.tensor(mean_rgb, dtype=torch.float64, device=w.device)
    m_caffe_rgb = torch.tensor(list(mean_bgr)[::-1], dtype=torch.float64, device=w.device)
    # constant each RGB input channel carries when DeepLab's input is 0: (M / 255 - mean) / std
    offset = (m_caffe_rgb / 255.0 - mean) / std
    new_bias = bias.double() + (w * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    new_w = (w / (255.0 * std).view(1, 3, 1, 1)).flip(1)  # RGB -> BGR
    return new_w.to(dtype).contiguous(), new_bias.to(dtype)


def is_imagenet_vgg16(state_dict: Mapping[str, object]) -> bool:
    """True for a state dict in the PyTorch VGG-16 layout (has ``features.0.weight``)."""
    return "features.0.weight" in state_dict


def imagenet_layers(
    state_dict: Mapping[str, torch.Tensor], *, input_space: str = "torchvision"
) -> tuple[dict[str, tuple[str, list[torch.Tensor]]], list[str]]:
    """The VGG-16 layers of a PyTorch-layout state dict, as Caffe-named layers.

    Args:
        state_dict: ``features.*`` / ``classifier.*`` tensors (module docstring); a ``module.`` prefix
            (DataParallel) is removed.
        input_space: ``"torchvision"`` (RGB 0..1 normalised; conv1_1 converted, module docstring step 1)
            or ``"caffe"`` (BGR 0..255 mean-subtracted already; no change).

    Returns:
        ({caffe name: (type, [weight, bias])}, unused keys). conv1_1 ... conv5_3 are ``"Convolution"``
        (out, in, 3, 3); fc6, fc7, fc8 are ``"InnerProduct"`` (out, in) as in Caffe's VGG-16.

    Raises:
        WeightsError: a batch-norm VGG (``features.1.running_mean``), a missing key, a wrong shape,
            an unknown ``input_space``.
    """
    if input_space not in ("torchvision", "caffe"):
        raise WeightsError(f"input_space must be 'torchvision' or 'caffe', got {input_space!r}")
    sd = strip_module_prefix(state_dict)
    if "features.1.running_mean" in sd:
        raise WeightsError(
            "this is a VGG-16 with batch normalisation (features.1.running_mean); DeepLab v1 uses plain VGG-16"
        )
    keys = [(n, f"features.{i}") for n, i in zip(VGG16_CONV_NAMES, VGG16_FEATURE_INDICES)]
    keys += [(n, f"classifier.{i}") for n, i in VGG16_CLASSIFIER_INDICES.items()]
    layers: dict[str, tuple[str, list[torch.Tensor]]] = {}
    used: set[str] = set()
    for name, prefix in keys:
        wk, bk = f"{prefix}.weight", f"{prefix}.bias"
        if wk not in sd or bk not in sd:
            if name == "fc8":  # the ImageNet classifier is dropped anyway
                continue
            raise WeightsError(f"ImageNet VGG-16 state dict lacks {wk!r} / {bk!r} ({name})")
        w, b = sd[wk], sd[bk]
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise WeightsError(f"{wk}: expected tensors, got {type(w).__name__}")
        conv = name.startswith("conv")
        if (conv and w.dim() != 4) or (not conv and w.dim() != 2) or b.shape != (w.shape[0],):
            raise WeightsError(
                f"{name} ({wk}): unexpected shapes weight {tuple(w.shape)}, bias {tuple(b.shape)} for VGG-16"
            )
        if name == "conv1_1" and input_space == "torchvision":
            if w.shape[1] != 3:
                raise WeightsError(f"conv1_1 ({wk}): expected 3 input channels, got {tuple(w.shape)}")
            w, b = torchvision_conv1_1_to_caffe(w, b)
        layers[name] = ("Convolution" if conv else "InnerProduct", [w, b])
        used.update((wk, bk))
    return layers, sorted(k for k in sd if k not in used)


def imagenet_to_deeplab(
    state_dict: Mapping[str, torch.Tensor],
    model_name: str,
    *,
    num_classes: int = 21,
    input_space: str = "torchvision",
    generator: Optional[torch.Generator] = None,
    model: Optional[nn.Module] = None,
) -> dict[str, torch.Tensor]:
    """A full DeepLab v1 state dict initialised from an ImageNet VGG-16 (module docstring).

    Args:
        state_dict: PyTorch-layout VGG-16 (``features.0.weight`` ...), e.g. torchvision's ``vgg16`` file.
        model_name: the v1 variant (``deeplab``, ``deeplab-7x7``, ``deeplab-4x4``, ``deeplab-largefov``,
            ``deeplab-msc``, ``deeplab-msc-largefov``); fc6 is decimated to its kernel and width.
        num_classes: classes of the new fc8.
        input_space: ``"torchvision"`` (default; conv1_1 converted to BGR 0..255) or ``"caffe"``.
        generator: random generator for the new layers (fc8, MSc branches: Gaussian std 0.01, zero bias).
        model: the target network, only for its parameter names and shapes (default: ``model_name`` built
            on the meta device, so nothing of the size of the model is allocated twice).

    Returns:
        ``{parameter name: tensor}`` for every parameter of the model (``model.load_state_dict`` takes it),
        on the device of the input tensors; layers copied unchanged may share memory with the input.

    Raises:
        WeightsError: not a usable VGG-16 state dict (missing keys, shapes, batch norm), or one that
            cannot be mapped onto the model.
    """
    layers, unused = imagenet_layers(state_dict, input_space=input_space)
    if model is None:
        from ..models import build_model

        with torch.device("meta"):
            model = build_model(model_name, num_classes)
    sources = {n: SourceLayer(n, t, blobs) for n, (t, blobs) in layers.items()}
    loaded, report = map_source_layers(
        sources, model, source="ImageNet VGG-16 state dict", source_kind=f"imagenet-{input_space}", imagenet=True
    )
    report.unused.extend(unused)
    device = layers["conv1_1"][1][0].device
    out: dict[str, torch.Tensor] = {}
    for key, ref in model.state_dict().items():
        if key in loaded:
            out[key] = loaded[key]
        elif key.endswith(".bias"):
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype, device=device)
        else:  # fc8 and MSc branches: the release's gaussian filler, std 0.01
            out[key] = torch.empty(ref.shape, dtype=ref.dtype, device=device).normal_(0.0, 0.01, generator=generator)
    return out
