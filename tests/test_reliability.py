"""Runs that cannot lie: fingerprints tie finished stages to their inputs, values are checked before any
work, caches and checkpoints are validated when reused, one writer per run folder, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deeplab_v1.cli import main
from deeplab_v1.config import ConfigError, load_config
from deeplab_v1.runner import Runner, StageError, run_lock

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"
TINY = ["train.iterations=2", "train.batch_size=1", "train.crop_size=81", "train.checkpoint_every=1",
        "data.max_test_images=2", "test.size=97", "stages=[train, test]",
        "model.name=tiny-test"]  # the pipeline, not the network: a few convolutions (deeplab_v1.models.tiny)


def _run(out: Path, *extra: str) -> Runner:
    runner = Runner(load_config(DEFAULT, TINY + [f"output_dir={out}", *extra]), progress=False)
    runner.run()
    return runner


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "stages").glob("*.json")}


def test_a_changed_key_redoes_the_stages_that_depend_on_it(tmp_path):
    out = tmp_path / "run"
    _run(out)
    first = _mtimes(out)
    _run(out, "train.log_every=1", "train.checkpoint_every=2")  # neutral keys: nothing is redone
    assert _mtimes(out) == first
    _run(out, "test.size=105")  # only the test stage depends on test.size
    second = _mtimes(out)
    assert second["train.json"] == first["train.json"] and second["test.json"] != first["test.json"]
    assert "test.size" in (out / "run.log").read_text()
    _run(out, "train.iterations=3")  # training changes: train and, through it, test are redone
    third = _mtimes(out)
    assert third["train.json"] != second["train.json"] and third["test.json"] != second["test.json"]
    state = torch.load(out / "checkpoints" / "final.pth", weights_only=True)
    assert state["iteration"] == 3
    rec = json.loads((out / "stages" / "train.json").read_text())
    assert rec["inputs"]["train.iterations"] == 3 and len(rec["fingerprint"]) == 64
    assert "its inputs changed since it ran (train.iterations)" in (out / "run.log").read_text()


def test_partial_outputs_of_other_inputs_are_not_reused(tmp_path):
    out = tmp_path / "run"
    runner = _run(out)
    sid = runner.ctx.test_samples()[0].id
    (out / "stages" / "test.json").unlink()  # as if killed during test, under other inputs
    (out / "stages" / "test.started.json").write_text(json.dumps({"fingerprint": "0" * 64}))
    stale = out / "scores" / f"{sid}.npz"
    before = stale.stat().st_mtime_ns
    _run(out)
    assert stale.stat().st_mtime_ns != before
    assert "starting afresh" in (out / "run.log").read_text()


def test_truncated_cache_kept_by_an_unfinished_test_stage_is_recomputed(tmp_path):
    out = tmp_path / "run"
    runner = _run(out)
    sid = runner.ctx.test_samples()[0].id
    cache = out / "scores" / f"{sid}.npz"
    good = cache.read_bytes()
    (out / "stages" / "test.json").unlink()  # killed after this image, before the record
    cache.write_bytes(good[:100])
    _run(out)
    assert cache.read_bytes() == good
    assert f"{sid}.npz: not a readable score cache" in (out / "run.log").read_text()


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    out = tmp_path / "run"
    _run(out, "stages=[train]")
    full = torch.load(out / "checkpoints" / "final.pth", weights_only=True)["state_dict"]
    (out / "stages" / "train.json").unlink()
    (out / "checkpoints" / "final.pth").unlink()
    data = (out / "checkpoints" / "iter_2.pth").read_bytes()
    (out / "checkpoints" / "iter_2.pth").write_bytes(data[: len(data) // 2])  # a write killed midway
    _run(out, "stages=[train]")
    log = (out / "run.log").read_text()
    assert "iter_2.pth" in log and "falling back" in log and "resuming from iter_1.pth" in log
    again = torch.load(out / "checkpoints" / "final.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(full[k], again[k]) for k in full)  # and the result is the uninterrupted one


def test_redo_clears_a_stage_that_never_finished(tmp_path):
    out = tmp_path / "run"
    runner = _run(out)
    (out / "stages" / "test.json").unlink()
    stale = out / "scores" / "stale.npz"
    stale.write_bytes(b"x")
    Runner(runner.cfg, progress=False, redo=["test"]).run()
    assert not stale.exists() and (out / "stages" / "test.json").is_file()


def test_one_writer_per_run_folder(tmp_path):
    import socket

    with run_lock(tmp_path / ".lock"):  # a live holder (flock): a second writer is refused, named
        with pytest.raises(StageError, match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
            with run_lock(tmp_path / ".lock"):
                pass
    (tmp_path / ".lock").write_text("999999999")  # a dead one's (no holder): taken over
    with run_lock(tmp_path / ".lock"):
        assert json.loads((tmp_path / ".lock").read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("override,key", [
    ("train.crop_size=0", "train.crop_size"), ("train.crop_size=-3", "train.crop_size"),
    ("test.size=0", "test.size"), ("test.size=-5", "test.size"), ("crf.workers=-2", "crf.workers"),
    ("crf_search.workers=-2", "crf_search"), ("crf_search.iterations=0", "crf_search"),
    ("crf_search.trimap_width=0", "crf_search"),
])
def test_late_failures_stop_before_any_work(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEFAULT, [override])
    assert main(["run", str(DEFAULT), "--set", override, "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: error:") and "\n" not in err and not (tmp_path / "stages").exists()


def test_a_float_written_like_1e_4_is_a_number():
    assert load_config(DEFAULT, ["train.base_lr=1e-4"]).train.base_lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="train.base_lr"):
        load_config(DEFAULT, ["train.base_lr=fast"])


def test_errors_are_one_line_internal_faults_exit_1(tmp_path, capsys, monkeypatch):
    from deeplab_v1 import runner as runner_mod

    def boom(self, stages=None):
        raise KeyError("an internal fault")

    monkeypatch.setattr(runner_mod.Runner, "run", boom)
    assert main(["run", str(DEFAULT), "--set", f"output_dir={tmp_path}", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: internal error: KeyError") and "--debug" in err and "\n" not in err
    with pytest.raises(KeyError):
        main(["run", str(DEFAULT), "--set", f"output_dir={tmp_path}", "--debug"])


def test_a_refused_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """PermissionError (a read-only output folder) or a full disk: the user's to fix, exit 2, one line."""
    from deeplab_v1 import runner as runner_mod

    def refused(self, stages=None):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(runner_mod.Runner, "run", refused)
    assert main(["run", str(DEFAULT), "--set", f"output_dir={tmp_path / 'run'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: error:") and "Permission denied" in err and "config.yaml" in err


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    out = tmp_path / "run"
    _run(out)
    torn = out / "checkpoints" / ".iter_3.pth.abc123.tmp"
    torn.write_bytes(b"\0" * 1024)
    _run(out)
    assert not torn.exists() and (out / "checkpoints" / "final.pth").is_file()


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see the worker")
def test_workers_die_with_their_parent(tmp_path):
    """kill -9 of the process that owns a CRF pool: its workers end within seconds (they watch it)."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, time\n"
        "from crf.pool import make_executor\n"
        "if __name__ == '__main__':\n"
        "    ex = make_executor(1, 'pydensecrf')\n"
        "    print(ex.submit(os.getpid).result(), flush=True)\n"
        "    time.sleep(60)\n"
    )
    (tmp_path / "owner.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "owner.py")], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    worker = int(proc.stdout.readline())
    assert not _dead(worker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and not _dead(worker):
        time.sleep(0.2)
    assert _dead(worker), f"worker {worker} outlived its parent"


def test_bad_images_and_labels_are_listed_before_any_work(tmp_path, capsys):
    """A corrupt image, a label of the wrong size and a label with a foreign value, in a copy of the
    sample: one error names all three files before training starts; a second check reads nothing."""
    import shutil

    import numpy as np

    from deeplab_v1.data.check import check_samples
    from deeplab_v1.data.io import DataError, read_image, write_label
    from deeplab_v1.data.lists import load_samples

    root = tmp_path / "VOC2012"
    shutil.copytree(REPO / "experiments" / "sample" / "VOC2012", root)
    samples = load_samples(root, "train", require_labels=True)
    samples[0].image.write_bytes(samples[0].image.read_bytes()[:200])
    write_label(samples[1].label, np.zeros((10, 12), np.uint8))
    h, w = read_image(samples[2].image).shape[:2]
    bad = np.full((h, w), 37, np.uint8)
    write_label(samples[2].label, bad)
    out = tmp_path / "run"
    assert main(["run", str(DEFAULT), "--set", f"data.root={root}", "--set", f"output_dir={out}",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "3 of" in err and all(str(p) in err for p in (samples[0].image, samples[1].label, samples[2].label))
    assert "37" in err and not (out / "stages" / "train.json").exists()
    good = load_samples(REPO / "experiments" / "sample" / "VOC2012", "train", require_labels=True)
    cache = tmp_path / "check.json"
    assert check_samples(good, 21, cache=cache, progress=False) == len(good)
    assert check_samples(good, 21, cache=cache, progress=False) == 0  # remembered by size and mtime
    with pytest.raises(DataError):
        check_samples(samples, 21, cache=cache, progress=False)


def test_a_failed_crf_task_is_a_one_line_error(tmp_path, capsys):
    """A damaged score cache met by the crf stage: `deeplab: error:` naming the file, exit 2."""
    out = tmp_path / "run"
    runner = _run(out)
    sid = runner.ctx.test_samples()[0].id
    (out / "scores" / f"{sid}.npz").write_bytes(b"not an npz")
    args = ["crf", str(DEFAULT), "--no-progress", "--redo"]
    for o in TINY + [f"output_dir={out}", "crf.workers=1"]:
        args += ["--set", o]
    assert main(args) == 2  # backend auto reads every cache's header before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: error: crf: score cache") and f"{sid}.npz" in err and "\n" not in err
    assert "not an .npz archive" in err and "allow_pickle" not in err
    assert main(args + ["--set", "crf.backend=pydensecrf"]) == 2  # an explicit backend meets it in the task
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: error: CRF task") and f"{sid}.npz" in err and "\n" not in err


@pytest.mark.slow
def test_a_fixed_label_redoes_the_stages_that_read_labels(tmp_path):
    """The labels' size and mtime are in the fingerprints of crf_search and evaluate: after a label is
    fixed, the search inputs that embedded the old label are rebuilt; train and test are not redone."""
    import shutil

    import numpy as np

    from deeplab_v1.data.io import read_label, write_label

    root = tmp_path / "VOC2012"
    shutil.copytree(REPO / "experiments" / "sample" / "VOC2012", root)
    out = tmp_path / "run"
    extra = [f"data.root={root}", "stages=[train, test, crf_search, crf, evaluate]", "crf_search.num_images=1",
             "crf_search.w1=[4]", "crf_search.sigma_alpha=[50]", "crf_search.sigma_beta=[3]",
             "crf_search.rounds=1", "crf.workers=1", "crf_search.workers=1", "evaluation.trimap_widths=[2]"]
    runner = _run(out, *extra)
    first = _mtimes(out)
    (sample_file,) = (out / "crf_search" / "samples").glob("*.npz")
    sid = sample_file.stem
    label_path = next(s.label for s in runner.ctx.test_samples() if s.id == sid)
    built = sample_file.stat().st_mtime_ns
    label = read_label(label_path, 21)
    label[:5, :5] = 0  # the user fixes a few pixels
    write_label(label_path, label)
    _run(out, *extra)
    second = _mtimes(out)
    assert second["train.json"] == first["train.json"] and second["test.json"] == first["test.json"]
    for stage in ("crf_search", "crf", "evaluate"):
        assert second[f"{stage}.json"] != first[f"{stage}.json"], stage
    assert sample_file.stat().st_mtime_ns != built
    with np.load(sample_file, allow_pickle=False) as z:
        assert (z["label"][:5, :5] == 0).all()
    assert "data.test_labels#files" in (out / "run.log").read_text()


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "another model"])
def test_a_damaged_model_init_is_a_one_line_error(damage, tmp_path, capsys):
    """A truncated or garbage ``model.init``, or the weights of another model (5 classes): one line naming
    the file, exit 2, nothing trained."""
    import numpy as np

    from deeplab_v1.models import build_model

    init = tmp_path / "init.pth"
    torch.save({"model": build_model("deeplab-largefov", 5 if damage == "another model" else 21).state_dict()},
               init)
    data = init.read_bytes()
    if damage == "truncated":
        init.write_bytes(data[: len(data) // 3])
    elif damage == "random bytes":
        init.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out = tmp_path / "run"
    args = ["run", str(DEFAULT), "--no-progress", "--set", f"model.init={init}"]
    for o in TINY + [f"output_dir={out}", "model.name=deeplab-largefov"]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab: error:") and "init.pth" in err and "\n" not in err
    assert not (out / "stages" / "train.json").exists()


def test_a_record_without_fingerprint_is_redone_not_reused(tmp_path):
    """A run folder of a version before fingerprints: its stages are redone once, and the log says why."""
    out = tmp_path / "run"
    _run(out)
    for rec_path in (out / "stages").glob("*.json"):
        rec = json.loads(rec_path.read_text())
        rec.pop("fingerprint")
        rec.pop("inputs")
        rec_path.write_text(json.dumps(rec))
    first = _mtimes(out)
    _run(out)
    second = _mtimes(out)
    assert second["train.json"] != first["train.json"] and second["test.json"] != first["test.json"]
    assert "has no fingerprint" in (out / "run.log").read_text()
    assert all("fingerprint" in json.loads(p.read_text()) for p in (out / "stages").glob("*.json"))
