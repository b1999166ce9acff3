"""The CUDA paths that CPU can check (issue #20 items 8 and 9): each rank's "cuda" is its own GPU, the
inputs reach the GPU from pinned memory, keyed dropout does not recompile a compiled net every step,
compiled DDP with ``no_sync`` gives the gradients of one process, and the library leaves the caller's
process settings alone (the run's start decides them)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path

import cv2
import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

import deeplab_v1.context as context
import deeplab_v1.distributed as distributed
import deeplab_v1.process as process
from deeplab_v1.config import load_config
from deeplab_v1.data.loader import loader_kwargs
from deeplab_v1.engine import inference
from deeplab_v1.engine.precision import maybe_compile
from deeplab_v1.models.dropout import KeyedDropout, dropout_keys

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"


# --- item 8: each rank's "cuda" ---------------------------------------------------------------------------
@pytest.fixture
def fake_torchrun(monkeypatch):
    """Rank 1 of 2 on a machine with ``gpus`` CUDA devices; records set_device and the backend."""
    seen: dict = {"set_device": [], "backend": []}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen["backend"].append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen["set_device"].append(d))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)

    def gpus(n: int) -> dict:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return seen

    return gpus


def test_crf_on_cuda_beside_a_cpu_network_uses_the_local_ranks_gpu(fake_torchrun):
    seen = fake_torchrun(2)
    distributed.init_from_env("cpu", uses_cuda=True)
    assert seen == {"set_device": [1], "backend": ["gloo"]}  # "cuda" is cuda:1 on local rank 1, not cuda:0


def test_a_cpu_only_run_touches_no_gpu(fake_torchrun):
    seen = fake_torchrun(2)
    distributed.init_from_env("cpu")
    assert seen == {"set_device": [], "backend": ["gloo"]}


def test_crf_on_cuda_with_more_ranks_than_gpus_is_a_clear_error(fake_torchrun):
    fake_torchrun(1)
    with pytest.raises(distributed.RankError, match="local rank 1 has no CUDA device"):
        distributed.init_from_env("cpu", uses_cuda=True)


@pytest.mark.parametrize("section", ["crf", "crf_search"])
def test_the_run_tells_the_process_group_when_the_crf_uses_cuda(section, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(context, "init_from_env", lambda device, **kw: calls.append((device, kw)) or distributed.DistInfo())
    cfg = load_config(DEFAULT, [f"{section}.device=cuda", f"output_dir={tmp_path / 'run'}"], check_paths=False)
    context.RunContext.create(cfg, progress=False)
    assert calls == [("cpu", {"uses_cuda": True})]


# --- item 8: pinned inputs --------------------------------------------------------------------------------
def test_views_are_stacked_straight_into_pinned_memory(monkeypatch):
    buffers = []

    def fake_pinned(shape, dtype):  # CPU torch cannot pin: record the buffer the batch must be
        buffers.append(torch.empty(shape, dtype=dtype))
        return buffers[-1]

    monkeypatch.setattr(inference, "_pinned_empty", fake_pinned)
    xs = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    batch = inference.input_batch(xs, torch.device("cuda"))
    assert batch.data_ptr() == buffers[0].data_ptr() and torch.equal(batch, torch.stack(xs))
    assert torch.equal(inference.input_batch(xs, torch.device("cpu")), torch.stack(xs)) and len(buffers) == 1
    # the loader pins no view on its own (a pinned view was copied into pageable memory by the stack)
    assert not hasattr(inference.View, "pin_memory")


# --- item 8: compile ----------------------------------------------------------------------------------------
def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # two dropout layers of one shape: one compiled frame serves both (a recompile is never legitimate)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), KeyedDropout(0.5), nn.Linear(8, 8), KeyedDropout(0.5),
                         nn.Linear(8, 3))


def test_keyed_dropout_does_not_recompile_a_compiled_net_each_step():
    torch._dynamo.reset()
    model = _tiny().train()
    net = maybe_compile(model, True)
    x = torch.randn(2, 6)
    for step in range(4):
        keys = [(1, 0, 2 * step), (1, 0, 2 * step + 1)]
        # the keys change every call; a recompile raises (before, the seeds' frames were recompiled per
        # key until dynamo's cache limit, then left to run uncompiled)
        with torch._dynamo.config.patch(error_on_recompile=True):
            with dropout_keys(model, keys):
                out = net(x)
        with dropout_keys(model, keys):
            assert torch.equal(out, model(x))  # the masks of eager mode, keyed per sample


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = _tiny().train()
        net = DDP(model)
        forward = maybe_compile(net, True)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
        for step in range(3):
            model.zero_grad(set_to_none=True)
            for k in range(2):  # iter_size 2: gradients exchanged after the last micro-batch only
                i = 4 * k + 2 * rank
                keys = [(0, 0, i), (0, 0, i + 1)]
                with torch._dynamo.config.patch(error_on_recompile=True):
                    with net.no_sync() if k == 0 else contextlib.nullcontext():
                        with dropout_keys(model, keys):
                            loss = forward(x[i:i + 2]).square().sum()
                        loss.backward()
            if rank == 0:
                torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, f"{out}.{step}")
    finally:
        dist.destroy_process_group()
    # the work is done and saved: skip the interpreter's teardown, where a worker thread of torch.compile or
    # gloo left joinable once aborted the process ("terminate called without an active exception")
    os._exit(0)


@pytest.mark.slow
def test_compiled_ddp_with_no_sync_gives_the_gradients_of_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.spawn(_ddp_rank, args=(2, port, out), nprocs=2, join=True)
    model = _tiny().train()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    with dropout_keys(model, [(0, 0, i) for i in range(8)]):
        # DDP averages over 2 ranks the sum of each rank's 2 micro-batches
        (model(x).square().sum() / 2).backward()
    for step in range(3):
        got = torch.load(f"{out}.{step}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6)


# --- item 9: process settings ------------------------------------------------------------------------------
class _OpenCVThreads(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return cv2.getNumThreads()


def test_the_loader_sets_opencv_in_its_workers_and_leaves_the_caller_alone():
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        kw = loader_kwargs(1, torch.device("cpu"))
        assert cv2.getNumThreads() == 3  # the caller's setting is the caller's
        got = [int(v) for b in DataLoader(_OpenCVThreads(), batch_size=1, **kw) for v in b]
        assert got == [1, 1] and cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


def test_the_run_decides_the_process_settings_once_and_logs_them(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "_DONE", {})
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        cfg = load_config(DEFAULT, [f"output_dir={tmp_path / 'run'}"], check_paths=False)
        context.RunContext.create(cfg, progress=False)
        assert cv2.getNumThreads() == 1
        log = (tmp_path / "run" / "run.log").read_text()
        assert len(re.findall(r"process settings: OpenCV 1 thread.*glibc keeps freed memory", log)) == 1
        cv2.setNumThreads(3)  # decided once per process: a second run's start leaves it
        context.RunContext.create(cfg, progress=False)
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


# --- item 8: GradScaler -----------------------------------------------------------------------------------
def test_torch_floor_is_the_one_of_torch_amp_gradscaler_and_no_old_amp_api_is_used():
    text = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 3)
    for folder in ("deeplab_v1", "crf", "tools"):
        for path in (REPO / folder).rglob("*.py"):
            assert "torch.cuda.amp" not in path.read_text(), path
