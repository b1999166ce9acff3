"""Successive halving in crf.search (issue #14): the schedule, the budget, resume after a kill, 1 vs 2
workers, and halving vs the grid on real VOC images."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from crf.confusion import miou
from crf.input_files import write_search_input
from crf.search import SearchConfig, run_search
from crf.search.evaluate import image_order
from deeplab_v1.data.degraded import degraded_probs
from search_helpers import Bowl
from voc_search_files import voc_search_files


def test_schedule_grows_by_eta_and_ends_on_every_image():
    assert SearchConfig(strategy="halving").halving_schedule(100) == [12, 36, 100]
    assert SearchConfig(strategy="halving", eta=2, min_images=10).halving_schedule(100) == [10, 20, 40, 80, 100]
    assert SearchConfig(strategy="halving", min_images=200).halving_schedule(100) == [100]
    assert SearchConfig().halving_schedule(100) == [100]  # the grid: one rung
    assert SearchConfig(strategy="halving", halving_floor=1).halving_schedule(12) == [2, 6, 12]  # no floor
    for bad, match in (({"strategy": "random"}, "strategy must be one of"), ({"eta": 1}, "eta must be an integer >= 2"),
                       ({"min_images": 0}, "min_images must be None or an integer >= 1"),
                       ({"memory_mb": -5}, "memory_mb must be None or a number > 0"),
                       ({"halving_floor": 0}, "halving_floor must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            SearchConfig(**bad)


def test_image_order_depends_on_the_ids_and_the_seed_not_on_the_list_order(tmp_path):
    files = [str(tmp_path / f"{n}.npz") for n in "edcba"]
    order = [Path(files[i]).stem for i in image_order(files, 0)]
    rev = list(reversed(files))
    assert [Path(rev[i]).stem for i in image_order(rev, 0)] == order
    assert sorted(order) == list("abcde")
    assert any([Path(files[i]).stem for i in image_order(files, s)] != order for s in range(1, 6))


def test_halving_on_a_known_objective_counts_its_runs_and_keeps_the_grid_best(tmp_path):
    files = [tmp_path / f"{i:03d}.npz" for i in range(27)]  # a callable objective: only the names count
    grid = run_search(files, tmp_path / "grid", SearchConfig(objective=Bowl((7.4, 74.0, 6.4)), rounds=1),
                      progress=False)
    bowl = Bowl((7.4, 74.0, 6.4))
    half = run_search(files, tmp_path / "half", SearchConfig(objective=bowl, rounds=1, strategy="halving",
                                                             halving_floor=1), progress=False)
    assert half.best == grid.best
    # coarse: 96 x 3 images (48 sigma pairs), the best 16 pairs (32 configurations) on 6 more, the best 6
    # pairs on 18 more; refinement around (5, 70, 6): 26 in 9 pairs x 3, the best 3 pairs (9) x 6, 1 pair x 18
    assert half.crf_runs == half.crf_runs_total == 96 * 3 + 32 * 6 + 12 * 18 + 26 * 3 + 9 * 6 + 3 * 18
    assert grid.crf_runs_total == (96 + 26) * 27
    assert half.crf_runs_total <= 0.4 * grid.crf_runs_total
    best = json.loads((tmp_path / "half" / "best.json").read_text())
    assert best["strategy"] == "halving" and best["crf_runs"] == half.crf_runs_total
    assert best["crf_runs_grid"] == (96 + 26) * 27 and best["rungs"] == [3, 9, 27] and best["halving_floor"] == 1
    assert best["halving_note"] == "first rung 3 images (ceil(27 / eta**2)), not below halving_floor 1"
    assert best["images_scored"] == {"27": 12 + 3, "9": 32 - 12 + 9 - 3, "3": 96 - 32 + 26 - 9}
    # the finalists (scored on every image) rank first; every line says on how many images it was scored
    assert [r["images"] for r in half.rows[:15]] == [27] * 15 and half.rows[15]["images"] == 9
    # whole lattice groups go on: every w1 of a surviving (sigma_alpha, sigma_beta)
    finalists = {(r["sigma_alpha"], r["sigma_beta"]) for r in half.rows if r["images"] == 27 and r["round"] == 0}
    assert len(finalists) == 6 and sum(r["images"] == 27 and r["round"] == 0 for r in half.rows) == 12
    lines = [json.loads(x) for x in (tmp_path / "half" / "results.jsonl").read_text().splitlines()]
    assert {x["images"] for x in lines} == {3, 9, 27} and all(x["crf_runs"] == x["images"] for x in lines)
    assert json.loads((tmp_path / "grid" / "best.json").read_text())["strategy"] == "grid"


# --- real CRFs on small synthetic images (pydensecrf, fast) ------------------------------------------------


def _synthetic(seed: int, h: int = 36, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.uint8)
    image = np.stack([40 + 100 * xx / w, 80 + 60 * yy / h, 120 + 0 * xx], -1)
    for _ in range(3):
        cls = int(rng.integers(1, 5))
        cy, cx, ry, rx = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 15), rng.integers(5, 20)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = rng.integers(0, 256, 3)
        label[inside] = cls
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return image, label


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("halving_samples")
    files = []
    for i in range(9):
        image, label = _synthetic(i)
        probs = degraded_probs(label, 5, stride=8, blur_sigma=3.0, temperature=2.0).astype(np.float16)
        f = folder / f"img{i}.npz"
        write_search_input(f, image, probs, label)
        files.append(f)
    return files


# halving_floor 1: the mechanics on 9 images (below the default floor halving would be the grid)
SMALL = dict(w1=[3.0, 10.0], sigma_alpha=[10.0, 30.0], sigma_beta=[3.0, 8.0, 13.0], rounds=0,
             strategy="halving", backend="pydensecrf", min_images=1, halving_floor=1)


def _lines(out: Path) -> dict:
    """Configuration -> (images, confusion) of the line scored on the most images."""
    best: dict = {}
    for x in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(x)
        k = json.dumps(rec["params"], sort_keys=True)
        if k not in best or rec["images"] >= best[k][0]:
            best[k] = (rec["images"], rec["confusion"])
    return best


def _best(out: Path) -> dict:
    best = json.loads((out / "best.json").read_text())
    best.pop("layout")
    best.pop("layout_reason")
    return best


@pytest.fixture(scope="module")
def halving_reference(small_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("halving_ref")
    return run_search(small_files, out, SearchConfig(workers=1, **SMALL), progress=False), out


def test_halving_equals_itself_across_one_and_two_workers(small_files, halving_reference, tmp_path):
    ref, out1 = halving_reference
    res = run_search(small_files, tmp_path / "two", SearchConfig(workers=2, **SMALL), progress=False)
    assert _lines(out1) == _lines(tmp_path / "two") and _best(out1) == _best(tmp_path / "two")
    assert [{**r, "seconds": 0} for r in res.rows] == [{**r, "seconds": 0} for r in ref.rows]
    # schedule [1, 3, 9]: 12 configurations (6 sigma pairs) -> 2 pairs (4) -> 1 pair (2)
    assert res.crf_runs == ref.crf_runs == 12 * 1 + 4 * 2 + 2 * 6
    assert (tmp_path / "two" / "ranked.md").read_text() == (out1 / "ranked.md").read_text()


def test_halving_resumes_after_a_kill_without_redoing_work(small_files, halving_reference, tmp_path):
    ref, out1 = halving_reference
    out = tmp_path / "s"
    out.mkdir()
    lines = (out1 / "results.jsonl").read_bytes().split(b"\n")[:-1]
    assert len(lines) == 12 + 4 + 2
    # killed while writing the 15th line (after all of rung 0 and two lines of rung 1)
    kept = lines[:14]
    (out / "results.jsonl").write_bytes(b"\n".join(kept) + b"\n" + lines[14][:40])
    done: dict = {}
    for x in kept:
        rec = json.loads(x)
        k = json.dumps(rec["params"], sort_keys=True)
        done[k] = max(done.get(k, 0), rec["images"])
    final = {k: v[0] for k, v in _lines(out1).items()}
    missing = sum(final[k] - done.get(k, 0) for k in final)
    with pytest.warns(UserWarning, match="torn last line"):
        res = run_search(small_files, out, SearchConfig(workers=1, **SMALL), progress=False)
    assert res.crf_runs == missing < ref.crf_runs  # only what the kill lost is run again
    assert _lines(out) == _lines(out1) and _best(out) == _best(out1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = run_search(small_files, out, SearchConfig(workers=1, **SMALL), progress=False)
    assert again.crf_runs == 0 and again.best == ref.best


def test_the_grid_completes_a_halving_search_from_its_records(small_files, halving_reference, tmp_path):
    ref, out1 = halving_reference
    out = tmp_path / "g"
    out.mkdir()
    (out / "results.jsonl").write_bytes((out1 / "results.jsonl").read_bytes())
    grid = {**SMALL, "strategy": "grid"}
    res = run_search(small_files, out, SearchConfig(workers=1, **grid), progress=False)
    fresh = run_search(small_files, tmp_path / "fresh", SearchConfig(workers=1, **grid), progress=False)
    assert res.crf_runs == 12 * 9 - ref.crf_runs  # the halving's images are not run again
    assert _lines(out) == _lines(tmp_path / "fresh") and res.best == fresh.best


# --- halving vs grid on real VOC images -----------------------------------------------------------------


@pytest.fixture(scope="module")
def voc_files(shared_voc, tmp_path_factory):
    """Search input files of nine VOC val images at a quarter of their size, DIAGNOSTIC degraded-GT
    probabilities (float16)."""
    return voc_search_files(shared_voc, slice(10, 19), tmp_path_factory.mktemp("halving_voc"), 0.25, math.floor)


@pytest.mark.slow
def test_halving_finds_the_grids_best_on_voc_with_at_most_40_percent_of_the_runs(voc_files, tmp_path):
    # the backend does not matter here (tests/test_crf_torch.py compares them): pydensecrf on both cores is
    # the fastest on these small images
    space = dict(w1=[5.0, 10.0], sigma_alpha=[10.0, 20.0, 30.0], sigma_beta=[3.0, 6.0, 10.0], rounds=0,
                 workers=2, backend="pydensecrf")
    grid = run_search(voc_files, tmp_path / "grid", SearchConfig(**space), progress=False)
    scores = {(r["w1"], r["sigma_alpha"], r["sigma_beta"]): r["miou"] for r in grid.rows}
    assert max(scores.values()) - min(scores.values()) > 0.005  # the grid has something to find
    half = run_search(voc_files, tmp_path / "half", SearchConfig(strategy="halving", halving_floor=1, **space),
                      progress=False)
    # schedule [1, 3, 9]: 18 x 1 (9 sigma pairs), 3 pairs (6) x 2, 1 pair (2) x 6 = 42 of 162 runs
    assert half.crf_runs_total == 42 <= 0.4 * grid.crf_runs_total
    picked = scores[(half.best.w1, half.best.sigma_alpha, half.best.sigma_beta)]
    assert 100 * (grid.rows[0]["miou"] - picked) <= 0.1, (grid.rows[0], half.best)
    # the finalists' scores are the grid's own (the same summed confusion matrices over all images)
    grid_lines = _lines(tmp_path / "grid")
    for k, (images, conf) in _lines(tmp_path / "half").items():
        if images == len(voc_files):
            assert conf == grid_lines[k][1]
            assert miou(np.array(conf)) == pytest.approx(scores[tuple(json.loads(k)[a] for a in
                                                                       ("w1", "sigma_alpha", "sigma_beta"))])
    assert math.isclose(half.best_objective, picked)


@pytest.mark.slow
def test_halving_killed_by_sigkill_resumes_where_it_stopped(tmp_path):
    """A real kill (SIGKILL of the search process between two rungs); the rerun makes only the CRF runs
    whose lines were not written, and ends with the uninterrupted search's table."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    files = []
    for i in range(9):
        image, label = _synthetic(30 + i, h=150, w=200)
        probs = degraded_probs(label, 5, stride=8, blur_sigma=3.0, temperature=2.0).astype(np.float16)
        f = tmp_path / f"k{i}.npz"
        write_search_input(f, image, probs, label)
        files.append(f)
    space = {**SMALL, "workers": 1}
    ref = run_search(files, tmp_path / "ref", SearchConfig(**space), progress=False)
    out = tmp_path / "killed"
    script = (f"from pathlib import Path\nfrom crf.search import SearchConfig, run_search\n"
              f"run_search([Path(p) for p in {[str(f) for f in files]!r}], {str(out)!r}, "
              f"SearchConfig(**{space!r}), progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, env=env)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and len(results.read_bytes().split(b"\n")) > 12:  # rung 0 (12 lines) is written
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    written = results.read_bytes()
    complete = [json.loads(x) for x in written.split(b"\n")[:-1]]
    assert 12 <= len(complete) < 18
    done: dict = {}
    for rec in complete:
        k = json.dumps(rec["params"], sort_keys=True)
        done[k] = max(done.get(k, 0), rec["images"])
    final = {k: v[0] for k, v in _lines(tmp_path / "ref").items()}
    if written.endswith(b"\n"):
        res = run_search(files, out, SearchConfig(**space), progress=False)
    else:
        with pytest.warns(UserWarning, match="torn last line"):
            res = run_search(files, out, SearchConfig(**space), progress=False)
    assert res.crf_runs == sum(final[k] - done.get(k, 0) for k in final) < ref.crf_runs
    assert _lines(out) == _lines(tmp_path / "ref") and _best(out) == _best(tmp_path / "ref")
