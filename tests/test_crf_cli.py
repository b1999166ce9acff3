"""``python -m crf apply | search | evaluate`` on folders of any model's outputs (issue #23 item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crf.cli import main, parse_params
from crf.errors import CRFInputError
from crf.params import CRFParams

C = 21
PARAMS = CRFParams(w1=5, sigma_alpha=50, sigma_beta=3)


def upsample_corners(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with the corners aligned, separably with np.interp (the test's own reference)."""
    c, h, w = values.shape
    ys, xs = np.linspace(0, h - 1, height), np.linspace(0, w - 1, width)
    rows = np.stack([[np.interp(xs, np.arange(w), values[k, i]) for i in range(h)] for k in range(c)])
    return np.stack([np.stack([np.interp(ys, np.arange(h), rows[k, :, j]) for j in range(width)], axis=1)
                     for k in range(c)]).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0))
    return e / e.sum(0)


@pytest.fixture(scope="module")
def voc_folders(shared_voc, tmp_path_factory):
    """Three VOC val images at a third of their size (PNG), their labels, and class maps from the ground
    truth made noisy: image-size probabilities (.npy), stride-8 logits (.npz, key ``logits``), and
    image-size probabilities in an .npz with one array."""
    root = tmp_path_factory.mktemp("voc_folders")
    for d in ("images", "probs", "logits", "labels"):
        (root / d).mkdir()
    rng = np.random.default_rng(0)
    refs = {}
    for i, name in enumerate((shared_voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:3]):
        rgb = np.array(Image.open(shared_voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))[::3, ::3].copy()
        label = np.array(Image.open(shared_voc / "SegmentationClass" / f"{name}.png"))[::3, ::3].copy()
        Image.fromarray(rgb).save(root / "images" / f"{name}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"{name}.png")
        h, w = label.shape
        small = rng.normal(size=(C, (h - 1) // 8 + 1, (w - 1) // 8 + 1)).astype(np.float32)
        clean = np.where(label == 255, 0, label)
        small[clean[::8, ::8], np.arange(small.shape[1])[:, None], np.arange(small.shape[2])] += 3
        probs = softmax(upsample_corners(small, h, w)).astype(np.float32)
        if i == 2:
            np.savez(root / "probs" / f"{name}.npz", anything=probs)
        else:
            np.save(root / "probs" / f"{name}.npy", probs)
        np.savez(root / "logits" / f"{name}.npz", logits=small, other=np.zeros(3))
        refs[name] = (rgb, probs)
    return root, refs


def pydensecrf_labels(rgb: np.ndarray, probs: np.ndarray, p: CRFParams) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    h, w = rgb.shape[:2]
    d = dcrf.DenseCRF2D(w, h, probs.shape[0])
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-8, 1)).reshape(probs.shape[0], -1), np.float32))
    d.addPairwiseGaussian(sxy=p.sigma_gamma, compat=p.w2)
    d.addPairwiseBilateral(sxy=p.sigma_alpha, srgb=p.sigma_beta, rgbim=np.ascontiguousarray(rgb), compat=p.w1)
    return np.argmax(d.inference(p.iterations), axis=0).reshape(h, w)


def apply(root: Path, maps: str, out: Path, *extra: str) -> int:
    return main(["apply", "--images", str(root / "images"), "--probs", str(root / maps), "--out", str(out),
                 "--params", "w1=5,sigma_alpha=50,sigma_beta=3", "--workers", "1", "--no-progress", *extra])


@pytest.mark.parametrize("maps, extra", [("probs", ()), ("logits", ("--logits",))])
def test_apply_equals_pydensecrf_and_resumes(voc_folders, tmp_path, capsys, maps, extra):
    root, refs = voc_folders
    out = tmp_path / "out"
    assert apply(root, maps, out, *extra) == 0
    for name, (rgb, probs) in refs.items():
        written = Image.open(out / f"{name}.png")
        assert written.mode == "P"  # palette labels: values are the classes
        ours = np.array(written)
        assert (ours == pydensecrf_labels(rgb, probs, PARAMS)).mean() >= 0.999
    first = sorted(refs)[0]
    (out / f"{first}.png").unlink()
    kept = {n: os.stat(out / f"{n}.png").st_mtime_ns for n in refs if n != first}
    capsys.readouterr()
    assert apply(root, maps, out, *extra) == 0
    assert "1 images done, 2 skipped" in capsys.readouterr().out
    assert (out / f"{first}.png").is_file()
    assert {n: os.stat(out / f"{n}.png").st_mtime_ns for n in kept} == kept


def test_bad_files_are_all_named_before_any_work(voc_folders, tmp_path, capsys):
    root, refs = voc_folders
    bad = tmp_path / "bad"
    bad.mkdir()
    names = sorted(refs)
    np.save(bad / f"{names[0]}.npy", np.zeros((5, 4, 4), np.float32))                    # another C (first is 21)
    np.save(bad / f"{names[1]}.npy", np.zeros((C, 9999, 4), np.float32))                 # larger than the image
    (bad / f"{names[2]}.npz").write_bytes(b"not a zip")                                   # damaged
    np.save(bad / "no_such_image.npy", np.zeros((C, 4, 4), np.float32))                   # no image
    out = tmp_path / "out"
    code = main(["apply", "--images", str(root / "images"), "--probs", str(bad), "--out", str(out), "--no-progress"])
    assert code == 2
    assert "no_such_image.npy: no image" in capsys.readouterr().err
    (bad / "no_such_image.npy").unlink()
    np.save(bad / "extra.npy", np.zeros((C, 4, 4), np.float32))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "extra.png")
    try:
        assert main(["apply", "--images", str(root / "images"), "--probs", str(bad), "--out", str(out),
                     "--no-progress"]) == 2
    finally:
        (root / "images" / "extra.png").unlink()
    err = capsys.readouterr().err
    assert "3 bad class maps" in err
    assert f"{names[1]}.npy: map 9999x4 is larger than its image" in err
    assert f"{names[2]}.npz: not a readable .npz" in err
    assert "has C=21 classes" in err or "has C=5 classes" in err
    assert not out.exists() or not list(out.iterdir())


def test_channels_last_and_logits_without_flag_are_named(voc_folders, tmp_path, capsys):
    root, refs = voc_folders
    name = sorted(refs)[0]
    rgb, probs = refs[name]
    for folder, array, words in (("last", np.moveaxis(probs, 0, -1), "looks channels-last (H, W, C)"),
                                 ("raw", np.log(probs) * 3, "pass --logits")):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / f"{name}.npy", np.ascontiguousarray(array))
        assert main(["apply", "--images", str(root / "images"), "--probs", str(tmp_path / folder), "--out",
                     str(tmp_path / f"out_{folder}"), "--workers", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{name}.npy" in err and words in err, err


def test_evaluate_writes_metrics_and_trimap(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    gt = np.zeros((20, 30), np.uint8)
    gt[5:15, 10:20] = 2
    gt[4, 9:21] = 255  # a void outline along the top of the object
    pred = np.where(gt == 255, 0, gt)
    pred[5, 10:20] = 0  # the object's first row (10 pixels) predicted as background
    Image.fromarray(gt, mode="L").save(gt_dir / "a.png")
    Image.fromarray(pred.astype(np.uint8), mode="L").save(pred_dir / "a.png")
    assert main(["evaluate", "--pred", str(pred_dir), "--labels", str(gt_dir), "--num-classes", "3", "--out",
                 str(tmp_path / "ev"), "--trimap-widths", "1,2", "--class-names", "bg,a,obj", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    labelled = 20 * 30 - 12
    assert metrics["pixel_accuracy"] == pytest.approx((labelled - 10) / labelled)
    obj_iou = 90 / 100
    bg_iou = (labelled - 100) / (labelled - 100 + 10)
    assert metrics["miou"] == pytest.approx((obj_iou + bg_iou) / 2)  # class 1 never occurs: not averaged
    assert metrics["per_class"][2] == {"class": "obj", "iou": pytest.approx(obj_iou), "accuracy": pytest.approx(0.9)}
    assert metrics["per_class"][1]["iou"] is None
    trimap = json.loads((tmp_path / "ev" / "trimap.json").read_text())
    assert trimap["widths"] == [1, 2]
    # width w: rows 4-w..4+w, columns 9-w..20+w, less the 12 outline pixels; the 10 wrong ones lie in all
    assert trimap["pixels"] == [3 * 14 - 12, 5 * 16 - 12]
    assert trimap["pixel_accuracy"] == [pytest.approx(1 - 10 / 30), pytest.approx(1 - 10 / 68)]
    assert (tmp_path / "ev" / "trimap.png").stat().st_size > 1000


def test_evaluate_names_predictions_without_labels(tmp_path, capsys):
    (tmp_path / "p").mkdir(), (tmp_path / "g").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "p" / "x.png")
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "g"), "--num-classes", "2",
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "x.png: no label x.png in --labels" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["grid", "halving"])
def test_search_runs_and_writes_best(voc_folders, tmp_path, strategy):
    root, _ = voc_folders
    config = tmp_path / "search.yaml"
    config.write_text("w1: [5]\nsigma_alpha: [50]\nsigma_beta: [3, 5]\nrounds: 0\nmin_images: 1\nhalving_floor: 1\n")
    out = tmp_path / "search"
    args = ["search", "--images", str(root / "images"), "--probs", str(root / "logits"), "--logits", "--labels",
            str(root / "labels"), "--out", str(out), "--config", str(config), "--workers", "1", "--no-progress",
            "--strategy", strategy]
    assert main(args) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["w1"] == 5 and best["sigma_beta"] in (3, 5) and best["strategy"] == strategy
    assert len(list((out / "samples").glob("*.npz"))) == 3
    lines = (out / "results.jsonl").read_text().splitlines()
    # the grid scores both configurations on the 3 images; halving both on 1, the better one on 3
    assert [json.loads(line)["images"] for line in lines] == ([3, 3] if strategy == "grid" else [1, 1, 3])
    assert main(args) == 0  # resumes: nothing redone
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_parse_params():
    assert parse_params("w1=4,sigma_alpha=121,sigma_beta=5,iterations=5") == CRFParams(4, 121, 5, iterations=5)
    assert parse_params(None) == CRFParams(4, 49, 5)
    with pytest.raises(CRFInputError, match="unknown CRF parameter"):
        parse_params("w3=1")
    with pytest.raises(CRFInputError, match="is not a number"):
        parse_params("w1=big")


@pytest.mark.slow
def test_python_dash_m_crf_runs():
    done = subprocess.run([sys.executable, "-m", "crf", "--help"], capture_output=True, text=True, check=True)
    assert "apply" in done.stdout and "search" in done.stdout and "evaluate" in done.stdout


@pytest.mark.cuda
def test_apply_on_cuda_equals_pydensecrf(voc_folders, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    root, refs = voc_folders
    assert apply(root, "probs", tmp_path / "out", "--device", "cuda") == 0
    for name, (rgb, probs) in refs.items():
        ours = np.array(Image.open(tmp_path / "out" / f"{name}.png"))
        assert (ours == pydensecrf_labels(rgb, probs, PARAMS)).mean() >= 0.999
