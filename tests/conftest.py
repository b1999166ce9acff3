"""Shared fixtures. Cases that need the real PASCAL VOC 2012 data beside the checkout (``../shared``)
skip with a reason where it is absent; the shipped sample (``experiments/sample``) is always there."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_VOC = SHARED / "data" / "VOCdevkit" / "VOC2012"
SHARED_REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_voc() -> Path:
    """The real VOC2012 folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)."""
    if not (SHARED_VOC / "ImageSets" / "Segmentation" / "val.txt").is_file():
        pytest.skip("real PASCAL VOC 2012 data (../shared/data/VOCdevkit/VOC2012) is not present")
    return SHARED_VOC


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """The Caffe release's reference files (prototxts, lists, small real .caffemodel files)."""
    if not (SHARED_REFERENCE / "caffemodels").is_dir():
        pytest.skip("reference files of the Caffe release (../shared/reference) are not present")
    return SHARED_REFERENCE


def pytest_collection_modifyitems(config, items):
    """Mark every case that uses the ``../shared`` fixtures ``needs_shared`` (so ``-m "not needs_shared"``
    runs what a fresh checkout can run)."""
    for item in items:
        if {"shared_voc", "shared_reference"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_shared)
