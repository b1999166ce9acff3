"""deeplab_v1.evaluation: confusion matrix / mIoU, trimap bands and accumulator, the trimap figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crf import CRFParams, dense_crf
from crf.input_files import load_search_input, write_search_input
from crf.search import SearchConfig, run_search
from deeplab_v1.data import read_image, read_label, voc_split
from deeplab_v1.data.degraded import degraded_probs
from deeplab_v1.evaluation import (
    ConfusionAccumulator,
    TrimapAccumulator,
    confusion_matrix,
    metrics_from_confusion,
    trimap_band,
)
from deeplab_v1.evaluation.plots import plot_trimap
from deeplab_v1.evaluation.trimap import void_distance


@pytest.fixture(scope="module")
def sample_labels(repo_root: Path) -> list[np.ndarray]:
    root = repo_root / "experiments" / "sample" / "VOC2012"
    return [read_label(s.label) for s in voc_split(root, "val")[:3]]


# ------------------------------------------------------------------------------------------ metrics


def test_confusion_matrix_hand_case() -> None:
    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    pred = np.array([[0, 1], [0, 2]], dtype=np.uint8)
    conf = confusion_matrix(gt, pred, num_classes=3)
    # rows ground truth, columns prediction; the void pixel is not counted
    assert conf.dtype == np.int64
    assert conf.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    masked = confusion_matrix(gt, pred, num_classes=3, mask=np.array([[True, False], [True, True]]))
    assert masked.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]


def test_metrics_hand_case() -> None:
    conf = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    s = metrics_from_confusion(conf)
    # IoU0 = 1 / (1 + 2 - 1) = 0.5; IoU1 = 1 / (2 + 1 - 1) = 0.5; class 2: union 0 -> not counted
    assert s["per_class_iou"][:2] == [0.5, 0.5] and math.isnan(s["per_class_iou"][2])
    assert s["miou"] == pytest.approx(0.5)
    assert s["pixel_accuracy"] == pytest.approx(2 / 3)
    assert s["mean_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["pixels"] == 3
    # a class only predicted (false positives) counts with IoU 0
    s2 = metrics_from_confusion(np.array([[3, 1], [0, 0]]))
    assert s2["per_class_iou"] == [0.75, 0.0] and s2["miou"] == pytest.approx(0.375)
    assert s2["mean_accuracy"] == pytest.approx(0.75)  # over ground-truth classes only
    safe = metrics_from_confusion(conf, json_safe=True)
    assert safe["per_class_iou"][2] is None
    json.dumps(safe, allow_nan=False)
    empty = metrics_from_confusion(np.zeros((3, 3), np.int64), json_safe=True)
    assert empty["miou"] is None and empty["pixel_accuracy"] is None


def test_confusion_matrix_errors() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="prediction values \\[21\\]"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.full((2, 2), 21, np.uint8))
    with pytest.raises(ValueError, match="ground truth values \\[30\\]"):
        confusion_matrix(np.full((2, 2), 30, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="mask shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2)), mask=np.ones((3, 3), bool))


def test_accumulator_sums_and_merges() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, size=(5, 6)) for _ in range(3)]
    preds = [rng.integers(0, 4, size=(5, 6)) for _ in range(3)]
    gts[1][0, :] = 255
    a, b = ConfusionAccumulator(4), ConfusionAccumulator(4)
    a.update(gts[0], preds[0])
    b.update(gts[1], preds[1])
    b.update(gts[2], preds[2])
    total = confusion_matrix(np.concatenate(gts), np.concatenate(preds), 4)
    combined = a + b
    assert np.array_equal(combined.matrix, total) and combined.images == 3
    assert np.array_equal(a.matrix, confusion_matrix(gts[0], preds[0], 4))  # + leaves its operands alone
    a.merge(b)
    assert np.array_equal(a.matrix, total) and a.metrics()["images"] == 3
    assert a.metrics()["miou"] == pytest.approx(metrics_from_confusion(total)["miou"])
    assert a.matrix.sum() == 3 * 30 - 6
    with pytest.raises(ValueError, match="4 and 21 classes"):
        a.merge(ConfusionAccumulator(21))


def test_perfect_prediction_real_labels(sample_labels: list[np.ndarray]) -> None:
    acc = ConfusionAccumulator()
    for gt in sample_labels:
        acc.update(gt, np.where(gt == 255, 0, gt))
    s = acc.metrics()
    assert s["miou"] == 1.0 and s["pixel_accuracy"] == 1.0
    assert s["pixels"] == sum(int((gt != 255).sum()) for gt in sample_labels)


# ------------------------------------------------------------------------------------------- trimap


def test_trimap_band_hand_case() -> None:
    gt = np.zeros((7, 7), dtype=np.uint8)
    gt[3, 3] = 255
    band1 = trimap_band(gt, 1)
    assert band1.sum() == 8 and band1[2:5, 2:5].sum() == 8 and not band1[3, 3]
    assert trimap_band(gt, 2).sum() == 24
    assert trimap_band(gt, 3).sum() == 48  # the whole image but the void pixel
    corner = np.zeros((5, 5), dtype=np.uint8)
    corner[0, 0] = 255
    assert trimap_band(corner, 1).sum() == 3 and trimap_band(corner, 2).sum() == 8
    assert not trimap_band(np.zeros((4, 4), np.uint8), 5).any()  # no void: empty band


def _check_distance_bands(gt: np.ndarray, widths: list[int]) -> None:
    dist = void_distance(gt)
    for w in widths:
        kernel = np.ones((2 * w + 1, 2 * w + 1), np.uint8)
        explicit = cv2.dilate((gt == 255).astype(np.uint8), kernel).astype(bool) & (gt != 255)
        assert np.array_equal((dist <= w) & (gt != 255), explicit), f"width {w}"
        assert np.array_equal(trimap_band(gt, w), explicit)


def test_distance_bands_match_dilation_sample(sample_labels: list[np.ndarray]) -> None:
    for gt in sample_labels:
        _check_distance_bands(gt, [1, 2, 7, 40])


def test_distance_bands_match_dilation_real_voc(shared_voc: Path) -> None:
    for sample in voc_split(shared_voc, "val")[10:14]:
        _check_distance_bands(read_label(sample.label), [1, 3, 5, 10, 25, 40])


def test_trimap_accumulator_matches_masked_confusion(sample_labels: list[np.ndarray]) -> None:
    rng = np.random.default_rng(4)
    widths = [1, 2, 5, 10, 40]
    tri = TrimapAccumulator(widths)
    brute = {w: ConfusionAccumulator() for w in widths}
    for gt in sample_labels:
        # a prediction wrong on a random 20 % of pixels
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        flip = rng.random(gt.shape) < 0.2
        pred[flip] = rng.integers(0, 21, size=int(flip.sum()))
        tri.update(gt, pred)
        for w in widths:
            brute[w].update(gt, pred, mask=trimap_band(gt, w))
    mats = tri.matrices()
    for w in widths:
        assert np.array_equal(mats[w], brute[w].matrix), f"width {w}"
    r = tri.result()
    assert r["widths"] == widths
    for i, w in enumerate(widths):
        assert r["pixel_accuracy"][i] == pytest.approx(brute[w].metrics()["pixel_accuracy"])
        assert r["miou"][i] == pytest.approx(brute[w].metrics()["miou"])
        assert r["pixels"][i] == brute[w].matrix.sum()
    assert r["pixels"] == sorted(r["pixels"]) and r["pixels"][0] > 0  # wider bands hold more pixels
    json.dumps(r, allow_nan=False)


def test_trimap_accumulator_merge_and_empty(sample_labels: list[np.ndarray]) -> None:
    widths = [1, 3]
    whole, a, b = TrimapAccumulator(widths), TrimapAccumulator(widths), TrimapAccumulator(widths)
    for i, gt in enumerate(sample_labels):
        pred = np.zeros_like(gt)
        whole.update(gt, pred)
        (a if i == 0 else b).update(gt, pred)
    assert (a + b).result() == whole.result()
    assert a.merge(b).result() == whole.result() and a.images == 3
    with pytest.raises(ValueError, match="widths"):
        a.merge(TrimapAccumulator([1, 2]))
    empty = TrimapAccumulator(widths)
    empty.update(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))  # no void: empty bands
    assert empty.result()["miou"] == [None, None] and empty.result()["pixels"] == [0, 0]
    with pytest.raises(ValueError, match="shape"):
        empty.update(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))


# ------------------------------------------------------------------ the search scores as the evaluation


@pytest.fixture(scope="module")
def sample_search_inputs(repo_root: Path, tmp_path_factory) -> list[Path]:
    """Search input files of the 2 smallest sample val images (240 x 320, 320 x 240) with DIAGNOSTIC
    degraded-ground-truth probabilities."""
    folder = tmp_path_factory.mktemp("search_inputs")
    files = []
    samples = voc_split(repo_root / "experiments" / "sample" / "VOC2012", "val")
    for sample in (samples[0], samples[2]):
        label = read_label(sample.label)
        image = read_image(sample.image)[:, :, ::-1]  # BGR file -> RGB for the bilateral kernel
        files.append(folder / f"{sample.id}.npz")
        write_search_input(files[-1], image, degraded_probs(label).astype(np.float16), label)
    return files


@pytest.mark.slow
def test_search_objectives_equal_the_evaluation_of_the_same_label_maps(sample_search_inputs, tmp_path) -> None:
    """The search's mIoU and trimap_miou of a configuration (results.jsonl, SearchResult) are the evaluation's
    mIoU (ConfusionAccumulator) and trimap mIoU (TrimapAccumulator at that width) of its CRF label maps."""
    width = 5
    grid = dict(w1=[4.0], sigma_alpha=[49.0], sigma_beta=[5.0], rounds=0, workers=1)  # the release's LargeFOV
    full = run_search(sample_search_inputs, tmp_path / "miou", SearchConfig(**grid), progress=False)
    band = run_search(sample_search_inputs, tmp_path / "trimap",
                      SearchConfig(objective="trimap_miou", trimap_width=width, **grid), progress=False)
    lines = {name: {json.dumps(r["params"], sort_keys=True): r
                    for r in map(json.loads, (tmp_path / name / "results.jsonl").read_text().splitlines())}
             for name in ("miou", "trimap")}
    band_rows = {(r["w1"], r["sigma_alpha"], r["sigma_beta"]): r for r in band.rows}
    for row in full.rows:
        params = CRFParams.from_dict({k: row[k] for k in CRFParams.__dataclass_fields__})
        conf, tri = ConfusionAccumulator(), TrimapAccumulator([width])
        for f in sample_search_inputs:
            arrays = load_search_input(f)
            pred = dense_crf(arrays["image"], arrays["probs"], params).argmax(0)
            conf.update(arrays["label"], pred)
            tri.update(arrays["label"], pred)
        key = json.dumps(params.to_dict(), sort_keys=True)
        assert np.array_equal(lines["miou"][key]["confusion"], conf.matrix)
        assert np.array_equal(lines["trimap"][key]["confusion_band"], tri.matrices()[width])
        assert row["objective"] == row["miou"] == conf.metrics()["miou"]
        assert row["pixel_accuracy"] == conf.metrics()["pixel_accuracy"]
        band_row = band_rows[(params.w1, params.sigma_alpha, params.sigma_beta)]
        assert band_row["objective"] == tri.result()["miou"][0]
        assert band_row["miou"] == conf.metrics()["miou"]
    assert full.best_objective == max(r["objective"] for r in full.rows)


# -------------------------------------------------------------------------------------------- plots


def test_plot_trimap_writes_png(tmp_path: Path) -> None:
    curves = {
        "DCNN": {"widths": [1, 2, 3], "pixel_accuracy": [0.5, 0.6, 0.7], "miou": [0.3, 0.4, None]},
        "DCNN-CRF": {"widths": [1, 2, 3], "pixel_accuracy": [0.6, 0.7, 0.8], "miou": [0.4, 0.5, 0.6]},
    }
    path = tmp_path / "out" / "trimap.png"
    plot_trimap(curves, path)
    assert [p.name for p in path.parent.iterdir()] == ["trimap.png"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    with pytest.raises(ValueError, match="no results"):
        plot_trimap({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'bad'.*miou"):
        plot_trimap({"bad": {"widths": [1], "pixel_accuracy": [0.5]}}, tmp_path / "x.png")
