"""Test-time inference: pad, forward, keep the stride-8 scores, upsample x8 as Caffe's INTERP layer.

Source: the release's ``test.prototxt``: the image is padded at the bottom/right to 513 (514 for
``DeepLab``) with the mean colour, fc8 is computed, upsampled by ``INTERP zoom_factor: 8`` (bilinear,
corner-aligned: 65 -> (65 - 1) * 8 + 1 = 513) and cropped to the image. We keep the raw fc8 scores at
output_stride (compact, float16, one file per image) and upsample when they are used, which gives the same
numbers as upsampling first.

Score cache file (``.npz``): ``scores`` float16 (C, h, w); ``stride`` (int, pixels per score step; 1 when
the scores are already at image resolution, as for multi-scale inference); ``height``, ``width`` (the
image size in pixels); ``source`` (``network`` or ``degraded-gt``).
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


def upsample_scores(scores: np.ndarray | torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """Caffe INTERP ``zoom_factor: stride`` then crop to the image.

    Args:
        scores: (C, h, w) scores at ``stride`` pixels per step (score k <-> pixel stride * k).
        stride: the zoom factor (8 for v1), 1 for scores already at image resolution.
        height, width: image size in pixels; must satisfy (h - 1) * stride + 1 >= height (same for w).

    Returns:
        (C, height, width) float32 tensor.

    Raises:
        ValueError: the scores do not cover the image.
    """
    t = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).float()
    if t.ndim != 3:
        raise ValueError(f"scores must be (C, h, w), got shape {tuple(t.shape)}")
    c, h, w = t.shape
    out_h, out_w = (h - 1) * stride + 1, (w - 1) * stride + 1
    if out_h < height or out_w < width:
        raise ValueError(
            f"scores of size {h}x{w} at stride {stride} cover {out_h}x{out_w} pixels, less than the image {height}x{width}"
        )
    if stride != 1:
        t = F.interpolate(t[None], size=(out_h, out_w), mode="bilinear", align_corners=True)[0]
    return t[:, :height, :width].contiguous()


def kept_size(size: int, stride: int) -> int:
    """Score rows (or columns) needed to cover ``size`` pixels: ceil((size - 1) / stride) + 1."""
    return -(-(size - 1) // stride) + 1


@dataclass
class ScoreMap:
    """Cached scores of one image (see the module docstring)."""

    scores: np.ndarray  # (C, h, w) float16/float32
    stride: int
    height: int
    width: int
    source: str = "network"

    def upsampled(self) -> torch.Tensor:
        """(C, height, width) float32 scores at image resolution."""
        return upsample_scores(self.scores, self.stride, self.height, self.width)

    def save(self, path: Path) -> None:
        """Write as ``.npz`` atomically: float16 scores, or float32 where a score exceeds float16's range
        (an untrained network can give such scores; they are never silently turned into inf)."""
        finite16 = float(np.abs(self.scores).max(initial=0.0)) < float(np.finfo(np.float16).max)
        buf = io.BytesIO()
        np.savez_compressed(
            buf, scores=self.scores.astype(np.float16 if finite16 else np.float32), stride=self.stride, height=self.height, width=self.width,
            source=self.source,
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
                return cls(z["scores"], int(z["stride"]), int(z["height"]), int(z["width"]), str(z["source"]))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable score cache ({exc})") from exc


def _forward_padded(model: nn.Module, image: np.ndarray, size: int, stride: int, device: torch.device) -> torch.Tensor:
    """Pad (bottom/right, mean colour) to at least ``size`` (and to a whole number of strides + 1 for larger
    images), forward, and keep the rows/cols covering the image: (C, kh, kw)."""
    h, w = image.shape[:2]
    target = max(size, (kept_size(max(h, w), stride) - 1) * stride + 1)
    padded, _ = pad_to(image, None, target)
    x = image_to_tensor(padded)[None].to(device)
    out = model(x)[0]
    kh, kw = kept_size(h, stride), kept_size(w, stride)
    if out.shape[-2] < kh or out.shape[-1] < kw:
        raise ValueError(f"model output {tuple(out.shape[-2:])} does not cover the image {h}x{w} at stride {stride}")
    return out[:, :kh, :kw].float().cpu()


@torch.no_grad()
def predict(model: nn.Module, image_bgr: np.ndarray, *, size: int, scales: Sequence[float] = (1.0,),
            flip: bool = False, device: torch.device | str = "cpu") -> ScoreMap:
    """Scores of one image.

    Single scale, no flip (v1, the release): the raw fc8 scores at the model's ``output_stride``.
    Multi-scale and/or flip (v3 Sec. 4.3 / v3+ Sec. 4): for each scale and flip, the scores are upsampled to
    the image, turned into probabilities and averaged; the log of the average is kept at stride 1.

    Args:
        model: in eval mode; maps (1, 3, H, W) mean-subtracted BGR to (1, C, h, w); has ``output_stride``.
        image_bgr: (H, W, 3) uint8 BGR 0..255.
        size: padding size in pixels (513; 514 for ``deeplab``), scaled with each scale.

    Returns:
        ``ScoreMap`` (float32 scores).
    """
    stride = int(getattr(model, "output_stride", 8))
    device = torch.device(device)
    h, w = image_bgr.shape[:2]
    if list(scales) == [1.0] and not flip:
        scores = _forward_padded(model, image_bgr, size, stride, device)
        return ScoreMap(scores.numpy(), stride, h, w)
    total = None
    count = 0
    for s in scales:
        img = image_bgr if s == 1.0 else cv2.resize(
            image_bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR
        )
        for flipped in ([False, True] if flip else [False]):
            x = img[:, ::-1].copy() if flipped else img
            sh, sw = x.shape[:2]
            sc = _forward_padded(model, x, max(1, round(size * s)), stride, device)
            up = upsample_scores(sc, stride, sh, sw)
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
