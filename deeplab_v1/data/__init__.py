"""Data: reading PASCAL VOC images and label maps, split lists, the Caffe data-layer transforms, datasets,
the SBD conversion and the DIAGNOSTIC degraded-ground-truth score source.

Conventions: images (H, W, 3) uint8 BGR 0..255; labels (H, W) uint8 class indices, 255 = void (ignored).
"""

from .datasets import ImageDataset, TrainDataset
from .io import VOC_CLASSES, DataError, read_image, read_label, voc_palette, write_label
from .lists import Sample, load_samples, read_list, voc_split
from .transforms import MEAN_BGR, image_to_tensor, pad_to, random_crop_mirror, shrink_label

__all__ = [
    "DataError", "VOC_CLASSES", "voc_palette", "read_image", "read_label", "write_label",
    "Sample", "voc_split", "read_list", "load_samples",
    "MEAN_BGR", "pad_to", "random_crop_mirror", "image_to_tensor", "shrink_label",
    "TrainDataset", "ImageDataset",
]
