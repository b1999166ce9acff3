"""deeplab_v1.data: reading, lists, Caffe data-layer transforms, datasets, SBD conversion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from deeplab_v1.data import (
    MEAN_BGR, VOC_CLASSES, DataError, ImageDataset, Sample, TrainDataset, image_to_tensor, load_samples, pad_to,
    random_crop_mirror, read_image, read_label, read_list, shrink_label, voc_palette, voc_split, write_label,
)
from deeplab_v1.data.sbd import convert_sbd, read_sbd_mat

TRAIN_IDS = ["2007_000648", "2007_001901", "2007_002281", "2007_003118", "2007_003604", "2007_005368",
             "2007_008043", "2007_009216"]
VAL_IDS = ["2007_002427", "2007_002728", "2007_003742", "2007_004902", "2007_005074", "2007_008204"]
PAD_BGR = np.zeros(3, dtype=np.float32)  # a padded pixel after the mean subtraction (the release pads in float)


@pytest.fixture(scope="module")
def sample_root(repo_root: Path) -> Path:
    return repo_root / "experiments" / "sample" / "VOC2012"


def _gray_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)
    return path


# ----------------------------------------------------------------------------------------------- io


def test_voc_palette_standard_colours(sample_root: Path) -> None:
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[2].tolist() == [0, 128, 0]  # bicycle
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # void
    # the palette stored in a real VOC SegmentationClass PNG
    with Image.open(sample_root / "SegmentationClass" / f"{VAL_IDS[0]}.png") as im:
        stored = np.array(im.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(stored, pal[: len(stored)])
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def test_read_label_gives_palette_indices(sample_root: Path) -> None:
    path = sample_root / "SegmentationClass" / "2007_005074.png"  # bird, boat, car
    label = read_label(path)
    assert label.dtype == np.uint8 and label.ndim == 2
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(label, np.asarray(im))
    assert set(np.unique(label).tolist()) == {0, 3, 4, 7, 255}  # background, bird, boat, car, void


def test_read_label_real_voc(shared_voc: Path) -> None:
    for sample in voc_split(shared_voc, "val")[:5]:
        label = read_label(sample.label)
        values = set(np.unique(label).tolist())
        assert values <= set(range(21)) | {255}
        assert 255 in values and len(values - {0, 255}) >= 1


def test_read_label_grayscale_and_bad_values(tmp_path: Path) -> None:
    good = np.array([[0, 1, 20], [255, 5, 0]], dtype=np.uint8)
    assert np.array_equal(read_label(_gray_png(tmp_path / "aug.png", good)), good)
    bad = good.copy()
    bad[0, 0] = 50
    path = _gray_png(tmp_path / "bad_values.png", bad)
    with pytest.raises(DataError, match=r"bad_values\.png.*50"):
        read_label(path)
    assert read_label(path, num_classes=60)[0, 0] == 50  # valid with more classes
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb_mask.png")
    with pytest.raises(DataError, match=r"rgb_mask\.png.*mode 'RGB'"):
        read_label(tmp_path / "rgb_mask.png")
    with pytest.raises(DataError, match=r"absent\.png.*not found"):
        read_label(tmp_path / "absent.png")
    (tmp_path / "garbage_label.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"garbage_label\.png"):
        read_label(tmp_path / "garbage_label.png")


def test_read_image_is_bgr(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10  # blue
    Image.fromarray(rgb).save(tmp_path / "red.png")
    image = read_image(tmp_path / "red.png")
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [10, 0, 200]
    # a grayscale file gives three equal channels
    _gray_png(tmp_path / "gray.png", np.full((2, 2), 77))
    assert read_image(tmp_path / "gray.png")[0, 0].tolist() == [77, 77, 77]


def test_read_image_corrupt_or_missing(tmp_path: Path, sample_root: Path) -> None:
    corrupt = tmp_path / "corrupt_image.jpg"
    corrupt.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match=r"corrupt_image\.jpg"):
        read_image(corrupt)
    (tmp_path / "empty_image.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty_image\.jpg.*empty"):
        read_image(tmp_path / "empty_image.jpg")
    with pytest.raises(DataError, match=r"no_such_image\.jpg.*not found"):
        read_image(tmp_path / "no_such_image.jpg")
    # a real JPEG reads as (H, W, 3) uint8
    assert read_image(sample_root / "JPEGImages" / "2007_002427.jpg").shape == (240, 320, 3)


def test_write_label_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, size=(37, 53)).astype(np.uint8)
    label[0, :] = 255
    path = tmp_path / "sub" / "pred.png"
    write_label(path, label)
    assert sorted(p.name for p in path.parent.iterdir()) == ["pred.png"]  # no temporary file left
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im.getpalette(), np.uint8).reshape(-1, 3)[:256], voc_palette())
    assert np.array_equal(read_label(path), label)
    write_label(path, np.zeros((2, 2), np.int64))  # overwrite, other integer dtype
    assert read_label(path).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="shape"):
        write_label(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))


# -------------------------------------------------------------------------------------------- lists


def test_voc_split_sample(sample_root: Path) -> None:
    train = voc_split(sample_root, "train")
    val = voc_split(sample_root, "val")
    assert [s.id for s in train] == TRAIN_IDS and [s.id for s in val] == VAL_IDS
    s = val[0]
    assert s == Sample("2007_002427", sample_root / "JPEGImages" / "2007_002427.jpg",
                       sample_root / "SegmentationClass" / "2007_002427.png")
    with pytest.raises(DataError, match=r"test\.txt.*not found"):
        voc_split(sample_root, "test")


def _copy_sample(sample_root: Path, dst: Path) -> Path:
    shutil.copytree(sample_root, dst)
    return dst


def test_voc_split_missing_file_names_line(sample_root: Path, tmp_path: Path) -> None:
    root = _copy_sample(sample_root, tmp_path / "VOC2012")
    (root / "SegmentationClass" / f"{VAL_IDS[2]}.png").unlink()
    with pytest.raises(DataError, match=rf"val\.txt, line 3: file .*{VAL_IDS[2]}\.png does not exist"):
        voc_split(root, "val")
    samples = voc_split(root, "val", require_labels=False)
    assert samples[2].label is None and samples[0].label is not None
    (root / "JPEGImages" / f"{VAL_IDS[4]}.jpg").unlink()
    with pytest.raises(DataError, match=rf"line 5: file .*{VAL_IDS[4]}\.jpg does not exist"):
        voc_split(root, "val", require_labels=False)


def test_read_list_deeplab_format(sample_root: Path, tmp_path: Path) -> None:
    lst = tmp_path / "val_list.txt"
    lst.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClass/{i}.png\n" for i in VAL_IDS[:3]) + "\n")
    samples = read_list(lst, sample_root)
    assert [s.id for s in samples] == VAL_IDS[:3]
    assert samples[1].image == sample_root / "JPEGImages" / f"{VAL_IDS[1]}.jpg"
    assert samples[1].label == sample_root / "SegmentationClass" / f"{VAL_IDS[1]}.png"
    # a test list: image paths only
    test_list = tmp_path / "test_list.txt"
    test_list.write_text(f"/JPEGImages/{VAL_IDS[0]}.jpg\nJPEGImages/{VAL_IDS[1]}.jpg\n")
    samples = read_list(test_list, sample_root)
    assert [(s.id, s.label) for s in samples] == [(VAL_IDS[0], None), (VAL_IDS[1], None)]
    with pytest.raises(DataError, match=r"test_list\.txt, line 1: no label"):
        read_list(test_list, sample_root, require_labels=True)
    # bare ids (a VOC ImageSets file)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{VAL_IDS[3]}\n")
    assert read_list(ids, sample_root)[0].label == sample_root / "SegmentationClass" / f"{VAL_IDS[3]}.png"


def test_read_list_errors(sample_root: Path, tmp_path: Path) -> None:
    lst = tmp_path / "broken_list.txt"
    lst.write_text(f"/JPEGImages/{VAL_IDS[0]}.jpg /SegmentationClass/{VAL_IDS[0]}.png\n"
                   f"# a comment\n/JPEGImages/{VAL_IDS[1]}.jpg /SegmentationClassAug/{VAL_IDS[1]}.png\n")
    with pytest.raises(DataError, match=rf"broken_list\.txt, line 3: file .*SegmentationClassAug.*{VAL_IDS[1]}\.png"):
        read_list(lst, sample_root)
    empty = tmp_path / "empty_list.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty_list\.txt.*empty"):
        read_list(empty, sample_root)
    dup = tmp_path / "dup_list.txt"
    dup.write_text(f"/JPEGImages/{VAL_IDS[0]}.jpg\n/JPEGImages/{VAL_IDS[0]}.jpg\n")
    with pytest.raises(DataError, match=r"dup_list\.txt, line 2.*repeats line 1"):
        read_list(dup, sample_root)
    three = tmp_path / "three_fields.txt"
    three.write_text("a b c\n")
    with pytest.raises(DataError, match=r"three_fields\.txt, line 1"):
        read_list(three, sample_root)


def test_read_list_release_list_on_real_voc(shared_reference: Path, shared_voc: Path, tmp_path: Path) -> None:
    lines = (shared_reference / "deeplab-public" / "list" / "val.txt").read_text().splitlines()
    present = [ln for ln in lines if (shared_voc / ln.split()[0].lstrip("/")).is_file()][:5]
    assert present, "no line of the release's val list matches the VOC images"
    lst = tmp_path / "val_subset.txt"
    lst.write_text("\n".join(present) + "\n")
    samples = read_list(lst, shared_voc, require_labels=True)
    assert [s.id for s in samples] == [Path(ln.split()[0]).stem for ln in present]
    assert all(s.label is not None and s.label.is_file() for s in samples)
    # the full list names images that are not there: the error gives the line of the first one
    with pytest.raises(DataError, match=r"val\.txt, line \d+: file .* does not exist"):
        read_list(shared_reference / "deeplab-public" / "list" / "val.txt", shared_voc)


def test_load_samples_picks_split_or_list(sample_root: Path, tmp_path: Path) -> None:
    assert [s.id for s in load_samples(sample_root, "val")] == VAL_IDS
    lst = tmp_path / "mine.txt"
    lst.write_text(f"/JPEGImages/{TRAIN_IDS[0]}.jpg /SegmentationClass/{TRAIN_IDS[0]}.png\n")
    assert [s.id for s in load_samples(sample_root, str(lst))] == [TRAIN_IDS[0]]
    assert [s.id for s in load_samples(sample_root, lst)] == [TRAIN_IDS[0]]
    with pytest.raises(DataError, match=r"nothere\.txt.*not found"):
        load_samples(sample_root, str(tmp_path / "nothere.txt"))
    test_list = tmp_path / "test_only.txt"
    test_list.write_text(f"/JPEGImages/{TRAIN_IDS[0]}.jpg\n")
    with pytest.raises(DataError, match="no label"):
        load_samples(sample_root, test_list, require_labels=True)
    assert load_samples(sample_root, test_list, require_labels=False)[0].label is None


# --------------------------------------------------------------------------------------- transforms


def test_pad_to_values() -> None:
    image = np.full((5, 7, 3), 9, dtype=np.uint8)
    label = np.full((5, 7), 3, dtype=np.uint8)
    out, lab = pad_to(image, label, 10)
    # the release converts to float before padding with the mean: float32 out, the exact mean in the border
    assert out.shape == (10, 10, 3) and lab.shape == (10, 10) and out.dtype == np.float32
    assert (out[:5, :7] == 9).all() and (lab[:5, :7] == 3).all()  # the image stays at the top left
    mean = np.asarray(MEAN_BGR, dtype=np.float32)
    assert (out[5:] == mean).all() and (out[:, 7:] == mean).all()
    assert (lab[5:] == 255).all() and (lab[:, 7:] == 255).all()
    # a padded pixel is exactly 0 after the mean subtraction (not the -0.008 / +0.331 / +0.325 of a uint8 border)
    x = image_to_tensor(out)
    assert (x[:, 5:, :] == 0).all() and (x[:, :, 7:] == 0).all()
    # float images get the exact mean; no label; no padding needed
    fout, none = pad_to(image.astype(np.float32), None, 6)
    assert none is None and np.allclose(fout[5, 0], MEAN_BGR) and fout.shape == (6, 7, 3)
    same, same_lab = pad_to(image, label, 4)
    assert same is image and same_lab is label
    with pytest.raises(DataError, match=r"5x7.*4x7"):
        pad_to(image, label[:4], 10)


def test_image_to_tensor_mean_subtraction() -> None:
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0] = 255  # blue channel
    x = image_to_tensor(image)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[:, 1, 2], torch.tensor([255 - 104.008, -116.669, -122.675]))


def test_shrink_label_sampling_positions() -> None:
    rng = np.random.default_rng(1)
    label = rng.integers(0, 256, size=(321, 321)).astype(np.uint8)
    small = shrink_label(label, 8)
    positions = list(range(0, 321, 8))
    assert len(positions) == 41 and positions[-1] == 320
    assert small.shape == (41, 41) and np.array_equal(small, label[np.ix_(positions, positions)])

    label = rng.integers(0, 256, size=(306, 306)).astype(np.uint8)
    small = shrink_label(label, 8, pad_beg=-1)
    positions = list(range(1, 306, 8))
    assert len(positions) == 39 and positions[-1] == 305
    assert small.shape == (39, 39) and np.array_equal(small, label[np.ix_(positions, positions)])
    # non-square, other sizes follow (size + pad_beg - 1) // 8 + 1
    assert shrink_label(np.zeros((513, 100), np.uint8)).shape == (65, 13)
    with pytest.raises(ValueError, match="pad_beg"):
        shrink_label(label, 8, pad_beg=1)


def _coordinate_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixels encode their row (channel 0) and column (channel 1); label = row + col mod 200."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.uint8)
    return image, ((yy + xx) % 200).astype(np.uint8)


def test_random_crop_mirror_window_and_reproducible() -> None:
    image, label = _coordinate_image(20, 30)
    tops, lefts, flips = set(), set(), set()
    for seed in range(200):
        img, lab = random_crop_mirror(image, label, 8, np.random.default_rng(seed))
        img2, lab2 = random_crop_mirror(image, label, 8, np.random.default_rng(seed))
        assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
        assert img.shape == (8, 8, 3) and lab.shape == (8, 8) and img.flags.c_contiguous
        rows, cols = img[:, 0, 0].astype(int), img[0, :, 1].astype(int)
        flipped = cols[0] > cols[-1]
        if flipped:
            cols = cols[::-1]
        top, left = rows[0], cols[0]
        # a contiguous window, the label cropped and flipped with the image
        assert rows.tolist() == list(range(top, top + 8)) and cols.tolist() == list(range(left, left + 8))
        expected = label[top:top + 8, left:left + 8]
        assert np.array_equal(lab, expected[:, ::-1] if flipped else expected)
        tops.add(int(top)), lefts.add(int(left)), flips.add(bool(flipped))
    assert tops == set(range(0, 13)) and lefts == set(range(0, 23))  # uniform over all offsets, both ends
    assert flips == {False, True}
    for seed in range(20):
        img, _ = random_crop_mirror(image, label, 8, np.random.default_rng(seed), mirror=False)
        assert img[0, 0, 1] < img[0, -1, 1]


def test_random_crop_pads_small_images() -> None:
    image, label = _coordinate_image(5, 6)
    img, lab = random_crop_mirror(image, label, 9, np.random.default_rng(0), mirror=False)
    assert img.shape == (9, 9, 3)
    assert np.array_equal(img[:5, :6], image) and (img[5:] == np.asarray(MEAN_BGR, np.float32)).all()
    assert np.array_equal(lab[:5, :6], label) and (lab[5:] == 255).all() and (lab[:, 6:] == 255).all()


# ----------------------------------------------------------------------------------------- datasets


def test_train_dataset_shapes(sample_root: Path) -> None:
    samples = voc_split(sample_root, "train")
    ds = TrainDataset(samples, 321, seed=3)
    assert len(ds) == 8
    image, label = ds[6]  # 2007_008043 is 288 x 292: padded
    assert image.shape == (3, 321, 321) and image.dtype == torch.float32
    assert label.shape == (41, 41) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= set(range(21)) | {255}
    full = TrainDataset(samples, 321, seed=3, label_shrink=None)
    image_full, label_full = full[6]
    assert label_full.shape == (321, 321) and torch.equal(image_full, image)
    assert torch.equal(label_full[::8, ::8], label)  # the shrunk label samples the full one at 0, 8, ..., 320
    # padded pixels (the mean colour) carry label 255
    pad = (image_full - torch.from_numpy(PAD_BGR)[:, None, None]).abs().amax(0) < 1e-4
    assert pad.sum() >= 321 * 321 - 288 * 292 and (label_full[pad] == 255).all()
    _, small = TrainDataset(samples, 306, label_pad_beg=-1)[0]
    assert small.shape == (39, 39)


def test_train_dataset_reproducible(sample_root: Path) -> None:
    samples = voc_split(sample_root, "train")[:3]
    a, b = TrainDataset(samples, 200, seed=5), TrainDataset(samples, 200, seed=5)
    for i in (2, 0, 1):  # access order does not matter
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x0, _ = a[0]
    a.set_epoch(1)
    assert not torch.equal(a[0][0], x0)  # another epoch, other crops
    a.set_epoch(0)
    assert torch.equal(a[0][0], x0)  # the same again when a resumed run comes back to epoch 0
    assert not torch.equal(TrainDataset(samples, 200, seed=6)[0][0], x0)
    # loader workers cannot see set_epoch: item(index, epoch) gives the same crop, whatever the state
    a.set_epoch(1)
    assert torch.equal(a.item(0, 0)[0], x0) and torch.equal(a.item(0, 1)[0], a[0][0])


def test_train_dataset_scale_range(sample_root: Path) -> None:
    samples = voc_split(sample_root, "train")
    ds = TrainDataset(samples, 321, label_shrink=None, scale_range=(0.5, 0.5))
    image, label = ds[6]  # 288 x 292 -> 144 x 146, padded to 321
    assert image.shape == (3, 321, 321) and label.shape == (321, 321)
    assert (label[144:] == 255).all() and (label[:144] != 255).any()
    ds2 = TrainDataset(samples, 321, label_shrink=None, scale_range=(0.5, 2.0), seed=1)
    assert torch.equal(ds2[3][1], ds2[3][1])
    with pytest.raises(ValueError, match="scale_range"):
        TrainDataset(samples, 321, scale_range=(2.0, 0.5))


def test_train_dataset_bad_data(sample_root: Path, tmp_path: Path) -> None:
    src = voc_split(sample_root, "val")[0]
    image = tmp_path / "img_a.jpg"
    shutil.copy(src.image, image)
    small_label = _gray_png(tmp_path / "label_small.png", np.zeros((100, 120)))
    with pytest.raises(DataError, match=r"label_small\.png.*100x120.*img_a\.jpg.*240x320"):
        TrainDataset([Sample("a", image, small_label)], 64)[0]
    with pytest.raises(DataError, match=r"label_small\.png.*img_a\.jpg"):
        ImageDataset([Sample("a", image, small_label)])[0]
    bad = np.zeros((240, 320), np.uint8)
    bad[10, 10] = 50
    bad_label = _gray_png(tmp_path / "label_50.png", bad)
    with pytest.raises(DataError, match=r"label_50\.png.*50"):
        TrainDataset([Sample("a", image, bad_label)], 64)[0]
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff" + os.urandom(500))
    with pytest.raises(DataError, match=r"broken\.jpg"):
        TrainDataset([Sample("a", corrupt, src.label)], 64)[0]
    with pytest.raises(DataError, match="no label"):
        TrainDataset([Sample("a", image, None)], 64)[0]


def test_image_dataset(sample_root: Path) -> None:
    samples = voc_split(sample_root, "val")
    ds = ImageDataset(samples)
    sid, image, label = ds[0]
    assert sid == VAL_IDS[0] and image.shape == (240, 320, 3) and image.dtype == np.uint8
    assert label.shape == (240, 320) and label.dtype == np.uint8
    sid, image, label = ImageDataset([Sample("x", samples[1].image, None)])[0]
    assert label is None and image.shape[2] == 3


# ---------------------------------------------------------------------------------------------- SBD


def _write_sbd(path: Path, seg: np.ndarray | None) -> None:
    fields = {"Boundaries": np.zeros((1,), dtype=object), "CategoriesPresent": np.array([1, 15], np.uint8)}
    if seg is not None:
        fields["Segmentation"] = seg
    scipy.io.savemat(str(path), {"GTcls": fields})


def test_sbd_mat_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cls = tmp_path / "cls"
    cls.mkdir()
    maps = {f"2008_00000{i}": rng.integers(0, 21, size=(13 + i, 17)).astype(np.uint8) for i in range(3)}
    for sid, seg in maps.items():
        _write_sbd(cls / f"{sid}.mat", seg)
    assert np.array_equal(read_sbd_mat(cls / "2008_000001.mat"), maps["2008_000001"])
    out = tmp_path / "SegmentationClassAug"
    summary = convert_sbd(cls, out, progress=False)
    assert summary.converted == 3 and summary.skipped == 0
    for sid, seg in maps.items():
        with Image.open(out / f"{sid}.png") as im:
            assert im.mode == "L"
        assert np.array_equal(read_label(out / f"{sid}.png"), seg)
    again = convert_sbd(cls, out, progress=False)
    assert again.converted == 0 and again.skipped == 3


def test_sbd_bad_mat(tmp_path: Path) -> None:
    _write_sbd(tmp_path / "no_seg.mat", None)
    with pytest.raises(DataError, match=r"no_seg\.mat.*Segmentation"):
        read_sbd_mat(tmp_path / "no_seg.mat")
    scipy.io.savemat(str(tmp_path / "other.mat"), {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(DataError, match=r"other\.mat.*GTcls"):
        read_sbd_mat(tmp_path / "other.mat")
    _write_sbd(tmp_path / "big_values.mat", np.full((3, 3), 40, np.uint8))
    with pytest.raises(DataError, match=r"big_values\.mat.*40"):
        read_sbd_mat(tmp_path / "big_values.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match=r"junk\.mat"):
        read_sbd_mat(tmp_path / "junk.mat")


@pytest.mark.slow
def test_sbd_tool(repo_root: Path, tmp_path: Path) -> None:
    cls = tmp_path / "cls"
    cls.mkdir()
    seg = np.arange(24, dtype=np.uint8).reshape(4, 6) % 21
    _write_sbd(cls / "2008_000123.mat", seg)
    out = tmp_path / "aug"
    tool = repo_root / "tools" / "sbd_to_png.py"
    run = subprocess.run([sys.executable, str(tool), str(cls), str(out), "--no-progress"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "converted 1 SBD annotations" in run.stdout
    assert np.array_equal(read_label(out / "2008_000123.png"), seg)
    _write_sbd(cls / "2008_000999.mat", None)
    run = subprocess.run([sys.executable, str(tool), str(cls), str(out), "--no-progress", "--overwrite"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and "2008_000999.mat" in run.stderr
