"""Test-time inference: pad, run the test net, keep its scores, upsample x8 as Caffe's INTERP layer.

Source: the release's ``test.prototxt``: the image is padded at the bottom/right to 513 (514 for
``DeepLab``) with the mean colour (0 after mean subtraction), the test net is run, fc8 is upsampled by
``INTERP zoom_factor: 8`` (bilinear, corner-aligned: 65 -> (65 - 1) * 8 + 1 = 513), cropped by
``fc8_crop`` (DeepLab / 7x7 / 4x4: PADDING -7 / -8, 67 -> 529 -> 514) and cropped to the image. For the
single-scale nets we keep the raw fc8 scores at stride 8 (compact, float16, one file per image) and
upsample when they are used, which gives the same numbers as upsampling first. The MSc test nets sum
branches upsampled by x1, x2, x4 and x8 (``fc_fusion``), so their scores are kept at stride 1: the
release's resolution, which the CRF and the evaluation need.

Score cache file (``.npz``): ``scores`` float16 (C, h, w); ``stride`` (int, pixels per score step; 1 when
the scores are already at image resolution, as for MSc or multi-scale inference); ``offset`` (pixels the
upsampled map is cropped by at the top/left: 7 for DeepLab / 7x7 / 4x4, else 0; absent in older files:
0); ``height``, ``width`` (the image size in pixels); ``source`` (``network`` or ``degraded-gt``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import MEAN_BGR, image_to_tensor, pad_to
from ..atomic import atomic_write_bytes


def upsample_scores(scores: np.ndarray | torch.Tensor, stride: int, height: int, width: int,
                    offset: int = 0) -> torch.Tensor:
    """Caffe INTERP ``zoom_factor: stride``, crop ``offset`` pixels at the top/left (the test net's
    PADDING layer), then crop to the image.

    Args:
        scores: (C, h, w) scores at ``stride`` pixels per step (score k <-> pixel stride * k - offset).
        stride: the zoom factor (8 for v1), 1 for scores already at image resolution.
        height, width: image size in pixels; must satisfy (h - 1) * stride + 1 - offset >= height (same
            for w).
        offset: pixels cropped at the top and the left after the zoom (7 for DeepLab's ``fc8_crop``).

    Returns:
        (C, height, width) float32 tensor.

    Raises:
        ValueError: the scores do not cover the image.
    """
    t = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).float()
    if t.ndim != 3:
        raise ValueError(f"scores must be (C, h, w), got shape {tuple(t.shape)}")
    c, h, w = t.shape
    if offset < 0:
        raise ValueError(f"offset must be >= 0 pixels, got {offset}")
    out_h, out_w = (h - 1) * stride + 1 - offset, (w - 1) * stride + 1 - offset
    if out_h < height or out_w < width:
        raise ValueError(
            f"scores of size {h}x{w} at stride {stride} (offset {offset}) cover {out_h}x{out_w} pixels, less than "
            f"the image {height}x{width}"
        )
    if stride != 1:
        # only the rows/columns that cover the image are interpolated (the same numbers: each output
        # pixel depends on its two neighbouring scores only)
        t = t[:, : kept_size(height, stride, offset), : kept_size(width, stride, offset)]
        h, w = t.shape[-2:]
        t = F.interpolate(t[None], size=((h - 1) * stride + 1, (w - 1) * stride + 1), mode="bilinear",
                          align_corners=True)[0]
    return t[:, offset:offset + height, offset:offset + width].contiguous()


def kept_size(size: int, stride: int, offset: int = 0) -> int:
    """Score rows (or columns) needed to cover ``size`` pixels from pixel ``offset`` of the zoomed map:
    ceil((size - 1 + offset) / stride) + 1."""
    return -(-(size - 1 + offset) // stride) + 1


@dataclass
class ScoreMap:
    """Cached scores of one image (see the module docstring)."""

    scores: np.ndarray  # (C, h, w) float16/float32
    stride: int
    height: int
    width: int
    source: str = "network"
    offset: int = 0

    def upsampled(self) -> torch.Tensor:
        """(C, height, width) float32 scores at image resolution."""
        return upsample_scores(self.scores, self.stride, self.height, self.width, self.offset)

    def save(self, path: Path) -> None:
        """Write as ``.npz`` atomically: float16 scores, or float32 where a score exceeds float16's range
        (an untrained network can give such scores; they are never silently turned into inf)."""
        finite16 = float(np.abs(self.scores).max(initial=0.0)) < float(np.finfo(np.float16).max)
        buf = io.BytesIO()
        np.savez_compressed(
            buf, scores=self.scores.astype(np.float16 if finite16 else np.float32), stride=self.stride, height=self.height, width=self.width,
            source=self.source, offset=self.offset,
        )
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "ScoreMap":
        """Read a cache file.

        Raises:
            ValueError: unreadable or not a score cache (the message names the file).
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                offset = int(z["offset"]) if "offset" in z.files else 0
                return cls(z["scores"], int(z["stride"]), int(z["height"]), int(z["width"]), str(z["source"]), offset)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable score cache ({exc})") from exc


def test_geometry(model: nn.Module) -> tuple[int, int]:
    """(stride, offset) of the scores ``run_test_net`` gives: the v1 models' ``test_stride`` /
    ``test_offset`` (see ``DeepLabVGG.test_net``), else (``output_stride``, 0)."""
    stride = int(getattr(model, "test_stride", getattr(model, "output_stride", 8)))
    return stride, int(getattr(model, "test_offset", 0))


def run_test_net(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's test net on (N, 3, H, W) mean-subtracted BGR: ``model.test_net`` for the v1 models (the
    release's ``test.prototxt``), ``model(x)`` for the others."""
    test_net = getattr(model, "test_net", None)
    return test_net(x) if callable(test_net) else model(x)


def padded_size(height: int, width: int, size: int, multiple: int = 8) -> int:
    """Side the test input is padded to: ``size`` (513; 514 for DeepLab), or for a larger image the
    smallest ``size + multiple * k`` that holds it (so the release's 8k + 1 / 16k + 2 alignment holds)."""
    side = max(height, width)
    return size if side <= size else size + multiple * -(-(side - size) // multiple)


def _forward_padded(model: nn.Module, image: np.ndarray, size: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Pad (bottom/right, mean colour) to ``padded_size``, run the test net, and keep the rows/cols
    covering the image: ((C, kh, kw) scores, stride, offset)."""
    h, w = image.shape[:2]
    stride, offset = test_geometry(model)
    padded, _ = pad_to(image, None, padded_size(h, w, size, int(getattr(model, "output_stride", 8))))
    x = image_to_tensor(padded)[None].to(device)
    out = run_test_net(model, x)[0]
    kh, kw = kept_size(h, stride, offset), kept_size(w, stride, offset)
    if out.shape[-2] < kh or out.shape[-1] < kw:
        raise ValueError(f"model output {tuple(out.shape[-2:])} does not cover the image {h}x{w} at stride {stride}")
    return out[:, :kh, :kw].float().cpu(), stride, offset


@torch.no_grad()
def predict(model: nn.Module, image_bgr: np.ndarray, *, size: int, scales: Sequence[float] = (1.0,),
            flip: bool = False, device: torch.device | str = "cpu") -> ScoreMap:
    """Scores of one image.

    Single scale, no flip (v1, the release): the test net's scores (``DeepLabVGG.test_net``): raw fc8 at
    stride 8 (with DeepLab's offset 7), or the MSc nets' fused scores at stride 1.
    Multi-scale and/or flip (v3 Sec. 4.3 / v3+ Sec. 4): for each scale and flip, the scores are upsampled to
    the image, turned into probabilities and averaged; the log of the average is kept at stride 1.

    Args:
        model: in eval mode; maps (1, 3, H, W) mean-subtracted BGR to (1, C, h, w); has ``output_stride``.
        image_bgr: (H, W, 3) uint8 BGR 0..255.
        size: padding size in pixels (513; 514 for ``deeplab``), scaled with each scale.

    Returns:
        ``ScoreMap`` (float32 scores).
    """
    device = torch.device(device)
    h, w = image_bgr.shape[:2]
    if list(scales) == [1.0] and not flip:
        scores, stride, offset = _forward_padded(model, image_bgr, size, device)
        return ScoreMap(scores.numpy(), stride, h, w, offset=offset)
    total = None
    count = 0
    for s in scales:
        img = image_bgr if s == 1.0 else cv2.resize(
            image_bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR
        )
        for flipped in ([False, True] if flip else [False]):
            x = img[:, ::-1].copy() if flipped else img
            sh, sw = x.shape[:2]
            sc, stride, offset = _forward_padded(model, x, max(1, round(size * s)), device)
            up = upsample_scores(sc, stride, sh, sw, offset)
            if (sh, sw) != (h, w):
                up = F.interpolate(up[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            if flipped:
                up = up.flip(-1)
            p = torch.softmax(up, dim=0)
            total = p if total is None else total + p
            count += 1
    probs = total / count
    return ScoreMap(torch.log(probs.clamp_min(1e-8)).numpy(), 1, h, w)


def label_from_scores(scores: torch.Tensor) -> np.ndarray:
    """Arg-max labels (H, W) uint8 of (C, H, W) scores or probabilities."""
    return scores.argmax(0).to(torch.uint8).numpy()


def mean_bgr() -> tuple[float, float, float]:
    """The release's mean colour (B, G, R)."""
    return tuple(MEAN_BGR)  # type: ignore[return-value]
