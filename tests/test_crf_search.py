"""crf.search (paper Sec. 5 coarse-to-fine CRF parameter search) and crf.confusion."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crf import CRFParams
from crf.confusion import confusion, miou, per_class_iou, pixel_accuracy
from crf.input_files import write_search_input
from crf.search import SearchConfig, read_results, run_search, subset_hash
from deeplab_v1.data.degraded import degraded_probs
from search_helpers import Bowl

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21


# --- crf.confusion ------------------------------------------------------------------------------------


def test_confusion_and_scores_by_hand():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    c = confusion(gt, pred, 3)
    np.testing.assert_array_equal(c, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert c.dtype == np.int64
    # IoU: class 0 1/(2+2-1)=1/3, class 1 2/(2+3-2)=2/3, class 2 0/(1+0)=0
    np.testing.assert_allclose(per_class_iou(c), [1 / 3, 2 / 3, 0.0])
    assert miou(c) == pytest.approx(1 / 3)
    assert pixel_accuracy(c) == pytest.approx(3 / 5)
    band = np.array([[True, False, False], [True, True, True]])
    np.testing.assert_array_equal(confusion(gt, pred, 3, mask=band), [[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    # classes absent from both ground truth and prediction are left out of the mean
    assert np.isnan(per_class_iou(confusion(gt, pred, 5))[3:]).all()
    assert miou(confusion(gt, pred, 5)) == pytest.approx(1 / 3)
    assert np.isnan(miou(np.zeros((3, 3)))) and np.isnan(pixel_accuracy(np.zeros((3, 3))))
    with pytest.raises(ValueError, match=r"pred values \[7\]"):
        confusion(gt, np.full_like(pred, 7), 3)
    with pytest.raises(ValueError, match=r"gt values \[9\]"):
        confusion(np.full_like(gt, 9), pred, 3)
    with pytest.raises(ValueError, match=r"gt shape \(2, 3\) and pred shape \(3, 2\)"):
        confusion(gt, pred.T, 3)


# --- grid and refinement ------------------------------------------------------------------------------


def _axes(configs):
    """The sorted distinct values of (w1, sigma_alpha, sigma_beta) among ``configs``."""
    return tuple(sorted({getattr(p, name) for p in configs}) for name in ("w1", "sigma_alpha", "sigma_beta"))


def test_default_grid_is_the_papers_96_configurations():
    # paper Sec. 5 in MATLAB notation: w1 in [5, 10] (the two values), sigma_alpha in [50:10:100], sigma_beta
    # in [3:1:10]
    cfg = SearchConfig()
    grid = cfg.coarse_grid()
    assert len(grid) == 2 * 6 * 8 == 96
    assert cfg.w1 == [5.0, 10.0]
    assert cfg.sigma_alpha == [50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    assert cfg.sigma_beta == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert [(p.w1, p.sigma_alpha, p.sigma_beta) for p in grid] == [
        (a, b, c) for a in (5.0, 10.0) for b in range(50, 101, 10) for c in range(3, 11)]  # w1 slowest
    assert all(p.w2 == 3 and p.sigma_gamma == 3 and p.iterations == 10 for p in grid)
    assert cfg.steps() == {"w1": 5.0, "sigma_alpha": 10.0, "sigma_beta": 1.0}
    # 5..10 is one YAML line away
    six = SearchConfig.from_dict({"w1": [5, 6, 7, 8, 9, 10]})
    assert len(six.coarse_grid()) == 288 and six.steps()["w1"] == 1.0


def test_refinement_halves_the_coarse_steps_around_the_best():
    cfg = SearchConfig()
    ref = cfg.refine(CRFParams(5, 70, 6), 1)
    assert len(ref) == 27 and CRFParams(5, 70, 6) in ref
    assert _axes(ref) == ([2.5, 5.0, 7.5], [65.0, 70.0, 75.0], [5.5, 6.0, 6.5])
    assert _axes(cfg.refine(CRFParams(7.5, 75, 6.5), 2)) == ([6.25, 7.5, 8.75], [72.5, 75.0, 77.5],
                                                             [6.25, 6.5, 6.75])
    # an axis with a single coarse value has step 0: the best's value only
    one = SearchConfig(w1=[4.0], sigma_alpha=[50.0, 70.0], sigma_beta=[5.0])
    assert _axes(one.refine(CRFParams(4, 50, 5), 1)) == ([4.0], [40.0, 50.0, 60.0], [5.0])
    with pytest.raises(ValueError, match=r"refinement rounds start at 1, got 0"):
        cfg.refine(CRFParams(5, 70, 6), 0)


@pytest.mark.parametrize("best,axes", [
    # the coarse grid's corners: refinement steps beyond its bounds, still 3 x 3 x 3
    ((10, 50, 3), ([7.5, 10.0, 12.5], [45.0, 50.0, 55.0], [2.5, 3.0, 3.5])),
    ((5, 100, 10), ([2.5, 5.0, 7.5], [95.0, 100.0, 105.0], [9.5, 10.0, 10.5])),
])
def test_refinement_of_a_corner_leaves_the_coarse_bounds(best, axes):
    cfg = SearchConfig()
    ref = cfg.refine(CRFParams(*best), 1)
    assert len(ref) == 27 and len(set(ref)) == 27
    assert _axes(ref) == axes
    w1, sa, sb = _axes(ref)
    outside = (w1[0] < cfg.w1[0] or w1[-1] > cfg.w1[-1], sa[0] < cfg.sigma_alpha[0] or sa[-1] > cfg.sigma_alpha[-1],
               sb[0] < cfg.sigma_beta[0] or sb[-1] > cfg.sigma_beta[-1])
    assert all(outside)  # a clipped refinement would give 2 x 2 x 2 inside the bounds
    # the next round, around a point already outside, goes further out (quarter steps)
    far = cfg.refine(CRFParams(12.5, 45, 2.5), 2)
    assert len(far) == 27 and _axes(far) == ([11.25, 12.5, 13.75], [42.5, 45.0, 47.5], [2.25, 2.5, 2.75])


@pytest.mark.parametrize("best,round_index,axes", [
    # w1 - step < 0 and sigma - step <= 0 are dropped, the centre and the + side stay
    ((1.0, 3.0, 0.2), 1, ([1.0, 3.5], [3.0, 8.0], [0.2, 0.7])),
    # w1 = 0 (no bilateral term) is valid and kept; a sigma landing exactly on 0 is not
    ((2.5, 5.0, 0.5), 1, ([0.0, 2.5, 5.0], [5.0, 10.0], [0.5, 1.0])),
    ((0.0, 1e-3, 1e-3), 3, ([0.0, 0.625], [1e-3, 1.251], [1e-3, 0.126])),
    # a sigma below the grid's decimals stays as given instead of rounding to the invalid 0
    ((0.0, 1e-7, 1e-7), 1, ([0.0, 2.5], [1e-7, 5.0], [1e-7, 0.5])),
])
def test_refinement_at_the_domain_edge_never_yields_an_invalid_value(best, round_index, axes):
    cfg = SearchConfig()
    ref = cfg.refine(CRFParams(*best), round_index)
    assert _axes(ref) == axes
    assert len(ref) == len(set(ref)) == math.prod(len(a) for a in axes)
    assert all(p.w1 >= 0 and p.sigma_alpha > 0 and p.sigma_beta > 0 for p in ref)
    assert all(math.copysign(1.0, p.w1) == 1.0 for p in ref)  # no -0.0


@pytest.mark.parametrize("kwargs,match", [
    ({"w1": []}, r"SearchConfig.w1 must not be empty"),
    ({"sigma_alpha": [0, 10]}, r"sigma_alpha values must be finite and > 0"),
    ({"w1": [-1]}, r"w1 values must be finite and >= 0"),
    ({"shrink": 1.0}, r"shrink must be a number in \(0, 1\)"),
    ({"rounds": -1}, r"rounds must be an integer >= 0"),
    ({"objective": "accuracy"}, r"objective must be one of \['miou', 'trimap_miou'\]"),
    ({"trimap_width": 0}, r"trimap_width must be an integer >= 1"),
    ({"backend": "densecrf"}, r"backend must be one of"),
    ({"iterations": 0}, r"iterations must be an integer >= 1"),
    ({"workers": 0}, r"workers must be None or an integer >= 1"),
])
def test_search_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_search_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown search config key\(s\) \['sigma_delta'\]"):
        SearchConfig.from_dict({"sigma_delta": [1]})


# --- search logic on a synthetic objective (no CRF is run) ---------------------------------------------


def _ids(tmp_path, names):
    # with a callable objective the files only name the subset; they are not read
    return [tmp_path / f"{n}.npz" for n in names]


def _expected_calls(cfg: SearchConfig, bests: list[tuple]) -> int:
    """Distinct configurations of a search: the coarse grid, then round r's refinement around bests[r - 1]."""
    done = {(p.w1, p.sigma_alpha, p.sigma_beta) for p in cfg.coarse_grid()}
    for r, best in enumerate(bests, start=1):
        done |= {(p.w1, p.sigma_alpha, p.sigma_beta) for p in cfg.refine(CRFParams(*best), r)}
    return len(done)


def test_refinement_lands_between_coarse_grid_points(tmp_path):
    bowl = Bowl((7.4, 74.0, 6.4))
    cfg = SearchConfig(objective=bowl, rounds=1)
    res = run_search(_ids(tmp_path, ["a", "b"]), tmp_path / "s", cfg, progress=False)
    # coarse best is (5, 70, 6); the half steps around it reach (7.5, 75, 6.5), off the coarse grid
    assert (res.best.w1, res.best.sigma_alpha, res.best.sigma_beta) == (7.5, 75.0, 6.5)
    assert res.best.w1 not in cfg.w1 and res.best.sigma_alpha not in cfg.sigma_alpha
    # 96 coarse + 26 new (the 27 around the best less the best itself)
    assert len(bowl.calls) == len(set(bowl.calls)) == _expected_calls(cfg, [(5, 70, 6)]) == 96 + 26
    assert res.rows[0]["rank"] == 1 and res.rows[0]["round"] == 1 and len(res.rows) == 96 + 26
    assert sum(r["round"] == 0 for r in res.rows) == len(cfg.coarse_grid())
    # a second round refines with quarter steps around the first round's best
    bowl2 = Bowl((7.3, 73.0, 6.3))
    cfg2 = SearchConfig(objective=bowl2, rounds=2)
    res2 = run_search(_ids(tmp_path, ["a", "b"]), tmp_path / "s2", cfg2, progress=False)
    # round 1 moves from (5, 70, 6) to (7.5, 75, 6.5); round 2 (steps 1.25, 2.5, 0.25) to (7.5, 72.5, 6.25)
    assert (res2.best.w1, res2.best.sigma_alpha, res2.best.sigma_beta) == (7.5, 72.5, 6.25)
    assert len(bowl2.calls) == len(set(bowl2.calls)) == _expected_calls(cfg2, [(5, 70, 6), (7.5, 75, 6.5)]) \
        == 96 + 26 + 26
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert CRFParams.from_dict({k: best[k] for k in CRFParams.__dataclass_fields__}) == res.best
    assert best["configurations"] == len(res.rows)
    table = (tmp_path / "s" / "ranked.md").read_text()
    assert "| 1 | 7.5 | 75 | 6.5 |" in table
    assert (tmp_path / "s" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refinement_steps_beyond_the_coarse_bounds(tmp_path):
    bowl = Bowl((14.0, 20.0, 12.0))  # outside the grid on every axis
    cfg = SearchConfig(objective=bowl, rounds=3)
    res = run_search(_ids(tmp_path, ["a"]), tmp_path / "s", cfg, progress=False)
    w1, sa, sb = np.array(bowl.calls).T
    assert w1.max() > max(cfg.w1) and sa.min() < min(cfg.sigma_alpha) and sb.max() > max(cfg.sigma_beta)
    # coarse best (10, 50, 10); rounds of steps (2.5, 5, 0.5), (1.25, 2.5, 0.25), (0.625, 1.25, 0.125)
    bests = [(10.0, 50.0, 10.0), (12.5, 45.0, 10.5), (13.75, 42.5, 10.75)]
    assert (res.best.w1, res.best.sigma_alpha, res.best.sigma_beta) == (13.75, 41.25, 10.875)
    assert len(bowl.calls) == len(set(bowl.calls)) == _expected_calls(cfg, bests) == 96 + 3 * 26
    # better than anything inside the coarse bounds (whose best is the corner bests[0])
    assert res.best_objective > Bowl(bowl.optimum)(CRFParams(*bests[0]))
    assert all(p >= 0 for p in w1) and sa.min() > 0 and sb.min() > 0


def test_search_near_the_domain_edge_evaluates_only_valid_configurations(tmp_path):
    # a coarse grid against the domain's edge and an optimum beyond it: the round-1 steps (2, 10, 2) would
    # take w1 below 0 and both sigmas below 0; those values are dropped (2 x 2 x 2 around the best)
    bowl = Bowl((-5.0, -100.0, -5.0))
    cfg = SearchConfig(w1=[0, 4], sigma_alpha=[1, 21], sigma_beta=[0.5, 4.5], objective=bowl, rounds=2)
    res = run_search(_ids(tmp_path, ["a"]), tmp_path / "s", cfg, progress=False)
    w1, sa, sb = np.array(bowl.calls).T
    assert w1.min() >= 0 and sa.min() > 0 and sb.min() > 0
    assert len(bowl.calls) == len(set(bowl.calls))
    assert _axes(cfg.refine(CRFParams(0, 1, 0.5), 1)) == ([0.0, 2.0], [1.0, 11.0], [0.5, 2.5])
    # round 2 (steps 1, 5, 1) around the same best: 2 x 2 x 2 again, (1, 6, 1.5) new on every axis
    assert (res.best.w1, res.best.sigma_alpha, res.best.sigma_beta) == (0.0, 1.0, 0.5)
    assert len(bowl.calls) == _expected_calls(cfg, [(0, 1, 0.5), (0, 1, 0.5)]) == 8 + 7 + 7


def test_resume_after_a_kill_redoes_only_the_torn_configuration(tmp_path):
    files = _ids(tmp_path, ["a", "b", "c"])
    out = tmp_path / "s"
    first = Bowl((7.4, 74.0, 6.4))
    cfg = dict(w1=[5, 7, 9], sigma_alpha=[50, 100], sigma_beta=[3, 6, 9], rounds=1)
    ref = run_search(files, out, SearchConfig(objective=first, **cfg), progress=False)
    results = out / "results.jsonl"
    lines = results.read_bytes().split(b"\n")[:-1]
    assert len(lines) == len(first.calls)
    # a kill while the last line was being written: the file ends with half of it
    n = len(lines)
    results.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][: len(lines[-1]) // 2])
    again = Bowl((7.4, 74.0, 6.4))
    with pytest.warns(UserWarning, match=rf"results\.jsonl line {n}: torn last line"):
        res = run_search(files, out, SearchConfig(objective=again, **cfg), progress=False)
    torn = json.loads(lines[-1])["params"]
    assert again.calls == [(torn["w1"], torn["sigma_alpha"], torn["sigma_beta"])]  # only the torn one redone
    assert res.computed == 1
    assert res.best == ref.best and [r["objective"] for r in res.rows] == [r["objective"] for r in ref.rows]
    # the torn tail was cut off, every line parses, and a third run computes nothing and warns nothing
    assert all(json.loads(x) for x in results.read_text().splitlines())
    third = Bowl((7.4, 74.0, 6.4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res3 = run_search(files, out, SearchConfig(objective=third, **cfg), progress=False)
    assert third.calls == [] and res3.computed == 0 and res3.best == ref.best


def test_lines_of_another_subset_or_objective_are_never_mixed_in(tmp_path):
    out = tmp_path / "s"
    cfg = dict(w1=[5, 10], sigma_alpha=[50, 100], sigma_beta=[3, 10], rounds=0)
    run_search(_ids(tmp_path, ["a", "b"]), out, SearchConfig(objective=Bowl((5, 50, 3)), **cfg), progress=False)
    other = Bowl((10, 100, 10))
    with pytest.warns(UserWarning, match=r"8 line\(s\) of another search ignored, never mixed in"):
        res = run_search(_ids(tmp_path, ["a", "c"]), out, SearchConfig(objective=other, **cfg), progress=False)
    assert len(other.calls) == 8  # all recomputed for the new subset
    assert (res.best.w1, res.best.sigma_alpha, res.best.sigma_beta) == (10.0, 100.0, 10.0)
    assert len(res.rows) == 8
    key = subset_hash(_ids(tmp_path, ["a", "c"]))
    assert key in (out / "ranked.md").read_text() and subset_hash(_ids(tmp_path, ["b", "a"])) not in (
        out / "ranked.md").read_text()
    # both searches stay in the file, each readable under its own key only
    assert len((out / "results.jsonl").read_text().splitlines()) == 16
    assert subset_hash(_ids(tmp_path, ["b", "a"])) == subset_hash(_ids(tmp_path, ["a", "b"]))  # order-free
    with pytest.raises(ValueError, match=r"distinct names.*\['a'\]"):
        subset_hash([tmp_path / "x" / "a.npz", tmp_path / "y" / "a.npz"])


def test_read_results_reports_foreign_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    rec = {"subset_hash": "x", "objective_name": "miou", "backend": "pydensecrf",
           "fixed": {"w2": 3.0, "sigma_gamma": 3.0, "iterations": 10}, "params": CRFParams(5, 50, 3).to_dict(),
           "objective": 0.5}
    others = [{**rec, "subset_hash": "y"}, {**rec, "objective_name": "trimap_miou(width=5)"},
              {**rec, "backend": "torch"}, {**rec, "fixed": {"w2": 3.0, "sigma_gamma": 1.0, "iterations": 10}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [rec, *others]))
    key = {k: rec[k] for k in ("subset_hash", "objective_name", "backend", "fixed")}
    with pytest.warns(UserWarning, match=r"4 line\(s\) of another search.*subset y.*trimap_miou\(width=5\).*torch"):
        records, foreign, torn = read_results(path, key)
    assert list(records) and len(records) == 1 and foreign == 4 and not torn


# --- real VOC images: 1 process vs 2 workers vs 2 torchrun ranks ----------------------------------------


#: The DIAGNOSTIC degraded-ground-truth probabilities (deeplab_v1.data.degraded) at a third of the image
#: size: blocks of 16 pixels, a light blur and a strong unary (temperature 3), so that the TINY grid's best
#: configuration beats the DCNN alone (by about 0.6 mIoU points on these 3 images) and its worst does not.
DEGRADED = dict(stride=16, blur_sigma=4.0, temperature=3.0)


@pytest.fixture(scope="module")
def voc_samples(shared_voc, tmp_path_factory):
    """Search input files of three VOC val images at a third of their size with degraded-ground-truth
    probabilities (float16)."""
    folder = tmp_path_factory.mktemp("crf_search_samples")
    ids = (shared_voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:3]
    files = []
    for i in ids:
        image = np.array(Image.open(shared_voc / "JPEGImages" / f"{i}.jpg").convert("RGB"))
        label = np.array(Image.open(shared_voc / "SegmentationClass" / f"{i}.png"))
        size = (image.shape[1] // 3, image.shape[0] // 3)
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        f = folder / f"{i}.npz"
        write_search_input(f, image, degraded_probs(label, NUM_CLASSES, **DEGRADED).astype(np.float16), label)
        files.append(f)
    return files


TINY = dict(w1=[3.0, 10.0], sigma_alpha=[20.0, 80.0], sigma_beta=[3.0, 13.0], rounds=0)


@pytest.fixture(scope="module")
def one_process(voc_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("search_one")
    return run_search(voc_samples, out, SearchConfig(workers=1, **TINY), progress=False), out


def _confusions(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {json.dumps(r["params"], sort_keys=True): r["confusion"] for r in recs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_process_two_workers_and_two_ranks_give_identical_tables(voc_samples, one_process, tmp_path):
    res1, out1 = one_process
    out2 = tmp_path / "two_workers"
    res2 = run_search(voc_samples, out2, SearchConfig(workers=2, **TINY), progress=False)
    assert res2.rows == [{**r, "seconds": r2["seconds"]} for r, r2 in zip(res1.rows, res2.rows)]

    out3 = tmp_path / "two_ranks"
    (tmp_path / "list.txt").write_text("\n".join(str(f) for f in voc_samples) + "\n")
    import yaml

    (tmp_path / "search.yaml").write_text(yaml.safe_dump({**TINY, "workers": 1}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "crf.search", "--samples", str(tmp_path / "list.txt"),
           "--out", str(out3), "--config", str(tmp_path / "search.yaml"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    c1, c2, c3 = _confusions(out1), _confusions(out2), _confusions(out3)
    assert len(c1) == 8 and c1 == c2 == c3
    table = (out1 / "ranked.md").read_text()
    assert table == (out2 / "ranked.md").read_text() == (out3 / "ranked.md").read_text()
    # the same best.json but for how the CRFs ran (layout: processes, threads; and why)
    how = ("layout", "layout_reason")
    best3, best1 = (json.loads((out / "best.json").read_text()) for out in (out3, out1))
    assert {k: v for k, v in best3.items() if k not in how} == {k: v for k, v in best1.items() if k not in how}
    assert set(how) <= set(best3) and set(how) <= set(best1)


@pytest.mark.slow
def test_best_configuration_beats_the_worst_and_the_dcnn_alone(voc_samples, one_process):
    res, _ = one_process
    best, worst = res.rows[0]["miou"], res.rows[-1]["miou"]
    assert best - worst > 0.05, (best, worst)
    # the CRF's point: on coarse, blurred scores the best configuration recovers object boundaries
    conf = 0
    for f in voc_samples:
        with np.load(f) as z:
            conf = conf + confusion(z["label"], z["probs"].argmax(0), NUM_CLASSES)
    assert best > miou(conf), (best, miou(conf))


@pytest.mark.slow
def test_trimap_objective_scores_the_band_only(voc_samples, tmp_path):
    cfg = SearchConfig(w1=[3.0], sigma_alpha=[20.0], sigma_beta=[3.0, 13.0], rounds=0, objective="trimap_miou",
                       trimap_width=3, workers=1)
    res = run_search(voc_samples, tmp_path / "s", cfg, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    assert {r["objective_name"] for r in recs} == {"trimap_miou(width=3)"}
    for r in recs:
        band = np.array(r["confusion_band"])
        full = np.array(r["confusion"])
        assert r["objective"] == pytest.approx(miou(band)) and r["miou"] == pytest.approx(miou(full))
        assert 0 < band.sum() < full.sum()
        assert (full - band >= 0).all()
    assert res.best_objective == max(r["objective"] for r in recs)
    # boundaries are harder than whole objects
    assert res.best_objective < res.rows[0]["miou"]


def test_torch_backend_search_groups_configurations_and_agrees_with_pydensecrf(voc_samples, tmp_path):
    grid = dict(w1=[3.0, 10.0], sigma_alpha=[20.0], sigma_beta=[3.0], rounds=0, workers=1)
    a = run_search(voc_samples[:1], tmp_path / "torch", SearchConfig(backend="torch", **grid), progress=False)
    b = run_search(voc_samples[:1], tmp_path / "pyd", SearchConfig(backend="pydensecrf", **grid), progress=False)
    assert [(r["w1"], r["sigma_alpha"], r["sigma_beta"]) for r in a.rows] == \
        [(r["w1"], r["sigma_alpha"], r["sigma_beta"]) for r in b.rows]
    for ra, rb in zip(a.rows, b.rows):
        assert ra["miou"] == pytest.approx(rb["miou"], abs=0.02)
    assert json.loads((tmp_path / "torch" / "best.json").read_text())["backend"] == "torch"


def test_bad_sample_files_are_named(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    probs = np.full((2, 6, 8), 0.5, np.float32)
    good = tmp_path / "good.npz"
    np.savez(good, image=image, probs=probs, label=np.zeros((6, 8), np.uint8))
    nolabel = tmp_path / "nolabel.npz"
    np.savez(nolabel, image=image, probs=probs)
    cfg = SearchConfig(w1=[5.0], sigma_alpha=[50.0], sigma_beta=[3.0], rounds=0, workers=1)
    with pytest.raises(RuntimeError, match=r"nolabel\.npz lacks key\(s\) \['label'\]"):
        run_search([good, nolabel], tmp_path / "s", cfg, progress=False)
    with pytest.raises(ValueError, match=r"1 sample file\(s\) do not exist.*missing\.npz"):
        run_search([good, tmp_path / "missing.npz"], tmp_path / "s", cfg, progress=False)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=image, probs=probs * 3, label=np.zeros((6, 8), np.uint8))
    with pytest.raises(RuntimeError, match=r"wrong\.npz: probs must sum to 1"):
        run_search([good, wrong], tmp_path / "s2", cfg, progress=False)


# --- atomic files: one mechanism, one file mode ----------------------------------------------------------


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a right mode is not a coincidence of the defaults."""
    old = os.umask(0o027)
    try:
        yield 0o666 & ~0o027
    finally:
        os.umask(old)


def test_deeplab_v1_atomic_is_crf_atomic():
    import crf.atomic
    import deeplab_v1.atomic

    for name in ("atomic_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"):
        assert getattr(deeplab_v1.atomic, name) is getattr(crf.atomic, name)


@pytest.mark.parametrize("side", ["crf", "deeplab_v1"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, side):
    atomic = __import__(f"{side}.atomic", fromlist=["atomic_file"])
    target = tmp_path / "out" / "best.json"
    atomic.atomic_write_json(target, {"w1": 4})
    old = target.read_bytes()
    with pytest.raises(RuntimeError, match="killed while writing"):
        with atomic.atomic_file(target) as f:
            f.write(b'{"w1": 5, "sigma')
            raise RuntimeError("killed while writing")
    assert target.read_bytes() == old
    assert [p.name for p in target.parent.iterdir()] == ["best.json"]  # no .best.json.*.tmp left
    with pytest.raises(TypeError):
        atomic.atomic_write_json(target, {"not json": object()})  # fails before any byte is written
    assert target.read_bytes() == old and [p.name for p in target.parent.iterdir()] == ["best.json"]


def test_search_and_deeplab_v1_outputs_get_the_umask_mode_not_0600(tmp_path, umask_027):
    from deeplab_v1.atomic import atomic_write_json
    from deeplab_v1.evaluation.plots import plot_trimap

    out = tmp_path / "s"
    run_search(_ids(tmp_path, ["a"]), out, SearchConfig(w1=[5.0], sigma_alpha=[50.0], sigma_beta=[3.0, 5.0],
                                                        rounds=0, objective=Bowl((5, 50, 3))), progress=False)
    atomic_write_json(tmp_path / "metrics.json", {"miou": 0.5})
    plot_trimap({"DCNN": {"widths": [1, 2], "pixel_accuracy": [0.5, 0.6], "miou": [0.3, 0.4]}},
                tmp_path / "trimap.png")
    files = [out / n for n in ("results.jsonl", "ranked.md", "heatmap.png", "best.json")]
    files += [tmp_path / "metrics.json", tmp_path / "trimap.png"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(umask_027) for f in files}
