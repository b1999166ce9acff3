"""DeepLab trained end to end: any network of ``build_model`` followed by the fully connected CRF as a
layer (CRF-as-RNN, Zheng et al. ICCV 2015; the step DeepLab v1 Sec. 6 names; issue #24 item 3).

``CRFasRNN(dcnn, ...)`` holds the network as ``dcnn`` and ``crf.DenseCRFLayer`` as ``crf``, so its state dict
is the network's keys under ``dcnn.`` and the layer's under ``crf.`` (``train.lr_mult`` addresses the
layer as ``crf``). The forward pass is paper Fig. 1 with the CRF inside:

1. the network's scores on the mean-subtracted BGR input (stride 8 for v1; ``model(x)`` in training,
   ``test_net(x)`` at test, as the plain networks);
2. upsampled bilinearly (corner-aligned, as Caffe's INTERP) to the input: in training to the crop's size
   (the trainer's ``label_mode: upsample`` resize), at test by the test net's zoom and offset
   (``engine.inference.upsample_scores``'s geometry) cropped to the input;
3. refined by ``iterations_train`` (training) or ``iterations_test`` (eval) mean-field iterations; the
   layer's bilateral kernel reads the RGB image recovered from the input (the pixel mean added back,
   channels flipped; the test padding becomes the mean colour).

The output is ``(N, C, H, W)`` logits at the input's resolution (``full_resolution``); the test stage
caches them at stride 1 (``test_stride``, ``test_offset``), as it does the MSc nets' fused scores.

Memory per crop (C = 21), on top of the network's own: the layer keeps per mean-field iteration a few
``(N H W, C)`` float32 tensors for backward (``crf.layer``: the filter's transpose is rerun, the lattice
passes are not stored), plus the crop's two lattices. Peak resident growth of one forward + backward
(``tiny-test`` + layer, CPU, float32): 22 MiB for a 65 x 65 crop at 5 iterations (34 MiB at 10); 495 MiB
for a 321 x 321 crop at 5 iterations, 866 MiB at 10 (about 74 MiB per extra iteration). A batch of B
crops needs B times that: LargeFOV's batch of 30 x 321 at 5 iterations adds about 15 GiB, hence
``iter_size`` in ``experiments/voc12-deeplab-largefov-crfrnn.yaml``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from crf import CRFParams
from crf.layer import DenseCRFLayer
from torch import nn

from ..pixel_means import MEAN_BGR

__all__ = ["CRFasRNN", "crf_rnn", "crf_rnn_options", "network_state"]


class CRFasRNN(nn.Module):
    """A segmentation network with the dense CRF's mean-field inference as its last layer.

    Args:
        dcnn: a network of ``build_model`` ((N, 3, H, W) mean-subtracted BGR -> (N, C, h, w) logits, with
            ``output_stride``; v1 models also ``test_net``, ``test_stride``, ``test_offset``).
        num_classes: C.
        params: the layer's initial ``crf.CRFParams`` (kernel widths fixed).
        learn: the learned layer parameters (``crf.layer.LEARNABLE`` names).
        iterations_train, iterations_test: mean-field iterations in train and eval mode (>= 1).

    Raises:
        CRFInputError (a ValueError): a bad layer argument (``crf.DenseCRFLayer``'s message).
        ValueError: iterations < 1.

    Source: Zheng et al. ICCV 2015; issue #24 item 3.
    """

    #: The scores are at the input's resolution, in training as at test (the trainer does not shrink
    #: the labels; the test stage caches them at stride 1).
    full_resolution = True
    test_stride = 1
    test_offset = 0

    def __init__(self, dcnn: nn.Module, num_classes: int, params: CRFParams, learn: Sequence[str],
                 iterations_train: int = 5, iterations_test: int = 10) -> None:
        super().__init__()
        for name, value in (("iterations_train", iterations_train), ("iterations_test", iterations_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.dcnn = dcnn
        self.crf = DenseCRFLayer(num_classes, params, learn=tuple(learn), iterations=iterations_test)
        self.num_classes = num_classes
        self.iterations_train, self.iterations_test = iterations_train, iterations_test
        # not in the state dict: a constant, and checkpoints stay the network's keys plus the layer's
        self.register_buffer("mean_bgr", torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    # ------------------------------------------------------------------ what the stages ask the model
    @property
    def output_stride(self) -> int:
        """The network's stride (the test padding's multiple)."""
        return int(getattr(self.dcnn, "output_stride", 8))

    @property
    def bn_frozen(self) -> bool:
        return bool(getattr(self.dcnn, "bn_frozen", False))

    def set_output_stride(self, stride: int) -> None:
        """The v3/v3+ network's encoder stride (``AttributeError`` for v1, as the plain net)."""
        self.dcnn.set_output_stride(stride)

    def freeze_bn(self, frozen: bool = True) -> None:
        """The network's BatchNorm frozen (``AttributeError`` for v1, as the plain net)."""
        self.dcnn.freeze_bn(frozen)

    def build_record(self) -> dict[str, Any]:
        """The layer's ``build_model(..., crf_rnn=...)`` arguments as plain data (``params`` as a mapping), for
        checkpoints (their ``crf_rnn``; :func:`crf_rnn_options` turns it back)."""
        return {"params": self.crf.params.to_dict(), "learn": list(self.crf.learn),
                "iterations_train": self.iterations_train, "iterations_test": self.iterations_test}

    # ------------------------------------------------------------------ forward
    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB 0..255 float32 of the network input ``x`` (mean-subtracted BGR): the mean
        added back and the channels flipped (clamped to 0..255 against rounding)."""
        bgr = x.detach().float() + self.mean_bgr.to(x.device)
        return bgr.flip(1).clamp(0.0, 255.0)

    def refine(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Mean-field refined logits of full-resolution ``scores`` (N, C, H, W) for the input ``x``."""
        iterations = self.iterations_train if self.training else self.iterations_test
        return self.crf(self.rgb(x), scores.float(), iterations=iterations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training net: the network's ``model(x)`` scores resized bilinearly (corner-aligned) to the
        input, refined. (N, 3, H, W) mean-subtracted BGR -> (N, C, H, W) float32 logits."""
        scores = self.dcnn(x).float()
        up = F.interpolate(scores, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=True)
        return self.refine(x, up)

    def test_net(self, x: torch.Tensor) -> torch.Tensor:
        """Test net: the network's test-net scores zoomed by its test stride (corner-aligned, Caffe's
        INTERP), cropped by its test offset and to the input, refined. (N, 3, H, W) -> (N, C, H, W).

        Raises:
            ValueError: the zoomed scores do not cover the input (names both sizes).
        """
        net = getattr(self.dcnn, "test_net", None)
        scores = (net(x) if callable(net) else self.dcnn(x)).float()
        stride = int(getattr(self.dcnn, "test_stride", self.output_stride))
        offset = int(getattr(self.dcnn, "test_offset", 0))
        h, w = scores.shape[-2:]
        zh, zw = (h - 1) * stride + 1, (w - 1) * stride + 1
        if zh - offset < x.shape[-2] or zw - offset < x.shape[-1]:
            raise ValueError(f"scores {h}x{w} at stride {stride} (offset {offset}) do not cover the input "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        if stride != 1:
            scores = F.interpolate(scores, size=(zh, zw), mode="bilinear", align_corners=True)
        up = scores[..., offset:offset + x.shape[-2], offset:offset + x.shape[-1]]
        return self.refine(x, up)


def crf_rnn(dcnn: nn.Module, num_classes: int, *, params: CRFParams, learn: Sequence[str],
            iterations_train: int = 5, iterations_test: int = 10) -> CRFasRNN:
    """``dcnn`` with the CRF layer appended (``build_model(..., crf_rnn={...})``); see :class:`CRFasRNN`."""
    return CRFasRNN(dcnn, num_classes, params, learn, iterations_train, iterations_test)


def crf_rnn_options(record: Optional[dict]) -> Optional[dict]:
    """``build_model``'s ``crf_rnn`` argument from a checkpoint's ``crf_rnn`` record
    (:meth:`CRFasRNN.build_record`); None (a checkpoint of a plain network) gives None."""
    if record is None:
        return None
    return {**record, "params": CRFParams.from_dict(dict(record["params"]))}


def network_state(state_dict: dict) -> dict:
    """The network's part of a ``CRFasRNN`` state dict (``dcnn.`` keys, prefix removed; ``crf.`` keys
    dropped), so a plain network can start from an end-to-end trained one; any other state dict as it is."""
    if not any(isinstance(k, str) and k.startswith("crf.") for k in state_dict):
        return state_dict
    return {k[len("dcnn."):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith("dcnn.")}
