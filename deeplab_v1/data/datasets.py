"""Datasets: training crops (the Caffe ``IMAGE_SEG_DATA`` layer) and whole images for inference/evaluation."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .io import DataError, read_image, read_label
from .lists import Sample
from .transforms import image_to_tensor, random_crop_mirror, shrink_label

__all__ = ["TrainDataset", "ImageDataset"]


def _read_pair(sample: Sample, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 BGR and label (H, W) uint8 of a sample, checked to have the same size."""
    if sample.label is None:
        raise DataError(f"{sample.image}: training sample {sample.id!r} has no label file")
    image = read_image(sample.image)
    label = read_label(sample.label, num_classes, sample.label_map)
    if image.shape[:2] != label.shape:
        raise DataError(
            f"{sample.label}: label size {label.shape[0]}x{label.shape[1]} differs from image {sample.image} "
            f"size {image.shape[0]}x{image.shape[1]} (H x W)"
        )
    return image, label


class TrainDataset(Dataset):
    """Random training crops with labels, as the release's data layer gives them.

    Per item: read image and label, (v3 only) rescale by a random factor in ``scale_range`` (image bilinear,
    label nearest), pad to ``crop_size`` (mean colour / 255), uniform random crop, random mirror, subtract
    the mean, and (v1) shrink the label to the score map with ``shrink_label``.

    Reproducibility: the random numbers of item ``i`` come from a generator seeded with
    ``(seed, epoch, i)`` (``numpy.random.SeedSequence``), where ``epoch`` is set with ``set_epoch``. The crop
    of an item therefore depends neither on worker processes nor on the order of access, and a resumed run
    sees the same crops as an uninterrupted one.

    Args:
        samples: labelled samples.
        crop_size: crop side in pixels (321 LargeFOV, 306 DeepLab).
        mirror: random horizontal flip with p = 0.5.
        seed: base seed.
        label_shrink: INTERP ``shrink_factor`` (8 for v1); None keeps the full (crop, crop) label (v3:
            logits are upsampled to the label).
        label_pad_beg: INTERP ``pad_beg`` (-1 for the 306 crop of DeepLab, 0 otherwise).
        num_classes: valid labels are 0..num_classes-1 and 255.
        scale_range: (low, high) random scale factors, uniform (v3: (0.5, 2.0)); None: no rescaling.

    Items: ``(image, label)``: image (3, crop, crop) float32 mean-subtracted BGR; label int64 (h, w) with
    h = w = (crop + label_pad_beg - 1) // label_shrink + 1 (41 for 321), or (crop, crop); 255 = ignore.

    Raises (from ``__getitem__``):
        DataError: an unreadable file, bad label values, no label, or image/label sizes that differ (the
            message names both files and sizes).
    """

    def __init__(self, samples: Sequence[Sample], crop_size: int, *, mirror: bool = True, seed: int = 0,
                 label_shrink: int | None = 8, label_pad_beg: int = 0, num_classes: int = 21,
                 scale_range: tuple[float, float] | Sequence[float] | None = None) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1 pixel, got {crop_size}")
        if label_shrink is not None and label_shrink < 1:
            raise ValueError(f"label_shrink must be >= 1 or None, got {label_shrink}")
        if scale_range is not None:
            if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
                raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
            scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.samples = list(samples)
        self.crop_size = int(crop_size)
        self.mirror = mirror
        self.seed = int(seed)
        self.label_shrink = label_shrink
        self.label_pad_beg = int(label_pad_beg)
        self.num_classes = num_classes
        self.scale_range = scale_range
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` gives (part of the per-item seed)."""
        self.epoch = int(epoch)

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """The generator of item ``index`` in ``epoch`` (default: the one ``set_epoch`` chose)."""
        epoch = self.epoch if epoch is None else int(epoch)
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch, int(index)]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index`` of ``epoch`` (stateless: what ``set_epoch(epoch)`` then ``[index]`` gives), for
        loader workers that cannot see the main process's ``set_epoch``."""
        sample = self.samples[index]
        image, label = _read_pair(sample, self.num_classes)
        rng = self.rng(index, epoch)
        if self.scale_range is not None:
            scale = float(rng.uniform(*self.scale_range))
            h, w = label.shape
            size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 takes (width, height)
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        image, label = random_crop_mirror(image, label, self.crop_size, rng, mirror=self.mirror)
        if self.label_shrink is not None:
            label = shrink_label(label, self.label_shrink, self.label_pad_beg)
        return image_to_tensor(image), torch.from_numpy(label.astype(np.int64))


class ImageDataset(Dataset):
    """Whole images (and labels where present) for inference and evaluation.

    Items: ``(id, image (H, W, 3) uint8 BGR, label (H, W) uint8 or None)``.

    Raises (from ``__getitem__``):
        DataError: an unreadable file, bad label values, or image/label sizes that differ.
    """

    def __init__(self, samples: Sequence[Sample], num_classes: int = 21) -> None:
        self.samples = list(samples)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None]:
        sample = self.samples[index]
        if sample.label is None:
            return sample.id, read_image(sample.image), None
        image, label = _read_pair(sample, self.num_classes)
        return sample.id, image, label
