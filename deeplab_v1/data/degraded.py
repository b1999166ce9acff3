"""DIAGNOSTIC score source: DCNN-like fc8 scores made from degraded ground truth.

This is NOT a network. It exists to work on the fully connected CRF (parameter search, backends, trimap
curves) without a trained DeepLab: it produces scores with the failure mode the paper describes for the
DCNN (Sec. 3.2, 4: correct "blobs" at the right places, but coarse, smooth boundaries from the large
receptive fields and the output_stride of 8), which the CRF is meant to repair. Every output made from it
must be labelled as such.

Recipe, for a (H, W) ground truth:

1. 255 (void) counts as background (0);
2. coarsen: the majority class of each ``stride`` x ``stride`` block (the block grid is shifted by a random
   offset in 0..stride-1, drawn from ``seed`` and the label map's content, so the block edges are not the
   same for every image);
3. one-hot the block classes and sample them at the score-map positions (see Geometry);
4. Gaussian-blur each class plane with ``blur_sigma`` pixels (done on the stride-8 grid, sigma / 8 cells);
5. mix with the uniform distribution, p = confidence * blurred + (1 - confidence) / C, and give
   logits = temperature * log(p).

Geometry (that of the network and ``engine.inference.upsample_scores``): score (i, j) <-> pixel (8i, 8j);
the map has ``ceil((S - 1) / 8) + 1`` rows for S = H (or ``max(H, pad_to)`` when ``pad_to`` is given, the
padded area being background, as the test-time padding makes a 513 input give 65 x 65 scores), likewise for
the columns. So ``(h - 1) * 8 + 1 >= H``: upsampling x8 corner-aligned and cropping covers the image.

Measured with the defaults (stride 32, blur_sigma 24, confidence 0.9, temperature 1, seed 0) on 246
VOC 2012 val images (a subset of the 1,449): pixel accuracy of the argmax after ``upsample_scores`` 95.25 %
(void pixels not counted), mIoU 78.7 %. The errors lie along object boundaries: accuracy 67.2 % in the
trimap band of width 5 pixels, 84.8 % at width 20, 99.99 % farther than 20 pixels from the void outlines.
The dense CRF with the release's LargeFOV parameters (w1 4, sigma_alpha 49, sigma_beta 5, w2 3,
sigma_gamma 3, 10 iterations) on 20 of those images raises pixel accuracy from 94.6 % to 95.3 % and mIoU
from 69.7 % to 71.7 %, so there is something for the CRF to fix. (Stride 32 with blur_sigma 12 gives
96.1 %; stride 40 with blur_sigma 12, 95.1 %.)

``degraded_probs`` gives the same scores as the CRF takes them: upsampled x8 corner-aligned (Caffe's
INTERP, as ``engine.inference.upsample_scores``), cropped to the image and softmaxed. It is the one
generator of degraded-ground-truth probabilities: the tests and tools that need DCNN-like probabilities
for the CRF use it.
"""

from __future__ import annotations

import zlib

import numpy as np
import scipy.ndimage

from crf.dense import scores_to_probs

__all__ = ["degraded_scores", "degraded_probs", "score_map_size"]

#: output_stride of the scores, as the DeepLab v1 networks give them.
OUTPUT_STRIDE = 8


def score_map_size(size: int, output_stride: int = OUTPUT_STRIDE) -> int:
    """Score rows (or columns) covering ``size`` pixels with score k <-> pixel output_stride * k:
    ceil((size - 1) / output_stride) + 1 (513 -> 65, 500 -> 64)."""
    return -(-(size - 1) // output_stride) + 1


def degraded_scores(label: np.ndarray, num_classes: int = 21, *, stride: int = 32, blur_sigma: float = 24.0,
                    confidence: float = 0.9, temperature: float = 1.0, output_stride: int = OUTPUT_STRIDE,
                    pad_to: int | None = None, seed: int = 0) -> np.ndarray:
    """DIAGNOSTIC fc8-like scores from degraded ground truth (see the module docstring).

    Args:
        label: (H, W) uint8 ground truth, values 0..num_classes-1 and 255 (treated as background).
        num_classes: C.
        stride: block size of the coarsening, in pixels (larger: coarser boundaries, lower accuracy).
        blur_sigma: Gaussian blur of the class planes, in pixels (smooths the block corners and makes the
            scores uncertain near boundaries).
        confidence: weight of the blurred one-hot against the uniform distribution (0 < confidence <= 1).
        temperature: scale of the logits (temperature * log p); larger: a stronger unary for the CRF.
        output_stride: score spacing in pixels (8 for DeepLab v1).
        pad_to: give the scores of the image padded (bottom/right) to this size, as the network sees it.
        seed: with the label content, selects the block-grid offset.

    Returns:
        (C, h, w) float32 logits with h = score_map_size(max(H, pad_to)), w likewise.

    Raises:
        ValueError: a label that is not 2-D or holds values outside 0..C-1 and 255, or bad parameters.
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.size == 0:
        raise ValueError(f"label must be a non-empty (H, W) map, got shape {label.shape}")
    if stride < 1 or output_stride < 1:
        raise ValueError(f"stride and output_stride must be >= 1 pixel, got {stride}, {output_stride}")
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    if blur_sigma < 0 or temperature <= 0:
        raise ValueError(f"blur_sigma must be >= 0 and temperature > 0, got {blur_sigma}, {temperature}")
    lab = label.astype(np.int64)
    lab[lab == 255] = 0
    if lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"label values {np.unique(lab[(lab < 0) | (lab >= num_classes)])[:10].tolist()} "
                         f"are outside 0..{num_classes - 1} and 255")
    height, width = label.shape
    if pad_to is not None:
        # the padded area is mean colour for the network: background here
        ph, pw = max(height, pad_to), max(width, pad_to)
        lab = np.pad(lab, ((0, ph - height), (0, pw - width)))
        height, width = ph, pw

    # 2. block majority on a grid shifted by (oy, ox): block of pixel y is (y + oy) // stride
    digest = zlib.crc32(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    rng = np.random.default_rng([int(seed), digest])
    oy, ox = (int(v) for v in rng.integers(0, stride, size=2))
    bh, bw = (height + oy - 1) // stride + 1, (width + ox - 1) // stride + 1
    by = (np.arange(height) + oy) // stride
    bx = (np.arange(width) + ox) // stride
    block = (by[:, None] * bw + bx[None, :]).ravel()
    counts = np.bincount(block * num_classes + lab.ravel(), minlength=bh * bw * num_classes)
    majority = counts.reshape(bh * bw, num_classes).argmax(1).reshape(bh, bw)

    # 3. sample the block classes at the score positions: score k <-> pixel output_stride * k
    h, w = score_map_size(height, output_stride), score_map_size(width, output_stride)
    sy = np.minimum(output_stride * np.arange(h), height - 1)
    sx = np.minimum(output_stride * np.arange(w), width - 1)
    coarse = majority[np.ix_(by[sy], bx[sx])]
    planes = (coarse[None] == np.arange(num_classes)[:, None, None]).astype(np.float32)

    # 4. blur each class plane on the score grid (sigma in score cells)
    sigma = blur_sigma / output_stride
    if sigma > 0:
        planes = scipy.ndimage.gaussian_filter(planes, sigma=(0, sigma, sigma), mode="nearest")
    # 5. soft probabilities -> logits
    probs = confidence * planes + (1.0 - confidence) / num_classes
    return np.ascontiguousarray(temperature * np.log(np.maximum(probs, 1e-12)), dtype=np.float32)


def degraded_probs(label: np.ndarray, num_classes: int = 21, **kwargs) -> np.ndarray:
    """DIAGNOSTIC class probabilities at image resolution from degraded ground truth, as the CRF takes them.

    :func:`degraded_scores` (``kwargs`` are its keyword arguments), upsampled by ``output_stride``
    corner-aligned (score k <-> pixel output_stride * k; linear, as Caffe's INTERP and
    ``engine.inference.upsample_scores``), cropped to the label's size and softmaxed.

    Returns:
        (C, H, W) float32 probabilities summing to 1 over C, H x W the label's size.

    Raises:
        ValueError: as :func:`degraded_scores`.
    """
    scores = degraded_scores(label, num_classes, **kwargs)
    stride = kwargs.get("output_stride", OUTPUT_STRIDE)
    height, width = np.asarray(label).shape
    c, h, w = scores.shape
    if stride != 1:
        # zoom to (h - 1) * stride + 1 rows: with grid_mode=False scipy maps the corners onto each other,
        # so output row y samples score row y / stride (corner-aligned)
        size = ((h - 1) * stride + 1, (w - 1) * stride + 1)
        scores = scipy.ndimage.zoom(scores, (1, size[0] / h, size[1] / w), order=1, mode="nearest", grid_mode=False)
    return scores_to_probs(scores[:, :height, :width])
