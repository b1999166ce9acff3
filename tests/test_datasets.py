"""Datasets of one's own (issue #23 items 3-5): the folder layout without void through every stage, the
Cityscapes layout, the trimap's boundary band, ``base:`` by packaged name and ``deeplab config``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from crf.cli import evaluate_folders
from crf.cli import main as crf_main
from crf.trimap import trimap_band
from deeplab_v1.cli import main
from deeplab_v1.compare import compare_runs
from deeplab_v1.config import ConfigError, load_config
from deeplab_v1.data.io import DataError, read_label
from deeplab_v1.data.layouts import dataset_samples
from deeplab_v1.predict import predict_images
from deeplab_v1.runner import Runner

NAMES = ["meadow", "pond", "barn", "tractor", "haystack"]
COLOURS = [[20, 120, 20], [30, 60, 200], [180, 30, 30], [230, 200, 20], [200, 160, 90]]
H, W = 40, 48


def _shapes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A (H, W) label of 5 classes (background 0 and up to four shapes, no void) and its RGB image."""
    label = np.zeros((H, W), np.uint8)
    for c in rng.permutation([1, 2, 3, 4])[: rng.integers(2, 5)]:
        y, x = int(rng.integers(0, H - 12)), int(rng.integers(0, W - 12))
        if c % 2:
            label[y:y + int(rng.integers(8, 16)), x:x + int(rng.integers(8, 18))] = c
        else:
            cv2.circle(label, (x + 6, y + 6), int(rng.integers(4, 9)), int(c), -1)
    image = np.asarray(COLOURS, np.float32)[label] + rng.normal(0, 12, (H, W, 3))
    return label, np.clip(image, 0, 255).astype(np.uint8)


def make_folder_dataset(root: Path, count: int = 8, seed: int = 0) -> list[str]:
    """``root/imgs/<stem>.jpg`` + ``root/masks/<stem>.png`` (8-bit grayscale class indices, 0..4, no 255)."""
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = [f"field_{i:02d}" for i in range(count)]
    for stem in stems:
        label, image = _shapes(rng)
        Image.fromarray(image).save(root / "imgs" / f"{stem}.jpg", quality=95)
        Image.fromarray(label, mode="L").save(root / "masks" / f"{stem}.png")
    return stems


def _experiment(folder: Path, **data) -> Path:
    """An experiment on the generated dataset at the test-speed settings of the pipeline tests."""
    spec = {
        "base": "default",  # the packaged experiment, by name
        "name": "shapes",
        "output_dir": "run",
        "model": {"num_classes": 5},
        "data": {"layout": "folder", "root": "shapes", "images": "imgs", "labels": "masks",
                 "train_list": None, "test_list": "shapes/val.txt", "class_names": NAMES, "palette": COLOURS, "trimap_band": "boundary",
                 **data},
        "train": {"iterations": 2, "batch_size": 2, "crop_size": 41, "checkpoint_every": 2, "num_workers": 0},
        "test": {"size": 49, "num_workers": 0},
        "crf_search": {"num_images": 3, "w1": [4], "sigma_alpha": [30], "sigma_beta": [3, 5], "rounds": 0,
                       "objective": "trimap_miou", "trimap_width": 3, "workers": 1},
        "crf": {"workers": 1},
        "evaluation": {"trimap_widths": [1, 2, 3, 5]},
    }
    path = folder / "shapes.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    stems = make_folder_dataset(folder / "shapes")
    (folder / "shapes" / "val.txt").write_text("\n".join(stems[5:]) + "\n")
    cfg = load_config(_experiment(folder))
    Runner(cfg, progress=False).run()
    return folder, cfg


@pytest.mark.slow
def test_a_folder_dataset_without_void_runs_every_stage_with_its_class_names(shapes_run):
    folder, cfg = shapes_run
    run = cfg.run_dir
    assert [s.id for s in dataset_samples(cfg.data, cfg.data.train_list)] == [f"field_{i:02d}" for i in range(8)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == NAMES and metrics["images"] == 3
    assert len(metrics["dcnn"]["per_class_iou"]) == 5 and "crf" in metrics
    report = (run / "report.md").read_text()
    assert all(f"| {name} |" in report for name in NAMES)  # the per-class table names the dataset's classes
    assert "| aeroplane |" not in report and "label changes (data.trimap_band: boundary)" in report
    trimap = json.loads((run / "trimap.json").read_text())
    assert trimap["dcnn"]["band"] == "boundary" and trimap["dcnn"]["pixels"][0] > 0  # no void, yet a band
    best = json.loads((run / "crf_search" / "best.json").read_text())
    assert best["objective_name"] == "trimap_miou(width=3)" and best["objective"] is not None
    sample = np.load(next((run / "crf_search" / "samples").glob("*.npz")))
    assert np.array_equal(sample["band"], trimap_band(sample["label"], 3, band="boundary")) and sample["band"].any()
    assert (run / "figures" / "qualitative.png").is_file()
    for method in ("dcnn", "crf"):  # the predictions in the dataset's colours (data.palette)
        with Image.open(run / "predictions" / method / "field_07.png") as png:
            assert png.getpalette()[:15] == [v for c in COLOURS for v in c]

    # python -m crf evaluate --band boundary on the run's predictions: the same band, the same numbers
    out = folder / "crf-evaluate"
    assert crf_main(["evaluate", "--pred", str(run / "predictions" / "crf"), "--labels", str(folder / "shapes" / "masks"),
                     "--num-classes", "5", "--out", str(out), "--band", "boundary", "--trimap-widths", "1,2,3,5",
                     "--class-names", ",".join(NAMES), "--no-progress"]) == 0
    ours = json.loads((out / "trimap.json").read_text())
    assert ours["band"] == "boundary" and ours["pixels"] == trimap["crf"]["pixels"]
    assert ours["miou"] == pytest.approx(trimap["crf"]["miou"])

    # compare names the dataset's classes; predict runs on the run's checkpoint
    text, _ = compare_runs([run], folder / "compare")
    assert "IoU meadow" in text and "IoU background" not in text
    record = predict_images([folder / "shapes" / "imgs" / "field_00.jpg"], run / "checkpoints" / "final.pth",
                            folder / "predict", use_crf=True, device="cpu", size=49, progress=False, log=lambda _: None)
    assert (folder / "predict" / "crf" / "field_00.png").is_file() and record


@pytest.mark.slow
def test_python_m_crf_search_takes_the_boundary_band(tmp_path):
    root = tmp_path / "shapes"
    stems = make_folder_dataset(root, count=3, seed=4)
    probs = tmp_path / "probs"
    probs.mkdir()
    for stem in stems:  # a blurred one-hot of the truth: a model's probabilities, wrong near boundaries
        gt = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        onehot = np.stack([cv2.GaussianBlur((gt == c).astype(np.float32), (9, 9), 3) for c in range(5)]) + 0.05
        np.save(probs / f"{stem}.npy", (onehot / onehot.sum(0)).astype(np.float32))
    out = tmp_path / "search"
    args = ["search", "--images", str(root / "imgs"), "--probs", str(probs), "--labels", str(root / "masks"),
            "--out", str(out), "--objective", "trimap_miou", "--rounds", "0", "--workers", "1", "--no-progress"]
    (tmp_path / "grid.yaml").write_text("w1: [4]\nsigma_alpha: [30]\nsigma_beta: [3]\ntrimap_width: 3\n")
    assert crf_main(args + ["--band", "boundary", "--config", str(tmp_path / "grid.yaml")]) == 0
    files = sorted((out / "samples-boundary-3").glob("*.npz"))
    assert len(files) == 3
    for f in files:
        s = np.load(f)
        assert s["band"].any() and np.array_equal(s["band"], trimap_band(s["label"], 3, band="boundary"))
    assert json.loads((out / "best.json").read_text())["objective"] > 0


def test_void_band_on_a_dataset_without_void_stops_before_any_work(tmp_path):
    make_folder_dataset(tmp_path / "shapes", count=3)
    cfg = load_config(_experiment(tmp_path, trimap_band="void", test_list=None))
    with pytest.raises(DataError, match=r"data\.trimap_band: void .* set data\.trimap_band: boundary"):
        Runner(cfg, progress=False).run()
    assert not (cfg.run_dir / "stages" / "train.json").exists() and not (cfg.run_dir / "checkpoints").exists()


def test_num_classes_must_agree_with_the_dataset(tmp_path):
    make_folder_dataset(tmp_path / "shapes", count=2)
    path = _experiment(tmp_path, test_list=None)
    with pytest.raises(ConfigError, match=r"data\.class_names.* 5 names but model\.num_classes is 6"):
        load_config(path, ["model.num_classes=6"])
    with pytest.raises(ConfigError, match=r"data\.images.*layout is folder"):
        load_config(path, ["data.images=null"])
    with pytest.raises(ConfigError, match=r"data\.ignore_index"):
        load_config(path, ["data.ignore_index=3"])


def test_ignore_index_reads_as_void(tmp_path):
    make_folder_dataset(tmp_path / "shapes", count=2)
    mask = tmp_path / "shapes" / "masks" / "field_00.png"
    label = np.asarray(Image.open(mask)).copy()
    label[:4] = 9
    Image.fromarray(label, mode="L").save(mask)
    cfg = load_config(_experiment(tmp_path, test_list=None, ignore_index=9))
    s = dataset_samples(cfg.data, None)[0]
    read = read_label(s.label, 5, s.label_map)
    assert (read[:4] == 255).all() and np.array_equal(read[4:], label[4:])


# ------------------------------------------------------------------------------------------------ Cityscapes


def test_a_cityscapes_tree_loads_with_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.arange(H * W, dtype=np.int64).reshape(H, W) % 34  # every labelId 0..33
    for split, city, n in (("train", "aachen", 2), ("val", "lindau", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids.astype(np.uint8), mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    spec = {"name": "cs", "model": {"num_classes": 19}, "data": {"layout": "cityscapes", "root": str(root)}}
    (tmp_path / "cs.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_config(tmp_path / "cs.yaml")
    train = dataset_samples(cfg.data, cfg.data.train_list)
    assert [s.id for s in train] == ["aachen_000000_000019", "aachen_000001_000019"]
    val = dataset_samples(cfg.data, cfg.data.test_list)
    assert [s.id for s in val] == ["lindau_000000_000019"]
    label = read_label(val[0].label, 19, val[0].label_map)
    # cityscapesScripts: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, ..., bicycle 33 -> 18; the rest 255
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(34):
        assert (label[ids == label_id] == expected.get(label_id, 255)).all(), label_id
    with pytest.raises(ConfigError, match=r"model\.num_classes.* 21 but data\.layout cityscapes has 19"):
        load_config(tmp_path / "cs.yaml", ["model.num_classes=21"])


# --------------------------------------------------------------------------------------- the trimap bands


def test_the_boundary_band_is_the_dilation_of_the_other_classes():
    rng = np.random.default_rng(1)
    for _ in range(5):
        gt, _image = _shapes(rng)
        gt[rng.random(gt.shape) < 0.03] = 255
        for w in (0, 1, 2, 5):
            kernel = np.ones((2 * w + 1, 2 * w + 1), np.uint8)
            ref = np.zeros(gt.shape, bool)
            for c in set(np.unique(gt)) - {255}:
                ref |= cv2.dilate((gt == c).astype(np.uint8), kernel).astype(bool) & (gt != c) & (gt != 255)
            assert np.array_equal(trimap_band(gt, w, band="boundary"), ref)
    flat = np.zeros((6, 6), np.uint8)
    assert not trimap_band(flat, 3, band="boundary").any() and not trimap_band(flat, 3).any()


# ------------------------------------------------------------------------------- base: by name, deeplab config


def test_base_by_name_in_an_empty_folder_runs_on_the_shipped_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("base: crf-demo\nname: mine\n")
    cfg = load_config(tmp_path / "mine.yaml")
    demo = load_config(main_experiments() / "crf-demo.yaml")
    assert cfg.data.root == demo.data.root and (cfg.data.root / "JPEGImages").is_dir()
    assert cfg.stages == demo.stages and cfg.crf_search.search == demo.crf_search.search
    # a packaged file named by its path is read the same way (its sample, not one beside the user's file)
    (tmp_path / "by-path.yaml").write_text(f"base: {main_experiments() / 'crf-demo.yaml'}\n")
    assert load_config(tmp_path / "by-path.yaml").data.root == demo.data.root
    assert main(["config", "mine.yaml", "--set", "crf_search.num_images=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "mine" and printed["crf_search"]["num_images"] == 2
    assert printed["data"]["root"] == str(demo.data.root) and printed["test"]["score_source"] == "degraded-gt"
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))  # what it prints loads back unchanged
    again = load_config(tmp_path / "printed.yaml")
    assert again.crf_search == load_config(tmp_path / "mine.yaml", ["crf_search.num_images=2"]).crf_search
    (tmp_path / "large.yaml").write_text("base: voc12-deeplab-largefov\ntrain: {iterations: 10}\n")
    large = load_config(tmp_path / "large.yaml", check_paths=False)  # the full VOC data need not be here
    packaged = load_config(main_experiments() / "voc12-deeplab-largefov.yaml", check_paths=False)
    assert large.model == packaged.model and large.data == packaged.data and large.train.iterations == 10
    (tmp_path / "bad.yaml").write_text("base: no-such-experiment\n")
    assert main(["config", "bad.yaml"]) == 2
    assert "nor a packaged experiment name" in capsys.readouterr().err


def main_experiments() -> Path:
    from deeplab_v1.experiment_files import packaged_experiments

    return packaged_experiments()


def test_a_file_beside_the_yaml_wins_over_a_packaged_name(tmp_path):
    os.makedirs(tmp_path / "sub")
    (tmp_path / "crf-demo").write_text("name: local\nseed: 7\n")  # a file of that very name, beside the YAML
    (tmp_path / "mine.yaml").write_text("base: crf-demo\n")
    cfg = load_config(tmp_path / "mine.yaml", check_paths=False)
    assert cfg.name == "local" and cfg.seed == 7
