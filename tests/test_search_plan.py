"""One plan for every rank (issue #20 items 1, 6, 8, 9; issue #21 item 5): the search's backend, layout, budget,
batches and the assignment of every (configuration, image) pair come from rank 0 and the inputs, never from
what each rank's machine looks like; its results are keyed by the inputs' contents; the crf stage runs one
backend, resolved once; the search's result reaches run.log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from crf import CRFParams
from crf.input_files import write_search_input
from crf.search import SearchConfig, run_search
from crf.search.dist import Distributed
from crf.search.plan import SearchPlan, batches_of, share, tasks_of
from test_crf_search import TINY, voc_samples  # noqa: F401  (the fixture: 3 VOC images, degraded scores)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _confusions(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {json.dumps(r["params"], sort_keys=True): (r["confusion"], r["backend"]) for r in recs}


# --- the tasks of one plan: every pair once, whatever the split -------------------------------------------


@pytest.mark.parametrize("workers, world", [(1, 1), (1, 2), (4, 2), (3, 3), (16, 5)])
def test_the_ranks_shares_of_one_plan_hold_every_pair_exactly_once(workers, world):
    configs = [CRFParams(w, a, b) for w in (3.0, 5.0) for a in (30.0, 50.0, 70.0) for b in (3.0, 5.0)]
    groups = {}
    for p in configs:
        groups.setdefault((p.sigma_alpha, p.sigma_beta), []).append(p)
    # two groups lack images from position 0, the others from 2 (survivors of a halving rung)
    items = [(tuple(ps), 0 if i < 2 else 2) for i, ps in enumerate(groups.values())]
    target = 7
    plan = SearchPlan("torch", "cpu", "", workers, "", 1024.0, world, "x")
    files, order = [f"{i}.npz" for i in range(target)], list(range(target))
    pairs = []
    for batch in batches_of(items, target, plan.want):
        flat = [p for g in batch for p in g[0]]
        tasks = tasks_of(batch, target, plan, files, order)
        for rank in range(world):
            for indices, images in share(tasks, Distributed(rank, world)):
                pairs += [(flat[i], j) for i in indices for j in images]
    want = [(p, j) for ps, start in items for p in ps for j in range(start, target)]
    assert sorted(pairs, key=str) == sorted(want, key=str)


# --- two torchrun ranks that see other machines: the one-process results, bit for bit -------------------


@pytest.mark.slow
def test_two_ranks_seeing_other_cores_load_and_memory_give_one_process_results(voc_samples, tmp_path):  # noqa: F811
    """Rank 0 sees 1 core, an idle machine and 128 MiB; rank 1 4 cores, load 50 and 64 GiB (patched in each
    rank, ``search_rank_view.py``): their own layouts, budgets and, from the memory, backends would differ.
    DEFAULT settings (no ``workers`` pin): the matrices, table and best.json of one process."""
    one = tmp_path / "one"
    run_search(voc_samples, one, SearchConfig(**TINY), progress=False)
    two = tmp_path / "two"
    (tmp_path / "list.txt").write_text("\n".join(str(f) for f in voc_samples) + "\n")
    import yaml

    (tmp_path / "search.yaml").write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "search_rank_view.py"),
           "--samples", str(tmp_path / "list.txt"), "--out", str(two), "--config", str(tmp_path / "search.yaml"),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c1, c2 = _confusions(one), _confusions(two)
    assert len(c1) == 8 and c1 == c2
    assert (one / "ranked.md").read_text() == (two / "ranked.md").read_text()
    how = ("layout", "layout_reason")
    b1, b2 = (json.loads((out / "best.json").read_text()) for out in (one, two))
    assert {k: v for k, v in b2.items() if k not in how} == {k: v for k, v in b1.items() if k not in how}
    assert b2["backend"] == "torch" and "rank 0" in b2["layout_reason"]
    assert "best w1=" in proc.stdout  # rank 0 prints the result with --no-progress


def _mismatched_rank(rank: int, port: int, files0: list[str], files1: list[str], out: str) -> None:
    import torch.distributed as dist

    files = files1 if rank else files0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        run_search(files, out, SearchConfig(w1=[5.0], sigma_alpha=[30.0], sigma_beta=[3.0], rounds=0,
                                            backend="pydensecrf", workers=1), progress=False,
                   dist=Distributed(rank, 2, None, 2))
        Path(out, f"rank{rank}.txt").write_text("finished")
    except ValueError as exc:
        Path(out, f"rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def _synthetic_file(path: Path, seed: int) -> Path:
    """A 24 x 32 search input file of two classes (a bright box on a dark ground, noisy probabilities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 32), np.uint8)
    label[6:18, 8:24] = 1
    image = np.where(label[..., None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 30, (24, 32, 3), np.uint8)
    probs = np.full((2, 24, 32), 0.3, np.float32)
    probs[1] = np.where(rng.random((24, 32)) < 0.6, 0.7, 0.3) * (label == 1) + 0.2 * (label == 0)
    probs[0] = 1 - probs[1]
    write_search_input(path, image, probs.astype(np.float16), label)
    return path


@pytest.mark.slow
def test_ranks_whose_files_differ_in_content_stop_with_one_error(tmp_path):
    """The same ids, other contents on rank 1: every rank stops with the error, nothing is summed."""
    import torch.multiprocessing as mp

    a = [_synthetic_file(tmp_path / "r0" / f"{i}.npz", i) for i in range(2)]
    b = [_synthetic_file(tmp_path / "r1" / "0.npz", 0), _synthetic_file(tmp_path / "r1" / "1.npz", 7)]
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_mismatched_rank, args=(_free_port(), [str(f) for f in a], [str(f) for f in b], str(out)), nprocs=2,
             join=True)
    for rank in (0, 1):
        text = (out / f"rank{rank}.txt").read_text()
        assert text.startswith("CRFInputError: 1 rank(s) have other search input files"), text
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()


# --- results keyed by the inputs' contents -------------------------------------------------------------------


def test_a_rewritten_search_input_file_is_never_mixed_with_old_results(tmp_path):
    files = [_synthetic_file(tmp_path / "in" / f"{i}.npz", i) for i in range(3)]
    cfg = dict(w1=[3.0, 10.0], sigma_alpha=[10.0], sigma_beta=[3.0, 13.0], rounds=0, backend="pydensecrf", workers=1)
    out = tmp_path / "s"
    first = run_search(files, out, SearchConfig(**cfg), progress=False)
    _synthetic_file(files[1], 99)  # the same id, other scores
    with pytest.warns(UserWarning, match=r"4 line\(s\) of another search ignored, never mixed in"):
        again = run_search(files, out, SearchConfig(**cfg), progress=False)
    assert again.computed == 4 and first.computed == 4
    fresh = run_search(files, tmp_path / "fresh", SearchConfig(**cfg), progress=False)
    assert [r["miou"] for r in again.rows] == [r["miou"] for r in fresh.rows]
    best = json.loads((out / "best.json").read_text())
    assert best["inputs_digest"] == json.loads((tmp_path / "fresh" / "best.json").read_text())["inputs_digest"]
    assert best["backend"] == "pydensecrf" and best["device"] == "cpu"
    with warnings.catch_warnings():  # unchanged files: every line reused, nothing recomputed
        warnings.simplefilter("ignore")
        assert run_search(files, tmp_path / "fresh", SearchConfig(**cfg), progress=False).computed == 0


# --- the ranks come from the entry point, on one gloo group ------------------------------------------------


def test_crf_leaves_process_groups_and_torchruns_environment_to_the_entry_points():
    """Only the command line (an entry point) starts a process group or reads torchrun's environment."""
    entry = REPO / "crf" / "search" / "cli.py"
    for f in sorted((REPO / "crf").rglob("*.py")):
        if f == entry:
            continue
        text = f.read_text()
        for name in ("LOCAL_WORLD_SIZE", "init_process_group", "new_group", "WORLD_SIZE"):
            assert name not in text, f"{f.relative_to(REPO)} uses {name}"


def _group_rank(rank: int, port: int, out: str) -> None:
    from types import SimpleNamespace
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from deeplab_v1.distributed import DistInfo
    from deeplab_v1.stages.crf_search import search_ranks
    from search_helpers import Bowl

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = SimpleNamespace(dist=DistInfo(rank, 2, rank, 2))
        counts = [len(c10d._world.pg_map)]
        names = [str(Path(out) / f"{i}.npz") for i in range(3)]
        # a default group that cannot reduce CPU tensors (NCCL's): the stage makes ONE gloo group for the search
        with mock.patch.object(dist, "get_backend", lambda group=None: "nccl"):
            with search_ranks(ctx) as ranks:
                for i in range(3):
                    cfg = SearchConfig(objective=Bowl((5, 50, 3)), w1=[5, 10], sigma_alpha=[50], sigma_beta=[3],
                                       rounds=0)
                    run_search(names, Path(out) / f"s{i}", cfg, progress=False, dist=ranks)
                    counts.append(len(c10d._world.pg_map))
                own = ranks.group is not None
        counts.append(len(c10d._world.pg_map))
        with search_ranks(ctx) as ranks:  # the default group is gloo: used as it is
            counts.append(len(c10d._world.pg_map))
            own = own and ranks.group is None
        Path(out, f"rank{rank}.json").write_text(json.dumps({"counts": counts, "own": own}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_search_stage_makes_one_gloo_group_reused_and_destroyed(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_group_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        n = got["counts"][0]
        assert got["counts"] == [n, n + 1, n + 1, n + 1, n, n] and got["own"], got
