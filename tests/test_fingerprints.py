"""Everything that can change a stage's result is in its fingerprint (issue #20): the labels a DIAGNOSTIC
test stage makes its scores from, the device the network runs on, the CRF backend ``auto`` resolves to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deeplab_v1.config import load_config, to_dict
from deeplab_v1.fingerprints import crf_backend_stamp, search_backend_stamp, stage_inputs
from deeplab_v1.runner import Runner

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "crf-demo.yaml"


def _demo(out: Path, root: Path, *extra: str) -> Runner:
    """A crf-demo run cut down to one image: degraded-GT scores, the CRF, the evaluation."""
    runner = Runner(load_config(DEMO, [f"output_dir={out}", f"data.root={root}", "data.max_test_images=1",
                                       "stages=[test, crf, evaluate]", "crf.use_search=false", "crf.workers=1",
                                       "crf.params={iterations: 2}", "evaluation.trimap_widths=[2]", *extra]),
                    progress=False)
    runner.run()
    return runner


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "stages").glob("*.json")}


def _copy_sample(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    shutil.copytree(REPO / "experiments" / "sample" / "VOC2012", root)
    return root


@pytest.mark.slow
def test_a_fixed_label_redoes_the_diagnostic_test_stage(tmp_path):
    """Degraded-GT scores are made from the labels: a fixed label redoes the test stage (new scores and
    DCNN predictions from the fixed label), and through it the CRF and the evaluation."""
    from deeplab_v1.data.io import read_label, write_label

    root, out = _copy_sample(tmp_path), tmp_path / "run"
    runner = _demo(out, root, "crf.backend=pydensecrf")
    first = _mtimes(out)
    sample = runner.ctx.test_samples()[0]
    dcnn = out / "predictions" / "dcnn" / f"{sample.id}.png"
    label = read_label(sample.label, 21)
    assert (read_label(dcnn, 21)[:40, :40] != 7).any()
    label[:40, :40] = 7  # the user fixes a corner: a cat
    write_label(sample.label, label)
    _demo(out, root, "crf.backend=pydensecrf")
    second = _mtimes(out)
    for stage in ("test", "crf", "evaluate"):
        assert second[f"{stage}.json"] != first[f"{stage}.json"], stage
    assert (read_label(dcnn, 21)[:40, :40] == 7).mean() > 0.8  # the scores come from the fixed label
    assert "its inputs changed since it ran (data.test_labels#files)" in (out / "run.log").read_text()
    rec = json.loads((out / "stages" / "test.json").read_text())
    assert "data.test_labels#files" in rec["inputs"]


def test_a_network_test_stage_does_not_depend_on_labels():
    cfg = to_dict(load_config(REPO / "experiments" / "default.yaml"))
    from deeplab_v1.fingerprints import stage_data

    assert stage_data("test", cfg) == (("test", ("image",)),)
    cfg["test"]["score_source"] = "degraded-gt"
    assert stage_data("test", cfg) == (("test", ("image", "label")),)


def test_the_device_is_in_the_fingerprints_of_the_network_stages():
    """Scores computed on the CPU are not reused after a switch to CUDA (and back); precision and tf32
    were keys of these stages already."""
    cpu = to_dict(load_config(REPO / "experiments" / "default.yaml"))
    cuda = json.loads(json.dumps(cpu))
    cuda["device"] = "cuda"
    for stage in ("train", "test"):
        assert stage_inputs(stage, cpu)["device"] == "cpu"
        assert stage_inputs(stage, cuda) != stage_inputs(stage, cpu)
        assert f"{stage}.precision" in stage_inputs(stage, cpu) and "tf32" in stage_inputs(stage, cpu)
    for stage in ("crf_search", "crf", "evaluate"):  # they run no network (crf.device is crf's own key)
        assert stage_inputs(stage, cuda) == stage_inputs(stage, cpu)
    assert "crf.device" in stage_inputs("crf", cpu) and "crf_search.device" in stage_inputs("crf_search", cpu)


def test_the_resolved_backend_stamps():
    voc = [(21, 375, 500), (21, 500, 500)]  # torch needs ~490 and ~650 MiB for these
    assert crf_backend_stamp("pydensecrf", "cpu", 1, voc) == "pydensecrf"
    assert crf_backend_stamp("auto", "cpu", 100_000, voc) == "torch"
    assert crf_backend_stamp("auto", "cpu", 1, voc) == "pydensecrf"
    assert crf_backend_stamp("auto", "cpu", 560, voc) == "pydensecrf"  # one backend for the run: the largest image decides
    search = {"backend": "auto", "device": "cpu", "memory_mb": 100_000, "workers": 1, "w1": [4, 5]}
    assert search_backend_stamp(search, voc) == "torch"
    assert search_backend_stamp({**search, "memory_mb": 1}, voc) == "pydensecrf"
    assert search_backend_stamp({**search, "backend": "torch", "memory_mb": 1}, voc) == "torch"


@pytest.mark.slow
def test_a_budget_that_switches_the_crf_backend_redoes_the_crf_stage(tmp_path):
    """``crf.memory_mb`` is neutral unless it changes the backend ``auto`` runs: torch and pydensecrf
    differ in the last bits, so the crf stage is redone (and says why); a budget that changes nothing
    redoes nothing."""
    root, out = _copy_sample(tmp_path), tmp_path / "run"
    _demo(out, root, "crf.memory_mb=100000")
    first = _mtimes(out)
    rec = json.loads((out / "stages" / "crf.json").read_text())
    assert rec["inputs"]["crf.backend#resolved"] == "torch" and rec["backends"] == {"torch": 1}
    _demo(out, root, "crf.memory_mb=200000")  # still torch: skipped
    assert _mtimes(out) == first
    _demo(out, root, "crf.memory_mb=1")
    second = _mtimes(out)
    assert second["test.json"] == first["test.json"]
    assert second["crf.json"] != first["crf.json"] and second["evaluate.json"] != first["evaluate.json"]
    rec = json.loads((out / "stages" / "crf.json").read_text())
    assert rec["inputs"]["crf.backend#resolved"] == "pydensecrf" and rec["backends"] == {"pydensecrf": 1}
    assert "(crf.backend#resolved)" in (out / "run.log").read_text()
    np.testing.assert_equal(sorted(p.name for p in (out / "predictions" / "crf").glob("*.png")),
                            sorted(p.name for p in (out / "predictions" / "dcnn").glob("*.png")))


@pytest.mark.slow
def test_evaluate_with_the_crf_predictions_gone_fails_or_rebuilds_never_reports_less(tmp_path, capsys):
    """A finished crf stage whose predictions were deleted: `deeplab evaluate --redo` fails with one line
    naming them and leaves no metrics, report or figures of the earlier evaluation; `deeplab run` rebuilds
    them (the crf stage, then the evaluation) and reports the CRF row again."""
    from deeplab_v1.cli import main

    root, out = _copy_sample(tmp_path), tmp_path / "run"
    _demo(out, root, "crf.backend=pydensecrf")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["crf"] and (out / "report.md").is_file() and (out / "figures").is_dir()
    crf_before = _mtimes(out)["crf.json"]
    shutil.rmtree(out / "predictions" / "crf")
    args = ["evaluate", str(DEMO), "--no-progress", "--redo"]
    for o in [f"output_dir={out}", f"data.root={root}", "data.max_test_images=1", "stages=[test, crf, evaluate]",
              "crf.use_search=false", "crf.workers=1", "crf.params={iterations: 2}", "evaluation.trimap_widths=[2]",
              "crf.backend=pydensecrf"]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: error: evaluate: 1 of 1 DCNN-CRF predictions are missing") and "\n" not in err
    for name in ("metrics.json", "trimap.json", "trimap.png", "report.md", "figures"):
        assert not (out / name).exists(), name
    assert not (out / "stages" / "evaluate.json").exists()
    _demo(out, root, "crf.backend=pydensecrf")
    assert _mtimes(out)["crf.json"] != crf_before
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "1 of its outputs are gone" in (out / "run.log").read_text()
    shutil.rmtree(out / "predictions" / "crf")  # `deeplab run` again: rebuilt, and the evaluation redone
    evaluated = _mtimes(out)["evaluate.json"]
    _demo(out, root, "crf.backend=pydensecrf")
    assert _mtimes(out)["evaluate.json"] != evaluated
    assert json.loads((out / "metrics.json").read_text()) == metrics
