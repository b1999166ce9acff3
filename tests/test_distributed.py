"""Several processes (torch.distributed on gloo, as torchrun starts them): the global batch does not depend
on how it is split, a resume may change the world size, ``torchrun -m deeplab_v1 run`` gives the metrics
of one process, and a failing rank stops every rank at once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deeplab_v1.config import TrainConfig
from deeplab_v1.data.io import write_label
from deeplab_v1.data.lists import Sample
from deeplab_v1.engine.checkpoint import load_checkpoint
from deeplab_v1.engine.trainer import train
from deeplab_v1.models import build_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"
CROP = 33


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_samples(folder: Path, count: int = 4, side: int = 40) -> list[Sample]:
    """Random images with every label valid (Caffe normalises the loss per forward, so the splits agree
    exactly only when each forward has the same number of valid labels)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        img, lab = folder / f"{i}.png", folder / f"{i}_label.png"
        cv2.imwrite(str(img), rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        write_label(lab, rng.integers(0, 3, (side, side), dtype=np.uint8))
        samples.append(Sample(str(i), img, lab))
    return samples


def run_training(samples: list[Sample], out: Path, *, batch: int, iter_size: int, iterations: int = 3,
                 num_workers: int = 0, checkpoint_every: int | None = None) -> dict:
    """LargeFOV (3 classes, dropout on) trained on ``CROP`` crops; the final weights."""
    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=3)
    cfg = TrainConfig(iterations=iterations, batch_size=batch, iter_size=iter_size, base_lr=0.001,
                      checkpoint_every=checkpoint_every or iterations, num_workers=num_workers)
    train(model, samples, cfg, out, crop_size=CROP, seed=1, num_classes=3, progress=False, log=lambda _: None)
    return load_checkpoint(out / "final.pth")["state_dict"] if (out / "final.pth").is_file() else {}


def _rank_main(rank: int, world: int, port: int, folder: str, out: str, iterations: int, checkpoint_every: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        samples = make_samples(Path(folder) / f"rank{rank}")  # same content on every rank
        run_training(samples, Path(out), batch=1, iter_size=1, iterations=iterations, checkpoint_every=checkpoint_every)
    finally:
        dist.destroy_process_group()


def _spawn_two_ranks(tmp_path: Path, out: Path, iterations: int, checkpoint_every: int) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "data"), str(out), iterations, checkpoint_every),
             nprocs=2, join=True)


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        err = float((a[k] - b[k]).abs().max())
        assert err <= 1e-4 * scale + 1e-7, f"{what}: {k} differs by {err} (scale {scale})"


@pytest.mark.slow
def test_batch_split_over_iter_size_and_ranks_gives_the_same_weights(tmp_path):
    """batch 2 == batch 1 x iter_size 2 == 2 gloo ranks x batch 1 (dropout on), after 3 iterations."""
    samples = make_samples(tmp_path / "data")
    batch2 = run_training(samples, tmp_path / "batch2", batch=2, iter_size=1)
    iter2 = run_training(samples, tmp_path / "iter2", batch=1, iter_size=2, num_workers=1)
    _spawn_two_ranks(tmp_path, tmp_path / "ranks2", iterations=3, checkpoint_every=3)
    ranks2 = load_checkpoint(tmp_path / "ranks2" / "final.pth")["state_dict"]
    init = build_model("deeplab-largefov", num_classes=3).state_dict()
    assert any(not torch.allclose(batch2[k], init[k]) for k in ("fc8.weight", "fc7.weight"))  # it trained
    _assert_close(batch2, iter2, "batch 1 x iter_size 2")
    _assert_close(batch2, ranks2, "2 ranks x batch 1")
    # the dropout masks count: two ranks that drew masks from their own process's generator would differ
    state = torch.load(tmp_path / "ranks2" / "iter_3.pth", weights_only=True)
    assert state["samples_seen"] == 6 and state["world_size"] == 2


@pytest.mark.slow
def test_resume_with_another_world_size(tmp_path):
    """2 ranks x batch 1 for 2 iterations, then one process with batch 2 for the third: the weights of 3
    uninterrupted iterations of batch 2."""
    samples = make_samples(tmp_path / "data")
    full = run_training(samples, tmp_path / "full", batch=2, iter_size=1)
    _spawn_two_ranks(tmp_path, tmp_path / "part", iterations=2, checkpoint_every=1)
    (tmp_path / "part" / "final.pth").unlink()
    resumed = run_training(samples, tmp_path / "part", batch=2, iter_size=1)
    _assert_close(full, resumed, "resumed on one process")


def _on_main_rank(rank: int, world: int, port: int, out: str) -> None:
    from deeplab_v1.distributed import RankError, on_main, shard
    from deeplab_v1.errors import DeepLabError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert on_main(lambda: f"from rank {dist.get_rank()}") == "from rank 0"
        assert shard(list(range(5))) == [[0, 2, 4], [1, 3]][rank]

        def check() -> None:
            raise DeepLabError("sample.png: not an image")

        try:
            on_main(check)
        except RankError as exc:
            Path(out, f"rank{rank}.txt").write_text(f"RankError: {exc}")
        except DeepLabError as exc:
            Path(out, f"rank{rank}.txt").write_text(f"DeepLabError: {exc}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_0s_error_reaches_every_rank(tmp_path):
    """What rank 0 does alone (the data check, the stage plan) fails on every rank with rank 0's error."""
    mp.spawn(_on_main_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "DeepLabError: sample.png: not an image"
    assert (tmp_path / "rank1.txt").read_text() == "RankError: rank 0 failed: sample.png: not an image"


def _torchrun(args: list[str], timeout: float, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deeplab_v1", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


TINY = ["--set", "train.iterations=2", "--set", "train.batch_size=1", "--set", "train.crop_size=81",
        "--set", "train.checkpoint_every=1", "--set", "data.max_test_images=3", "--set", "test.size=97",
        "--no-progress"]


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_at_once(tmp_path):
    """Rank 1 cannot write its first image's score file (a folder is in the way); the job ends within
    seconds with that error, instead of rank 0 waiting for a collective timeout (30 minutes)."""
    out = tmp_path / "run"
    from deeplab_v1.config import load_config
    from deeplab_v1.context import RunContext

    cfg = load_config(DEFAULT, [f"output_dir={out}", "data.max_test_images=3"])
    ids = [s.id for s in RunContext.create(cfg, progress=False).test_samples()]
    (out / "scores" / f"{ids[1]}.npz").mkdir(parents=True)  # rank 1's first image (shard 1::2)
    t0 = time.monotonic()
    r = _torchrun(["run", str(DEFAULT), "--set", f"output_dir={out}", "--set", "stages=[train, test]", *TINY],
                  timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert ids[1] in r.stderr and "deeplab: error" in r.stderr, r.stderr[-3000:]
    assert "internal error" not in r.stderr, r.stderr[-3000:]  # rank 0 stops with a RankError, if at all
    assert elapsed < 240, elapsed
    assert not (out / "stages" / "test.json").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_metrics_of_one_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m deeplab_v1 run`` on the shipped sample == ``deeplab run``."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*TINY, "--set", "crf_search.w1=[4]", "--set", "crf_search.sigma_alpha=[50]",
              "--set", "crf_search.sigma_beta=[3, 5]", "--set", "crf_search.rounds=0", "--set", "crf.workers=1",
              "--set", "crf_search.workers=1"]
    # one process: batch 1 x iter_size 2; two ranks: batch 1 each (the same global batch, and the same
    # per-forward loss normalisation: Caffe's, so the two agree even where crops hold ignored labels)
    r1 = subprocess.run([sys.executable, "-m", "deeplab_v1", "run", str(DEFAULT), "--set", f"output_dir={one}", *common,
                         "--set", "train.iter_size=2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _torchrun(["run", str(DEFAULT), "--set", f"output_dir={two}", *common], timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for k in ("dcnn", "crf"):
        assert abs(m1[k]["miou"] - m2[k]["miou"]) < 1e-6, (k, m1[k]["miou"], m2[k]["miou"])
    log = (two / "run.log").read_text()
    assert "on 2 ranks" in log and "global batch 2 (1 x iter_size 1 x 2)" in log
    shutil.rmtree(one)


@pytest.mark.cuda
def test_torchrun_on_two_gpus_nccl(tmp_path):
    """The same run on two GPUs (NCCL, one process per GPU, bf16): it finishes and tests every image."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, {torch.cuda.device_count()} here")
    out = tmp_path / "gpu"
    r = _torchrun(["run", str(DEFAULT), "--set", f"output_dir={out}", "--set", "device=cuda", "--set", "stages=[train, test]",
                   "--set", "train.precision=bf16", "--set", "test.precision=bf16", "--set", "test.batch_size=2", *TINY],
                  timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((out / "scores").glob("*.npz"))) == 3
