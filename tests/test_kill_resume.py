"""``tools/kill_resume.py``: kill -9 of a run inside a stage leaves no process behind, and the rerun's
artifacts equal an uninterrupted run's bit for bit. The comparison itself is tested to see differences."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kill_resume", REPO / "tools" / "kill_resume.py")
kill_resume = importlib.util.module_from_spec(spec)
sys.modules["kill_resume"] = kill_resume
spec.loader.exec_module(kill_resume)


def _fake_run(folder: Path, weight: float, label: int, miou: float, seconds: float) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "scores").mkdir()
    (folder / "predictions" / "dcnn").mkdir(parents=True)
    torch.save({"model": {"w": torch.tensor([weight])}, "iteration": 2}, folder / "checkpoints" / "final.pth")
    np.savez(folder / "scores" / "a.npz", scores=np.zeros((2, 3), np.float16))
    from PIL import Image

    Image.fromarray(np.full((4, 4), label, np.uint8)).save(folder / "predictions" / "dcnn" / "a.png")
    (folder / "metrics.json").write_text(json.dumps({"dcnn": {"miou": miou}, "seconds": seconds}))
    (folder / "run.log").write_text(f"took {seconds}")
    return folder


def test_compare_sees_every_kind_of_difference_and_ignores_timings(tmp_path):
    ref = _fake_run(tmp_path / "ref", 1.0, 3, 0.5, 1.0)
    assert kill_resume.compare(ref, _fake_run(tmp_path / "same", 1.0, 3, 0.5, 9.0)) == (4, [])
    _, diffs = kill_resume.compare(ref, _fake_run(tmp_path / "w", 1.0 + 1e-7, 3, 0.5, 1.0))
    assert diffs == ["checkpoints/final.pth"]
    _, diffs = kill_resume.compare(ref, _fake_run(tmp_path / "p", 1.0, 4, 0.5, 1.0))
    assert diffs == ["predictions/dcnn/a.png"]
    _, diffs = kill_resume.compare(ref, _fake_run(tmp_path / "m", 1.0, 3, 0.51, 1.0))
    assert diffs == ["metrics.json"]
    (tmp_path / "w" / "scores" / "a.npz").unlink()
    assert "scores/a.npz" in kill_resume.compare(ref, tmp_path / "w")[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the run's processes in /proc")
def test_kill_9_inside_the_stages_with_workers_then_rerun_is_bit_identical(tmp_path, capsys):
    """The search and the CRF (process pools); train, test and evaluate are covered by running the tool
    with its defaults (README, Reliability)."""
    assert kill_resume.main(["--stages", "crf_search", "crf", "--kills", "1", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 kills, 0 failed" in out
