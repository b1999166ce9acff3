"""``backend: auto`` (issue #14), the in-process batched path of the crf stage and the search (issue #13
item 6; on CUDA where there is one, on CPU always), and CRFInputError (#12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crf import CRFParams
from crf.backend_choice import resolve_backend, torch_memory_mb
from crf.dense import dense_crf
from crf.errors import CRFInputError, DeepLabError
from crf.input_files import array_shape, write_crf_input, write_search_input
from crf.parallel import CRFTask, run_crf_many
from crf.search import SearchConfig, run_search
from deeplab_v1.data.degraded import degraded_probs

REPO = Path(__file__).resolve().parents[1]


def _synthetic(seed: int, h: int = 30, w: int = 40, labels: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.uint8)
    image = np.stack([50 + 100 * xx / w, 90 + 50 * yy / h, 110 + 0 * xx], -1)
    for _ in range(3):
        cls = int(rng.integers(1, labels))
        cy, cx, ry, rx = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 12), rng.integers(4, 16)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = rng.integers(0, 256, 3)
        label[inside] = cls
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    probs = degraded_probs(label, labels, stride=8, blur_sigma=2.0, temperature=2.0).astype(np.float32)
    return image, probs, label


# --- the choice --------------------------------------------------------------------------------------------


def test_auto_takes_torch_when_it_fits_and_pydensecrf_when_it_does_not():
    fits = resolve_backend("auto", "cpu", [(21, 366, 500)], memory_mb=4096)
    assert (fits.backend, fits.device) == ("torch", "cpu") and "fits" in fits.reason
    # the largest input decides; its estimate is over a small budget
    need = torch_memory_mb(500 * 500, 21)
    over = resolve_backend("auto", "cpu", [(21, 10, 10), (21, 500, 500)], memory_mb=need / 2)
    assert over.backend == "pydensecrf" and "500x500" in over.reason and "budget" in over.reason
    assert resolve_backend("auto", "cpu", [(21, 500, 500)], memory_mb=need * 1.01).backend == "torch"
    # an explicit backend is kept whatever the size
    assert resolve_backend("torch", "cpu", [(21, 5000, 5000)], memory_mb=1).backend == "torch"
    assert resolve_backend("pydensecrf", "cpu", [(21, 10, 10)]).backend == "pydensecrf"
    assert resolve_backend("auto", "cuda", [(21, 10, 10)], memory_mb=100).device == "cuda"
    assert torch_memory_mb(2000, 21, configs=2) > torch_memory_mb(2000, 21) > torch_memory_mb(1000, 21)
    with pytest.raises(CRFInputError, match="memory_mb must be None or a number > 0"):
        resolve_backend("auto", "cpu", [], memory_mb=0)
    with pytest.raises(CRFInputError, match="backend must be one of"):
        resolve_backend("densecrf", "cpu", [])


def test_the_defaults_are_auto():
    from deeplab_v1.config import CRFConfig

    assert SearchConfig().backend == "auto" and CRFConfig().backend == "auto"
    assert SearchConfig().strategy == "grid"


@pytest.mark.slow
def test_dense_crf_auto_gives_the_torch_labels_or_the_pydensecrf_labels(tmp_path):
    image, probs, _ = _synthetic(1)
    p = CRFParams(5, 20, 5)
    auto = dense_crf(image, probs, p, backend="auto")
    np.testing.assert_array_equal(auto, dense_crf(image, probs, p, backend="torch"))
    small = dense_crf(image, probs, p, backend="auto", memory_mb=torch_memory_mb(image.shape[0] * image.shape[1], 4) / 2)
    np.testing.assert_array_equal(small, dense_crf(image, probs, p, backend="pydensecrf"))
    assert (auto.argmax(0) == small.argmax(0)).mean() >= 0.99


def test_array_shape_reads_the_header_only(tmp_path):
    image, probs, label = _synthetic(2)
    write_search_input(tmp_path / "a.npz", image, probs.astype(np.float16), label)
    assert array_shape(tmp_path / "a.npz", "probs") == probs.shape
    with pytest.raises(ValueError, match="lacks key 'band'"):
        array_shape(tmp_path / "a.npz", "band")


# --- the search records the choice --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("choice_samples")
    files = []
    for i in range(3):
        image, probs, label = _synthetic(10 + i)
        f = folder / f"s{i}.npz"
        write_search_input(f, image, probs.astype(np.float16), label)
        files.append(f)
    return files


GRID = dict(w1=[3.0, 10.0], sigma_alpha=[10.0, 30.0], sigma_beta=[3.0, 10.0], rounds=0)


@pytest.mark.slow
def test_search_records_the_backend_auto_chose(search_files, tmp_path):
    res = run_search(search_files, tmp_path / "auto", SearchConfig(workers=1, **GRID), progress=False)
    best = json.loads((tmp_path / "auto" / "best.json").read_text())
    assert res.backend == best["backend"] == "torch" and best["backend_requested"] == "auto"
    assert "fits" in best["backend_reason"] and best["layout"].startswith("in-process on cpu")
    lines = [json.loads(x) for x in (tmp_path / "auto" / "results.jsonl").read_text().splitlines()]
    assert {x["backend"] for x in lines} == {"torch"} and {x["images"] for x in lines} == {3}
    # a budget the images do not fit: pydensecrf, recorded as such (and its lines are another search's)
    tiny = torch_memory_mb(30 * 40, 4, configs=2) / 2
    res2 = run_search(search_files, tmp_path / "tiny", SearchConfig(workers=2, memory_mb=tiny, **GRID), progress=False)
    best2 = json.loads((tmp_path / "tiny" / "best.json").read_text())
    assert res2.backend == best2["backend"] == "pydensecrf" and "budget" in best2["backend_reason"]
    assert best2["layout"] == "2 processes x 1 thread"


@pytest.mark.slow
def test_search_in_process_batched_torch_equals_torch_in_workers(search_files, tmp_path):
    a = run_search(search_files, tmp_path / "inproc", SearchConfig(workers=1, backend="torch", **GRID), progress=False)
    b = run_search(search_files, tmp_path / "pool", SearchConfig(workers=2, backend="torch", **GRID), progress=False)
    conf = lambda out: {json.dumps(json.loads(x)["params"], sort_keys=True): json.loads(x)["confusion"]  # noqa: E731
                        for x in (out / "results.jsonl").read_text().splitlines()}
    assert conf(tmp_path / "inproc") == conf(tmp_path / "pool")
    assert a.best == b.best


# --- the crf stage's runner: in-process batches vs workers --------------------------------------------------


def _crf_tasks(folder: Path, n: int = 4) -> list[CRFTask]:
    """``n`` CRF input files of different sizes in ``folder`` and their tasks (``out/<i>.npy``)."""
    (folder / "out").mkdir(parents=True)
    tasks = []
    for i in range(n):
        image, probs, _ = _synthetic(20 + i, h=24 + 4 * i, w=36)
        write_crf_input(folder / f"in{i}.npz", image, probs)
        tasks.append(CRFTask(folder / f"in{i}.npz", folder / "out" / f"{i}.npy"))
    return tasks


@pytest.mark.slow
def test_run_crf_many_in_process_equals_one_image_per_worker(tmp_path):
    p = CRFParams(5, 20, 5)
    batched = _crf_tasks(tmp_path / "a")
    s1 = run_crf_many(batched, p, workers=1, backend="torch", progress=False)
    assert s1.backends == {"torch": 4} and s1.layout == "in-process on cpu"
    single = _crf_tasks(tmp_path / "b")
    s2 = run_crf_many(single, p, workers=2, backend="auto", progress=False)
    assert s2.backends == {"torch": 4} and s2.layout == "2 processes x 1 thread"
    for a, b in zip(batched, single):
        np.testing.assert_array_equal(np.load(a.out), np.load(b.out))
    # auto with a budget no image fits: pydensecrf, counted; the labels are pydensecrf's
    reference = _crf_tasks(tmp_path / "c")
    s3 = run_crf_many(reference, p, workers=1, backend="auto", memory_mb=0.01, progress=False)
    assert s3.backends == {"pydensecrf": 4} and "pydensecrf 4" in s3.line()
    for a, c in zip(batched, reference):
        image, probs = np.load(a.inputs)["image"], np.load(a.inputs)["probs"]
        np.testing.assert_array_equal(np.load(c.out), dense_crf(image, probs, p, backend="pydensecrf").argmax(0))
        assert (np.load(a.out) == np.load(c.out)).mean() >= 0.99


# --- CRFInputError ------------------------------------------------------------------------------------------


def test_crf_argument_errors_are_deeplab_errors_and_value_errors():
    cases = [lambda: CRFParams(-1, 50, 3), lambda: SearchConfig(strategy="x"), lambda: SearchConfig(backend="x"),
             lambda: dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 5), 0.5), CRFParams(5, 50, 3)),
             lambda: run_crf_many([], CRFParams(5, 50, 3), backend="pydensecrf", device="cuda")]
    for case in cases:
        with pytest.raises(CRFInputError) as info:
            case()
        assert isinstance(info.value, DeepLabError) and isinstance(info.value, ValueError)


def test_deeplab_reports_a_crf_input_error_on_one_line_with_status_2(tmp_path, capsys):
    from deeplab_v1.cli import main

    rc = main(["crf", str(REPO / "experiments" / "crf-demo.yaml"), "--backend", "pydensecrf", "--device", "cuda",
               "--set", f"output_dir={tmp_path}", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("deeplab: error: device 'cuda' is not available for backend 'pydensecrf'")


# --- CUDA (issue #13 item 6) --------------------------------------------------------------------------------


def _cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU path of the crf stage and the search is run on CPU by the tests above")


@pytest.mark.cuda
def test_crf_on_cuda_runs_in_process_and_equals_cpu(tmp_path):
    _cuda()
    p = CRFParams(5, 20, 5)
    (tmp_path / "g").mkdir()
    (tmp_path / "c").mkdir()
    gpu, cpu = _crf_tasks(tmp_path / "g"), _crf_tasks(tmp_path / "c")
    s = run_crf_many(gpu, p, workers=4, backend="auto", device="cuda", progress=False)
    assert s.layout == "in-process batches on cuda" and s.backends == {"torch": 4}
    run_crf_many(cpu, p, workers=1, backend="torch", progress=False)
    agree = np.mean([(np.load(a.out) == np.load(b.out)).mean() for a, b in zip(gpu, cpu)])
    assert agree >= 0.999


@pytest.mark.cuda
def test_search_on_cuda_runs_in_process_and_equals_cpu(search_files, tmp_path):
    _cuda()
    g = run_search(search_files, tmp_path / "g", SearchConfig(device="cuda", workers=4, **GRID), progress=False)
    c = run_search(search_files, tmp_path / "c", SearchConfig(workers=1, backend="torch", **GRID), progress=False)
    assert json.loads((tmp_path / "g" / "best.json").read_text())["layout"].startswith("in-process on cuda")
    for rg, rc in zip(g.rows, c.rows):
        assert rg["miou"] == pytest.approx(rc["miou"], abs=1e-3)


# --- the default layout: one process per core, idle or loaded (issue #21 item 9) ---------------------------


@pytest.mark.parametrize("load", [0.0, 0.2, 5.99, 6.0, 20.0])
def test_default_workers_is_one_process_per_core_at_any_load(monkeypatch, load):
    from crf import pool

    monkeypatch.setattr(pool, "available_cores", lambda: 4)
    monkeypatch.setattr(pool.os, "getloadavg", lambda: (load, 0.0, 0.0))
    got, reason = pool.default_workers("torch", "cpu")
    assert got == 4 and f"load average {load:.2f} on 4 cores" in reason
    assert "one single-threaded process per core" in reason
    assert pool.default_workers("auto", "cpu")[0] == 4
    assert pool.default_workers("pydensecrf", "cpu")[0] == 4  # single-threaded C++: a process per core
    assert pool.default_workers("torch", "cuda")[0] == 1
    assert pool.default_workers("torch", "cpu", processes_per_machine=4)[0] == 1  # one core per local rank
    assert pool.default_workers("torch", "cpu", processes_per_machine=2)[0] == 2


@pytest.mark.slow
def test_search_records_the_default_layout_and_why(search_files, tmp_path, monkeypatch):
    from crf import pool

    cores = pool.available_cores()
    monkeypatch.setattr(pool.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    run_search(search_files, tmp_path / "idle", SearchConfig(backend="torch", **GRID), progress=False)
    idle = json.loads((tmp_path / "idle" / "best.json").read_text())
    monkeypatch.setattr(pool.os, "getloadavg", lambda: (10.0 * cores, 0.0, 0.0))
    run_search(search_files, tmp_path / "busy", SearchConfig(backend="torch", **GRID), progress=False)
    busy = json.loads((tmp_path / "busy" / "best.json").read_text())
    if cores > 1:  # idle or busy: one process per core, and the record says why
        for record, load in ((idle, 0.0), (busy, 10.0 * cores)):
            assert record["layout"] == f"{cores} processes x 1 thread"
            assert f"load average {load:.2f}" in record["layout_reason"]
            assert "one single-threaded process per core" in record["layout_reason"]
    conf = lambda out: sorted(x for x in (out / "results.jsonl").read_text().splitlines())  # noqa: E731
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k in ("params", "confusion")} for x in lines]  # noqa: E731
    assert strip(conf(tmp_path / "idle")) == strip(conf(tmp_path / "busy"))
