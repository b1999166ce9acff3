"""The learned CRF in the pipeline (issue #24 item 2): ``crf_search.learn`` fits the CRF from the grid's best and
writes ``crf_search/learned.json``; the crf stage and ``deeplab predict`` apply it (``crf.use_learned``), both
CRF backends take its ``C x C`` compatibility; a rerun does not refit, a changed ``learn`` list does; the report
compares no CRF / grid best / learned. ``deeplab predict`` writes the run's ``data.palette`` colours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from crf import RELEASE_LARGEFOV, CRFParams, dense_crf
from deeplab_v1.config import ConfigError, DataConfig, load_config
from deeplab_v1.data.degraded import degraded_probs
from deeplab_v1.data.io import read_image
from deeplab_v1.data.layouts import palette as layout_palette
from deeplab_v1.figures import blend, side_by_side
from deeplab_v1.models import build_model
from deeplab_v1.predict import crf_for, predict_images
from deeplab_v1.runner import Runner
from deeplab_v1.stages import crf_search
from deeplab_v1.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "experiments" / "sample" / "VOC2012"
# crf-demo (DIAGNOSTIC degraded-GT scores, no network) on the sample's 3 smallest images (about 300 x 260), a
# 2-configuration grid, 3 mean-field iterations, a fit of at most 3 epochs: seconds per stage on 2 cores
SMALL = ("2007_002427", "2007_003742", "2007_008043")
SETTINGS = ["crf_search.num_images=3", "crf_search.w1=[4]", "crf_search.sigma_alpha=[30]",
            "crf_search.sigma_beta=[3, 5]", "crf_search.iterations=3", "crf_search.workers=1", "crf.workers=1",
            "crf_search.backend=pydensecrf", "crf.backend=pydensecrf"]


@pytest.fixture(scope="module", autouse=True)
def short_fit(tmp_path_factory):
    """Every run of the module: its test list (one file: its path is a key of the runs' fingerprints) and a fit
    of at most 3 epochs at a larger step (the stage's fit settings)."""
    listing = tmp_path_factory.mktemp("lists") / "small.txt"
    listing.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClass/{i}.png\n" for i in SMALL))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(crf_search.FIT_SETTINGS, "epochs", 3)
        mp.setitem(crf_search.FIT_SETTINGS, "lr", 0.1)
        mp.setitem(SETTINGS_FILES, "test_list", listing)
        yield


SETTINGS_FILES: dict[str, Path] = {}


def _config(out: Path, *extra: str):
    return load_config(REPO / "experiments" / "crf-demo.yaml", [
        *SETTINGS, f"data.root={SAMPLE}", f"data.test_list={SETTINGS_FILES['test_list']}", f"output_dir={out}", *extra])


def _run(out: Path, *extra: str, stages: list[str] | None = None) -> None:
    Runner(_config(out, *extra), progress=False).run(stages)


def _labels(out: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((out / "predictions" / "crf").glob("*.png"))}


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learned") / "run"
    _run(out, "crf_search.learn=[w1, w2, compatibility]")
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ------------------------------------------------------------------------------------------ the post-hoc CRF
def test_both_backends_take_a_matrix_compatibility_in_densecrfs_convention():
    label = np.asarray(Image.open(SAMPLE / "SegmentationClass" / "2007_002427.png"))
    image = np.ascontiguousarray(read_image(SAMPLE / "JPEGImages" / "2007_002427.jpg")[:, :, ::-1])
    probs = degraded_probs(label, 21)
    params = CRFParams.from_dict({**RELEASE_LARGEFOV.to_dict(), "iterations": 5})
    potts = dense_crf(image, probs, params, backend="pydensecrf")
    # -I is Potts: the same marginals as the scalar weights, in both backends
    assert np.allclose(dense_crf(image, probs, params, backend="pydensecrf", compatibility=-np.eye(21)), potts, atol=1e-6)
    torch_potts = dense_crf(image, probs, params, backend="torch")
    assert np.allclose(dense_crf(image, probs, params, backend="torch", compatibility=-np.eye(21)), torch_potts, atol=1e-5)
    # a compatibility that pulls every label towards class 15 (person): both backends agree, unlike Potts
    mu = -np.eye(21)
    mu[:, 15] = mu[15, :] = -3.0
    a = dense_crf(image, probs, params, backend="pydensecrf", compatibility=mu).argmax(0)
    b = dense_crf(image, probs, params, backend="torch", compatibility=mu).argmax(0)
    assert (a == b).mean() > 0.999
    assert (a == 15).mean() > (potts.argmax(0) == 15).mean() + 0.05
    with pytest.raises(ValueError, match=r"compatibility must be \(21, 21\)"):
        dense_crf(image, probs, params, compatibility=np.eye(3))


# ------------------------------------------------------------------------------------------ the pipeline
def test_learn_writes_learned_json_and_the_crf_stage_and_report_use_it(learned_run):
    learned = json.loads((learned_run / "crf_search" / "learned.json").read_text())
    best = json.loads((learned_run / "crf_search" / "best.json").read_text())
    assert learned["learn"] == ["w1", "w2", "compatibility"]
    assert learned["grid_best"] == {k: best[k] for k in learned["grid_best"]}  # it started from the grid's best
    mu = np.array(learned["compatibility"])
    assert mu.shape == (21, 21) and np.allclose(mu, mu.T) and not np.allclose(mu, -np.eye(21))
    assert (learned["params"]["w1"], learned["params"]["w2"]) != (best["w1"], best["w2"])
    fit, held = learned["objective"]["fit"], learned["objective"]["held_out"]
    assert fit["after"] < fit["before"] and held["after"] <= held["before"]
    assert len(learned["fit"]["held_out_images"]) == 1 and len(learned["fit"]["fit_images"]) == 2
    scores = learned["held_out_scores"]
    assert scores["share"] == "held_out" and scores["images"] == 1
    assert all(0 <= scores[k]["miou"] <= 1 for k in ("no_crf", "grid_best", "learned"))
    assert "DIAGNOSTIC" in learned["scores"]
    rec = json.loads((learned_run / "stages" / "crf.json").read_text())
    assert rec["learned"] is True and "learned" in rec["params_from"]
    assert rec["params"] == learned["params"]
    search = json.loads((learned_run / "stages" / "crf_search.json").read_text())
    assert search["learned"]["reused"] is False and search["learned"]["params"] == learned["params"]
    assert "crf_search.learned#content" in rec["inputs"]
    report = (learned_run / "report.md").read_text()
    assert "## Learned CRF (crf_search.learn: w1, w2, compatibility)" in report
    assert "The crf stage used the learned CRF" in report
    assert "| no CRF |" in report and "| grid best " in report and "| learned w1 " in report


def test_use_learned_false_runs_the_grid_best_and_gives_other_labels(learned_run, tmp_path):
    run = _copy(learned_run, tmp_path)
    learned = _labels(run)
    _run(run, "crf_search.learn=[w1, w2, compatibility]", "crf.use_learned=false", stages=["crf"])
    rec = json.loads((run / "stages" / "crf.json").read_text())
    assert rec["learned"] is False and rec["params_from"] == "crf_search best"
    assert "crf_search.learned#content" not in rec["inputs"]
    grid = _labels(run)
    assert grid.keys() == learned.keys() and len(grid) == 3
    assert any((grid[k] != learned[k]).any() for k in grid)  # the fitted CRF labels some pixel otherwise


def test_a_rerun_does_not_refit_and_a_changed_learned_json_redoes_the_crf_stage(learned_run, tmp_path):
    run = _copy(learned_run, tmp_path)
    path = run / "crf_search" / "learned.json"
    before = path.read_bytes()
    (run / "stages" / "crf_search.json").unlink()  # a search killed after the fit: the stage runs again
    _run(run, "crf_search.learn=[w1, w2, compatibility]", stages=["crf_search"])
    assert path.read_bytes() == before
    assert "holds the fit of these inputs: reused, not refitted" in (run / "run.log").read_text()
    assert json.loads((run / "stages" / "crf_search.json").read_text())["learned"]["reused"] is True
    # a learned.json changed by hand (or a refit) redoes the crf stage, which applies the new values
    record = json.loads(before)
    record["params"]["w1"] = 50.0
    path.write_text(json.dumps(record))
    _run(run, "crf_search.learn=[w1, w2, compatibility]", stages=["crf"])
    assert "stage crf: its inputs changed since it ran (crf_search.learned#content)" in (run / "run.log").read_text()
    assert json.loads((run / "stages" / "crf.json").read_text())["params"]["w1"] == 50.0


def test_a_changed_learn_list_refits(learned_run, tmp_path, monkeypatch):
    run = _copy(learned_run, tmp_path)
    monkeypatch.setitem(crf_search.FIT_SETTINGS, "epochs", 1)  # one epoch is enough to move w1
    _run(run, "crf_search.learn=[w1]", stages=["crf_search", "crf"])
    learned = json.loads((run / "crf_search" / "learned.json").read_text())
    best = json.loads((run / "crf_search" / "best.json").read_text())
    assert learned["learn"] == ["w1"] and learned["params"]["w2"] == best["w2"]
    assert learned["params"]["w1"] != best["w1"]
    assert np.array_equal(np.array(learned["compatibility"]), -np.eye(21))
    assert json.loads((run / "stages" / "crf.json").read_text())["params"] == learned["params"]


def test_learn_names_are_checked_before_any_work(tmp_path):
    assert _config(tmp_path / "a", "crf_search.learn=[w2, compatibility]").crf_search.learn == ["w2", "compatibility"]
    assert _config(tmp_path / "b").crf_search.learn == []  # the paper's grid alone
    with pytest.raises(ConfigError, match=r"crf_search\.learn\[1\]' must be 'w1' or 'w2' or 'compatibility', got 'w3'"):
        _config(tmp_path / "c", "crf_search.learn=[w1, w3]")
    with pytest.raises(ConfigError, match=r"crf_search\.learn' must name each of w1, w2, compatibility at most once"):
        _config(tmp_path / "e", "crf_search.learn=[w1, w1]")
    with pytest.raises(ConfigError, match=r"crf_search\.learn' must be list"):
        _config(tmp_path / "d", "crf_search.learn=w1")


# ------------------------------------------------------------------------------------------ deeplab predict
@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run folder of a 3-class ``tiny-test`` network on a folder dataset with its own palette, whose
    search fitted a CRF that pulls every pixel towards class 2."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints" / "final.pth", {"state_dict": build_model("tiny-test", 3).state_dict(),
                                                        "model": "tiny-test", "num_classes": 3})
    config = {"data": {"layout": "folder", "palette": [[10, 20, 30], [200, 100, 0], [0, 250, 120]]},
              "crf": {"use_learned": True}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    mu = [[-1.0, 0.0, -8.0], [0.0, -1.0, -8.0], [-8.0, -8.0, -1.0]]
    params = {**RELEASE_LARGEFOV.to_dict(), "iterations": 5}
    (run / "crf_search").mkdir()
    (run / "crf_search" / "learned.json").write_text(json.dumps({"learn": ["compatibility"], "params": params,
                                                                 "compatibility": mu}))
    (run / "crf_search" / "best.json").write_text(json.dumps(params))
    return run


def _predict(run: Path, tmp_path: Path) -> tuple[Path, dict, Path]:
    image = tmp_path / "photo.jpg"
    photo = Image.open(SAMPLE / "JPEGImages" / "2007_002427.jpg")
    photo.resize((photo.width // 4, photo.height // 4)).save(image, quality=90)
    out = tmp_path / "out"
    record = predict_images([image], run / "checkpoints" / "final.pth", out, use_crf=True, size=97, device="cpu",
                            progress=False, log=lambda line: None)
    return out, record, image


def test_predict_writes_labels_and_overlays_in_the_runs_palette(tiny_run, tmp_path):
    out, record, image = _predict(tiny_run, tmp_path)
    colours = [[10, 20, 30], [200, 100, 0], [0, 250, 120]]
    for method in ("dcnn", "crf"):
        png = Image.open(out / method / "photo.png")
        assert png.mode == "P" and png.getpalette()[:9] == [v for c in colours for v in c]
    assert "data.palette" in record["palette"]
    rgb = np.ascontiguousarray(read_image(image)[:, :, ::-1])
    dcnn, crf = (np.asarray(Image.open(out / m / "photo.png")) for m in ("dcnn", "crf"))
    full = layout_palette(DataConfig(layout="folder", palette=colours))
    expected = side_by_side([("image", rgb), ("DCNN", blend(rgb, dcnn, palette=full)),
                             ("DCNN-CRF", blend(rgb, crf, palette=full))])
    assert np.array_equal(np.asarray(Image.open(out / "overlay" / "photo.png").convert("RGB")), expected)


def test_predict_applies_the_runs_learned_crf(tiny_run, tmp_path):
    ck = tiny_run / "checkpoints" / "final.pth"
    params, origin, mu = crf_for(ck)
    assert "learned.json" in origin and mu.shape == (3, 3) and params.iterations == 5
    out, record, _ = _predict(tiny_run, tmp_path)
    assert record["crf"]["compatibility"] == mu.tolist() and "learned.json" in record["crf"]["from"]
    dcnn, crf = (np.asarray(Image.open(out / m / "photo.png")) for m in ("dcnn", "crf"))
    assert (crf == 2).mean() > 0.9 > (dcnn == 2).mean()  # the learned compatibility ran: class 2 pulls
    # the run's crf.use_learned false: the search's best, Potts
    (tiny_run / "config.yaml").write_text(yaml.safe_dump({"crf": {"use_learned": False}}))
    params, origin, mu = crf_for(ck)
    assert mu is None and "best.json" in origin
