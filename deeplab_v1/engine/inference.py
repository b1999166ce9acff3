"""Test-time inference: pad, run the test net, keep its scores, upsample x8 as Caffe's INTERP layer.

Source: the release's ``test.prototxt``: the image is padded at the bottom/right to 513 (514 for
``DeepLab``) with the mean colour (0 after mean subtraction), the test net is run, fc8 is upsampled by
``INTERP zoom_factor: 8`` (bilinear, corner-aligned: 65 -> (65 - 1) * 8 + 1 = 513), cropped by
``fc8_crop`` (DeepLab / 7x7 / 4x4: PADDING -7 / -8, 67 -> 529 -> 514) and cropped to the image. For the
single-scale nets we keep the raw fc8 scores at stride 8 (compact, float16, one file per image) and
upsample when they are used, which gives the same numbers as upsampling first. The MSc test nets sum
branches upsampled by x1, x2, x4 and x8 (``fc_fusion``), so their scores are kept at stride 1: the
release's resolution, which the CRF and the evaluation need; so are a CRF-as-RNN model's refined scores
(``models.crf_rnn``: ``test_stride`` 1, the CRF inside the net).

Batching (``predict_batch``, ``forward_views``): every image is padded to the same size before the net
sees it, so the images of a batch do not touch each other and batched scores equal one-at-a-time scores
(to float rounding); multi-scale and flip views run batched too, grouped by padded size. The test stage
reads and pads images in loader workers (``ViewDataset``) and writes files on a ``BackgroundWriter``.

Score cache file (``.npz``): ``scores`` float16 (C, h, w); ``stride`` (int, pixels per score step; 1 when
the scores are already at image resolution, as for MSc or multi-scale inference); ``offset`` (pixels the
upsampled map is cropped by at the top/left: 7 for DeepLab / 7x7 / 4x4, else 0; absent in older files:
0); ``height``, ``width`` (the image size in pixels); ``source`` (``network`` or ``degraded-gt``).
"""

from __future__ import annotations

import io
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..atomic import atomic_write_bytes
from ..data.io import read_image
from ..data.transforms import image_to_tensor, pad_to
from .precision import autocast


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

    def probabilities(self) -> np.ndarray:
        """(C, height, width) float32 class probabilities: the softmax over classes of :meth:`upsampled`
        (the CRF's unary input, as the release's test net feeds its DenseCRF layer)."""
        return torch.softmax(self.upsampled(), 0).numpy()

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


@dataclass
class View:
    """One network input of a test image at one scale, maybe mirrored.

    Attributes:
        x: (3, S, S) float32 mean-subtracted BGR, the (scaled, flipped) image padded at the bottom/right
            with the mean colour to S = ``padded_size`` (513 for the release's images).
        height, width: the scaled image inside it (pixels).
        scale: the scale factor; flipped: mirrored left-right.
    """

    x: torch.Tensor
    height: int
    width: int
    scale: float = 1.0
    flipped: bool = False


def image_views(image_bgr: np.ndarray, *, size: int, scales: Sequence[float] = (1.0,), flip: bool = False,
               multiple: int = 8) -> list[View]:
    """The inputs ``predict`` runs for one image: per scale (image bilinearly resized, padding size
    ``round(size * scale)``) the image and, with ``flip``, its mirror, each padded to ``padded_size``.

    Args:
        image_bgr: (H, W, 3) uint8 BGR 0..255.
        size: the padding size at scale 1 (513; 514 for ``deeplab``).
        multiple: the model's output_stride (larger images are padded to ``size + multiple * k``).
    """
    h, w = image_bgr.shape[:2]
    views = []
    for s in scales:
        img = image_bgr if s == 1.0 else cv2.resize(
            image_bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR
        )
        for flipped in ([False, True] if flip else [False]):
            x = img[:, ::-1].copy() if flipped else img
            sh, sw = x.shape[:2]
            padded, _ = pad_to(x, None, padded_size(sh, sw, max(1, round(size * s)), multiple))
            views.append(View(image_to_tensor(padded), sh, sw, float(s), flipped))
    return views


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def input_batch(xs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The (N, 3, S, S) batch of views' inputs ``xs`` (each (3, S, S) on the CPU). For a CUDA ``device``
    they are stacked straight into pinned (page-locked) memory, so that the copy to the GPU is
    asynchronous: pinning each view and then stacking them, as the loader did, gave pageable memory
    again (issue #20)."""
    if device.type != "cuda":
        return torch.stack(list(xs))
    return torch.stack(list(xs), out=_pinned_empty((len(xs), *xs[0].shape), xs[0].dtype))


@torch.no_grad()
def forward_views(model: nn.Module, views: Sequence[View], *, device: torch.device | str = "cpu",
                  batch_size: int = 1, precision: str = "fp32", channels_last: bool = False,
                  net: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list[torch.Tensor]:
    """The test net's scores of each view, run in batches of up to ``batch_size`` views of one padded
    size (padding makes a batch exact: a view's scores do not depend on its batch companions).

    Args:
        net: the forward to call on (N, 3, S, S) (default ``run_test_net(model, .)``; a compiled one).

    Returns:
        per view, (C, kh, kw) float32 CPU scores: the rows/columns covering the view's image
        (``kept_size``) at the test net's stride and offset.

    Raises:
        ValueError: the output does not cover an image.
    """
    device = torch.device(device)
    stride, offset = test_geometry(model)
    if net is None:
        net = lambda x: run_test_net(model, x)  # noqa: E731
    memory = torch.channels_last if channels_last else torch.contiguous_format
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.x.shape), []).append(i)
    out: list[Optional[torch.Tensor]] = [None] * len(views)
    for idx in groups.values():
        for first in range(0, len(idx), max(1, batch_size)):
            chunk = idx[first:first + max(1, batch_size)]
            x = input_batch([views[i].x for i in chunk], device).to(device, non_blocking=True)
            x = x.contiguous(memory_format=memory)
            with autocast(device, precision):
                y = net(x)
            y = y.float()
            for j, i in enumerate(chunk):
                v = views[i]
                kh, kw = kept_size(v.height, stride, offset), kept_size(v.width, stride, offset)
                if y.shape[-2] < kh or y.shape[-1] < kw:
                    raise ValueError(f"model output {tuple(y.shape[-2:])} does not cover the image {v.height}x{v.width} "
                                     f"at stride {stride}")
                out[i] = y[j, :, :kh, :kw].cpu()
    return out  # type: ignore[return-value]


def combine_views(views: Sequence[View], scores: Sequence[torch.Tensor], height: int, width: int,
                  stride: int, offset: int = 0) -> ScoreMap:
    """One image's ``ScoreMap`` from its views' scores: the single unscaled view's scores as they are
    (stride 8, or 1 for MSc), else the log of the mean of the views' probabilities, each upsampled to
    the image and un-mirrored (stride 1; v3 Sec. 4.3)."""
    if len(views) == 1 and views[0].scale == 1.0 and not views[0].flipped:
        return ScoreMap(scores[0].numpy(), stride, height, width, offset=offset)
    total = None
    for v, sc in zip(views, scores):
        up = upsample_scores(sc, stride, v.height, v.width, offset)
        if (v.height, v.width) != (height, width):
            up = F.interpolate(up[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        if v.flipped:
            up = up.flip(-1)
        p = torch.softmax(up, dim=0)
        total = p if total is None else total + p
    probs = total / len(views)
    return ScoreMap(torch.log(probs.clamp_min(1e-8)).numpy(), 1, height, width)


def predict_batch(model: nn.Module, images: Sequence[np.ndarray], *, size: int, scales: Sequence[float] = (1.0,),
                  flip: bool = False, device: torch.device | str = "cpu", batch_size: int = 1,
                  precision: str = "fp32", channels_last: bool = False) -> list[ScoreMap]:
    """``predict`` for several images, their views run ``batch_size`` at a time (``forward_views``)."""
    multiple = int(getattr(model, "output_stride", 8))
    per_image = [image_views(im, size=size, scales=scales, flip=flip, multiple=multiple) for im in images]
    flat = [v for vs in per_image for v in vs]
    scores = forward_views(model, flat, device=device, batch_size=batch_size, precision=precision,
                           channels_last=channels_last)
    stride, offset = test_geometry(model)
    out, k = [], 0
    for im, vs in zip(images, per_image):
        out.append(combine_views(vs, scores[k:k + len(vs)], im.shape[0], im.shape[1], stride, offset))
        k += len(vs)
    return out


@torch.no_grad()
def predict(model: nn.Module, image_bgr: np.ndarray, *, size: int, scales: Sequence[float] = (1.0,),
            flip: bool = False, device: torch.device | str = "cpu", precision: str = "fp32") -> ScoreMap:
    """Scores of one image.

    Single scale, no flip (v1, the release): the test net's scores (``DeepLabVGG.test_net``): raw fc8 at
    stride 8 (with DeepLab's offset 7), or the MSc nets' fused scores at stride 1.
    Multi-scale and/or flip (v3 Sec. 4.3 / v3+ Sec. 4): for each scale and flip, the scores are upsampled to
    the image, turned into probabilities and averaged; the log of the average is kept at stride 1.

    Args:
        model: in eval mode; maps (1, 3, H, W) mean-subtracted BGR to (1, C, h, w); has ``output_stride``.
        image_bgr: (H, W, 3) uint8 BGR 0..255.
        size: padding size in pixels (513; 514 for ``deeplab``), scaled with each scale.
        precision: ``fp32`` (the release), ``bf16`` or ``fp16`` autocast.

    Returns:
        ``ScoreMap`` (float32 scores).
    """
    return predict_batch(model, [image_bgr], size=size, scales=scales, flip=flip, device=device,
                         precision=precision)[0]


class ViewDataset(Dataset):
    """Test images read and turned into their views (``image_views``) in loader workers.

    Items: ``(index, height, width, views)``; batches are lists of items (``data.loader.collate_list``).

    Raises (from ``__getitem__``):
        DataError: an unreadable image.
    """

    def __init__(self, images: Sequence[str | Path], *, size: int, scales: Sequence[float] = (1.0,),
                 flip: bool = False, multiple: int = 8) -> None:
        self.images, self.size, self.scales, self.flip, self.multiple = list(images), size, list(scales), flip, multiple

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, int, int, list[View]]:
        image = read_image(self.images[index])
        views = image_views(image, size=self.size, scales=self.scales, flip=self.flip, multiple=self.multiple)
        return index, image.shape[0], image.shape[1], views


class BackgroundWriter:
    """Writes (score-cache compression, PNG encoding) on threads, so that the device never waits on them.

    ``submit(fn, *args)`` queues a write; at most ``max_pending`` are in flight (then it waits for the
    oldest). ``close()`` (or leaving the ``with`` block) waits for all and raises the first write's error
    in the caller's thread. Each write is atomic (``atomic_write_bytes``), so a killed run leaves whole
    files or none.
    """

    def __init__(self, threads: int = 2, max_pending: int = 16) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="deeplab-writer")
        self._pending: deque[Future] = deque()
        self.max_pending = max(1, max_pending)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:  # the caller's error wins; queued writes are dropped, running ones finish
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)


def label_from_scores(scores: torch.Tensor) -> np.ndarray:
    """Arg-max labels (H, W) uint8 of (C, H, W) scores or probabilities."""
    return scores.argmax(0).to(torch.uint8).numpy()


