"""The main job end to end: `deeplab run` on the shipped sample, resume, redo, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_v1.cli import main
from deeplab_v1.config import load_config
from deeplab_v1.runner import Runner

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"

QUICK = [
    "train.iterations=2", "train.batch_size=1", "train.checkpoint_every=1",
    "data.max_test_images=3",
    "crf_search.w1=[4]", "crf_search.sigma_alpha=[50]", "crf_search.sigma_beta=[3, 5]", "crf_search.rounds=0",
    "crf.workers=2", "crf_search.workers=1",
    "model.name=tiny-test",  # the pipeline, not the network: a few convolutions (deeplab_v1.models.tiny)
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(DEFAULT, QUICK + [f"output_dir={out}"])
    runner = Runner(cfg, progress=False)
    metrics = runner.run()
    return runner, metrics


@pytest.mark.slow
def test_run_writes_every_output(quick_run):
    runner, metrics = quick_run
    d = runner.dir
    for f in ("config.yaml", "run.log", "checkpoints/final.pth", "checkpoints/iter_2.pth", "metrics.json",
              "trimap.json", "trimap.png", "report.md", "crf_search/best.json", "crf_search/ranked.md",
              "crf_search/heatmap.png", "crf_search/results.jsonl"):
        assert (d / f).is_file(), f
    ids = [s.id for s in runner.ctx.test_samples()]
    assert len(ids) == 3
    for i in ids:
        assert (d / "scores" / f"{i}.npz").is_file()
        for kind in ("dcnn", "crf"):
            png = Image.open(d / "predictions" / kind / f"{i}.png")
            assert png.mode == "P"  # VOC palette
    m = json.loads((d / "metrics.json").read_text())
    for k in ("dcnn", "crf"):
        assert 0.0 <= m[k]["miou"] <= 1.0 and len(m[k]["per_class_iou"]) == 21
        assert set(m[k]) >= {"miou", "pixel_accuracy", "per_class_iou"}
    assert metrics["dcnn"]["miou"] == m["dcnn"]["miou"]
    t = json.loads((d / "trimap.json").read_text())
    assert t["dcnn"]["widths"] == runner.cfg.evaluation.trimap_widths
    report = (d / "report.md").read_text()
    assert "random weights" in report and "DCNN-CRF" in report and "Trimap" in report
    # the crf stage used the search's best parameters
    crf_rec = json.loads((d / "stages" / "crf.json").read_text())
    best = json.loads((d / "crf_search" / "best.json").read_text())
    assert crf_rec["params_from"] == "crf_search best"
    assert crf_rec["params"]["sigma_beta"] == best.get("params", best)["sigma_beta"]


@pytest.mark.slow
def test_rerun_skips_and_redo_reruns(quick_run):
    runner, _ = quick_run
    d = runner.dir
    before = {p.name: p.stat().st_mtime_ns for p in (d / "stages").iterdir()}
    Runner(runner.cfg, progress=False).run()
    after = {p.name: p.stat().st_mtime_ns for p in (d / "stages").iterdir()}
    assert before == after
    Runner(runner.cfg, progress=False, redo=["crf"]).run()
    again = {p.name: p.stat().st_mtime_ns for p in (d / "stages").iterdir()}
    assert again["train.json"] == before["train.json"] and again["test.json"] == before["test.json"]
    assert again["crf.json"] != before["crf.json"] and again["evaluate.json"] != before["evaluate.json"]


@pytest.mark.slow
def test_training_resumes_exactly(tmp_path):
    """A run killed after 2 of 4 iterations resumes from its checkpoint and ends with the same weights as
    an uninterrupted run (same data order, crops and dropout)."""
    common = ["train.iterations=4", "train.batch_size=1", "train.crop_size=161", "train.checkpoint_every=2",
              "stages=[train]", "model.name=deeplab-largefov"]
    full = Runner(load_config(DEFAULT, common + [f"output_dir={tmp_path / 'full'}"]), progress=False)
    full.run()
    part_cfg = load_config(DEFAULT, common + [f"output_dir={tmp_path / 'part'}"])
    part = Runner(part_cfg, progress=False)
    part.run()
    # simulate the kill: keep only the iteration-2 checkpoint
    for f in ("iter_4.pth", "final.pth"):
        (tmp_path / "part" / "checkpoints" / f).unlink()
    (tmp_path / "part" / "stages" / "train.json").unlink()
    Runner(part_cfg, progress=False).run()
    a = torch.load(tmp_path / "full" / "checkpoints" / "final.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "final.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resuming from iter_2.pth" in (tmp_path / "part" / "run.log").read_text()
    init = load_config(DEFAULT, common + [f"output_dir={tmp_path / 'x'}"])
    from deeplab_v1.stages.network import initial_model

    model, _ = initial_model(Runner(init, progress=False).ctx)
    assert not torch.equal(model.state_dict()["fc8.weight"], a["fc8.weight"])  # it did train


def test_cli_help_for_every_command(capsys):
    for cmd in (["--help"], ["run", "--help"], ["train", "--help"], ["test", "--help"], ["crf", "--help"],
                ["crf-search", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert "--set" in capsys.readouterr().out


def test_cli_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: deeplab-largefov}\ntrain: {iteratons: 3}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.iteratons" in err and "bad.yaml" in err
    assert main(["run", str(DEFAULT), "--set", "data.root=nowhere"]) == 2
    assert "data.root" in capsys.readouterr().err


def test_console_script_installed():
    """The installed ``deeplab`` script (pyproject ``[project.scripts]``), not the module."""
    import shutil

    script = Path(sys.executable).parent / "deeplab"
    script = script if script.is_file() else Path(shutil.which("deeplab") or "deeplab-not-installed")
    assert script.is_file(), "the deeplab console script is not installed (pip install -e .)"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "crf-search" in out.stdout


@pytest.mark.slow
def test_single_stage_redo_reruns_that_stage_alone(quick_run, capsys):
    """``deeplab crf EXP --redo`` reruns the crf stage and nothing after it; ``deeplab evaluate`` then
    reruns nothing."""
    runner, _ = quick_run
    d = runner.dir
    before = {p.name: p.stat().st_mtime_ns for p in (d / "stages").iterdir()}
    overrides = [x for o in QUICK + [f"output_dir={d}"] for x in ("--set", o)]
    assert main(["crf", str(DEFAULT), "--redo", "--no-progress", *overrides]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (d / "stages").iterdir()}
    assert after["crf.json"] != before["crf.json"]
    assert {k: v for k, v in after.items() if k != "crf.json"} == {k: v for k, v in before.items() if k != "crf.json"}
    assert main(["evaluate", str(DEFAULT), "--no-progress", *overrides]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (d / "stages").iterdir()} == after


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3-resnet50", "deeplabv3plus-xception65"])
def test_v3_models_train_and_evaluate_through_the_runner(name, tmp_path):
    """A v3 and a v3+ model run through the same stages with the v3 protocol options (a tiny schedule):
    trained at output_stride 16, tested at 8 (v3+: its decoder's 4), one prediction per image. The other
    v3 variants differ only in their backbones, which tests/test_models_v3.py builds."""
    cfg = load_config(DEFAULT, [
        f"output_dir={tmp_path}", f"model.name={name}", "stages=[train, test, evaluate]", "crf.enabled=false",
        "train.iterations=1", "train.batch_size=2", "train.crop_size=97", "train.label_mode=upsample",
        "train.lr_policy=poly", "train.base_lr=0.007", "train.classifier_lr_mult=1", "train.scale_range=[0.5, 2.0]",
        "train.output_stride=16", "test.output_stride=8", "data.max_test_images=1",
    ])
    metrics = Runner(cfg, progress=False).run()
    assert set(metrics) >= {"dcnn"} and "crf" not in metrics and metrics["images"] == 1
    assert json.loads((tmp_path / "stages" / "train.json").read_text())["iterations"] == 1
    sm = np.load(tmp_path / "scores" / f"{Runner(cfg, progress=False).ctx.test_samples()[0].id}.npz")
    assert int(sm["stride"]) == (4 if "plus" in name else 8)  # evaluated at output_stride 8 (v3+: decoder, 4)


@pytest.mark.slow
def test_experiment_runs_from_a_converted_init(tmp_path):
    """`init:` takes a release-style .caffemodel or the checkpoint `deeplab convert` makes of it; both give
    the same scores, which come from those weights (not the random initialisation)."""
    from deeplab_v1.models import build_model
    from deeplab_v1.weights.convert import export_caffemodel

    torch.manual_seed(123)
    model = build_model("deeplab-largefov")
    export_caffemodel(model, tmp_path / "train_iter_6000.caffemodel", format="V1")
    assert main(["convert", str(tmp_path / "train_iter_6000.caffemodel"), str(tmp_path / "largefov.pth"),
                 "--model", "deeplab-largefov"]) == 0
    scores = {}
    for init in ("train_iter_6000.caffemodel", "largefov.pth"):
        out = tmp_path / f"run-{init}"
        cfg = load_config(DEFAULT, [f"output_dir={out}", f"model.init={tmp_path / init}", "stages=[train, test]",
                                    "train.iterations=0", "data.max_test_images=1", "crf.enabled=false"])
        runner = Runner(cfg, progress=False)
        runner.run()
        sample = runner.ctx.test_samples()[0]
        scores[init] = np.load(out / "scores" / f"{sample.id}.npz")["scores"]
        assert init in json.loads((out / "stages" / "train.json").read_text())["init"]
    assert np.array_equal(scores["train_iter_6000.caffemodel"], scores["largefov.pth"])
    from deeplab_v1.data.io import read_image
    from deeplab_v1.engine.inference import predict

    with torch.no_grad():
        direct = predict(model.eval(), read_image(sample.image), size=513)
    assert np.allclose(scores["largefov.pth"].astype(np.float32), direct.scores, atol=2e-2 * np.abs(direct.scores).max())


@pytest.mark.slow
def test_msc_largefov_from_a_largefov_checkpoint_trains_only_the_branches(tmp_path):
    """The release's MSc protocol (DeepLab-MSc-LargeFOV/train.prototxt, paper Sec. 4.3) as the shipped
    experiment encodes it: init from a trained LargeFOV, the branches start new (no flag), conv1_1 ... fc8
    stay bit-identical (blobs_lr 0) while every branch layer learns."""
    from deeplab_v1.engine.checkpoint import load_checkpoint
    from deeplab_v1.models import build_model

    torch.manual_seed(5)
    largefov = build_model("deeplab-largefov")
    init = tmp_path / "largefov.pth"
    torch.save({"model": "deeplab-largefov", "state_dict": largefov.state_dict()}, init)
    cfg = load_config(REPO / "experiments" / "voc12-deeplab-msc-largefov.yaml", [
        f"model.init={init}", f"data.root={REPO / 'experiments' / 'sample' / 'VOC2012'}", "data.train_list=train",
        "data.test_list=val", "train.iterations=3", "train.batch_size=2", "train.crop_size=161",
        "train.base_lr=0.01", "train.checkpoint_every=3", "stages=[train]", f"output_dir={tmp_path / 'run'}",
    ])
    Runner(cfg, progress=False).run()
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pth")["state_dict"]
    init_sd = largefov.state_dict()
    trunk = [k for k in trained if not k.startswith("msc.")]
    assert set(trunk) == set(init_sd) - {k for k in init_sd if k.startswith("msc.")}
    for k in trunk:
        assert torch.equal(trained[k], init_sd[k]), f"{k} changed: the trunk must stay frozen"
    changed = [k for k in trained if k.startswith("msc.") and k.endswith("weight")]
    assert len(changed) == 15
    torch.manual_seed(cfg.seed)
    fresh = build_model("deeplab-msc-largefov").state_dict()  # the branches' fillers, as the run drew them
    for k in changed:
        assert not torch.equal(trained[k], fresh[k]), f"{k} did not learn"
