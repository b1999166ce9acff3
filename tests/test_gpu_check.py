"""``tools/gpu_check.py`` runs without a GPU and writes its record and table (the CUDA parts skipped with
the reason), and ``tools/bench_pipeline.py --quick`` prints the CRF (torch) and search rows by default
(issue #20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run (on a GPU the whole check runs)")
def test_gpu_check_runs_the_cpu_parts_here_and_writes_both_files(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(out), "--images", "1",
                           "--max-side", "48", "--quick"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((out / "gpu_check.json").read_text())
    status = {p["part"]: p["status"] for p in record["parts"]}
    assert status == {"environment": "ok", "pytest -m cuda": "skipped", "CRF agreement (torch vs pydensecrf)": "ok",
                      "CRF ms/image (torch, batched)": "ok", "search pairs/s": "ok",
                      "network rows (bench_pipeline, CUDA)": "skipped"}
    assert all("no CUDA device here" in why for why in record["skipped"].values())
    parts = {p["part"]: p for p in record["parts"]}
    assert parts["CRF agreement (torch vs pydensecrf)"]["result"]["min_identical"] >= 0.99
    assert parts["CRF ms/image (torch, batched)"]["result"]["ms_per_image"] > 0
    assert parts["search pairs/s"]["result"]["pairs"] == 2 and parts["search pairs/s"]["result"]["pairs_per_s"] > 0
    table = (out / "gpu_check.md").read_text()
    assert table.count("| skipped |") == 2 and "| part | device | status | s | result |" in table
    assert "ms/image" in table and "pairs/s" in table


def test_gpu_check_records_a_failing_part_and_exits_1(tmp_path, monkeypatch):
    import gpu_check

    def broken(device, inputs):
        raise AssertionError("torch on cpu agrees with pydensecrf on only 50.00% of an image's pixels")

    monkeypatch.setattr(gpu_check, "crf_agreement", broken)
    monkeypatch.setattr(gpu_check, "crf_speed", lambda *a: {"ms_per_image": 1.0, "batch": 1, "images": 1,
                                                            "size": "8x8", "labels": 21, "iterations": 10})
    monkeypatch.setattr(gpu_check, "search_speed", lambda *a: {"pairs_per_s": 1.0, "pairs": 2, "size": "8x8",
                                                               "layout": "x"})
    monkeypatch.setattr(gpu_check, "load_inputs", lambda *a: ([], "none"))
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path), "--images", "1"]) == 1
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["failed"] == ["CRF agreement (torch vs pydensecrf)"]
    assert "| failed |" in (tmp_path / "gpu_check.md").read_text()


def test_bench_pipeline_quick_prints_the_crf_and_search_rows_by_default(monkeypatch, capsys):
    import bench_pipeline

    calls = []
    monkeypatch.setattr(bench_pipeline, "network_rows", lambda *a: [])
    monkeypatch.setattr(bench_pipeline, "bench_crf", lambda images, backend="torch", device="cpu", batch=1, size=None:
                        calls.append(("crf", backend, device)) or 123.0)
    monkeypatch.setattr(bench_pipeline, "bench_search", lambda device, configs, images, size=None:
                        calls.append(("search", device)) or (4.5, configs * images))
    monkeypatch.setattr(bench_pipeline, "forward_flops", lambda size: 1e9)
    assert bench_pipeline.main(["--quick", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert calls == [("crf", "torch", "cpu"), ("search", "cpu")]
    assert "| cpu | crf 500x375 | fp32 | 1 | 123 ms/image | - | torch, 10 iterations |" in text
    assert "| cpu | search | fp32 | - | 4.50 pairs/s |" in text
    calls.clear()
    bench_pipeline.main(["--quick", "--device", "cpu", "--no-crf"])
    assert calls == [] and "crf 500x375" not in capsys.readouterr().out
