"""The crf and crf_search stages record what ran (issue #20 item 6, issue #21 item 5): the crf stage resolves
``backend: auto`` once from the configuration and the images' sizes -- not from the machine's memory -- runs
every image in it, records it with its device, and a resumed stage never mixes backends; the search's result
(best parameters, objective, CRF runs) is in run.log and on the console with ``--no-progress``."""

from __future__ import annotations

import json
import os

import pytest

from deeplab_v1.cli import main

SEARCH = ["data.max_test_images=2", "crf_search.num_images=2", "crf_search.w1=[3]", "crf_search.sigma_alpha=[30]",
          "crf_search.sigma_beta=[3, 5]", "crf_search.workers=1", "crf.workers=1"]


@pytest.fixture
def small_memory(monkeypatch):
    """This process sees 512 MiB of physical memory: a budget from the memory (256 MiB) would take pydensecrf
    for the sample's images (about 470 MiB in torch)."""
    real = os.sysconf
    page = real("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: (512 << 20) // page if name == "SC_PHYS_PAGES" else real(name))


def _args(out, *extra):
    return [x for o in SEARCH + [f"output_dir={out}", *extra] for x in ("--set", o)]


@pytest.mark.slow
def test_crf_stage_backend_and_the_search_result_are_recorded(tmp_path, small_memory, capsys):
    out = tmp_path / "run"
    assert main(["run", "crf-demo", "--no-progress", *_args(out, "stages=[test, crf_search, crf]")]) == 0
    console = capsys.readouterr()
    # the search's result: run.log and the console, with --no-progress
    log = (out / "run.log").read_text()
    best = json.loads((out / "crf_search" / "best.json").read_text())
    line = [x for x in log.splitlines() if "crf search (" in x]
    assert len(line) == 1 and f"best w1={best['w1']:g} sigma_alpha={best['sigma_alpha']:g}" in line[0]
    assert f"{100 * best['objective']:.2f}%" in line[0] and f"{best['crf_runs']} CRF runs" in line[0]
    assert "best w1=" in console.out + console.err
    search = json.loads((out / "stages" / "crf_search.json").read_text())
    assert search["backend"] == best["backend"] == "torch" and search["device"] == best["device"] == "cpu"
    assert search["inputs_digest"] == best["inputs_digest"] and len(best["inputs_digest"]) == 16
    # the crf stage: auto resolved once from the config (a fixed default budget), not from the 512 MiB seen
    rec = json.loads((out / "stages" / "crf.json").read_text())
    assert rec["backend"] == "torch" and rec["device"] == "cpu" and rec["backend_requested"] == "auto"
    assert rec["backends"] == {"torch": 2} and "fixed default budget" in rec["backend_reason"]
    assert json.loads((out / "predictions" / "crf" / ".backend.json").read_text()) == {"backend": "torch",
                                                                                      "device": "cpu"}
    # a stage resumed over images another backend made redoes them rather than mixing the two
    pngs = sorted((out / "predictions" / "crf").glob("*.png"))
    (out / "predictions" / "crf" / ".backend.json").write_text('{"backend": "pydensecrf", "device": "cpu"}')
    for p in pngs:
        os.utime(p, ns=(0, 0))
    (out / "stages" / "crf.json").unlink()
    assert main(["crf", "crf-demo", "--no-progress", *_args(out, "stages=[test, crf_search, crf]")]) == 0
    assert "2 images made by backend pydensecrf on cpu, not torch on cpu: redoing them" in (out / "run.log").read_text()
    assert all(p.stat().st_mtime_ns > 0 for p in pngs)
    assert json.loads((out / "stages" / "crf.json").read_text())["backends"] == {"torch": 2}
