"""The torch backend's memory accounting and process settings (issue #20 items 6, 8 and 9): the budget
reaches the backend, CUDA's free memory counts the caching allocator's idle blocks, the cached lattices
count against the budget, an out-of-memory error names the budget, and glibc's setting is an entry
point's decision with values that fit a C int."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import crf.memory as memory
import crf.torch_backend as tb
from crf import CRFParams
from crf.backend_choice import default_memory_mb
from crf.dense import dense_crf
from crf.errors import DeepLabError

PARAMS = CRFParams(w1=5, sigma_alpha=30, sigma_beta=5, w2=3, sigma_gamma=3, iterations=3)


def _inputs(h: int = 24, w: int = 32, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.random((c, h, w)).astype(np.float32)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), probs / probs.sum(0)


class _FakeLibc:
    """Records ``mallopt``'s arguments as C receives them: ctypes masks a Python int to a C ``int``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(param, value):
            self.calls.append((ctypes.c_int(param).value, ctypes.c_int(value).value))
            return 1

        self.mallopt = mallopt


def test_mallopt_values_fit_a_c_int_and_are_passed_unchanged(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(memory, "_MALLOC_TUNED", [])
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(memory.sys, "platform", "linux")
    assert memory.reuse_freed_memory() is True
    assert memory.reuse_freed_memory() is True  # once: the second call asks nothing
    assert sorted(fake.calls) == sorted([(-3, memory.MMAP_THRESHOLD_BYTES), (-1, memory.TRIM_THRESHOLD_BYTES)])
    assert all(0 < v < 2**31 for _, v in fake.calls)


def test_the_torch_backend_leaves_glibc_alone(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(memory, "_MALLOC_TUNED", [])
    if hasattr(tb, "_MALLOC_TUNED"):
        monkeypatch.setattr(tb, "_MALLOC_TUNED", [])
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    tb.dense_crf_torch(*_inputs(), PARAMS)
    assert fake.calls == [] and memory._MALLOC_TUNED == []


def test_cuda_budget_counts_the_caching_allocators_idle_blocks(monkeypatch):
    mib = 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * mib, 8000 * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 600 * mib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * mib)
    assert memory.cuda_free_mb("cuda:0") == 1500
    assert default_memory_mb("cuda:0") == 750  # half of driver-free + reserved-but-unused


def test_dense_crf_hands_the_budget_to_the_torch_backend(monkeypatch):
    seen: list[float] = []
    real = tb.dense_crf_torch

    def spy(image, probs, params, device="cpu", *, memory_mb=tb.DEFAULT_MEMORY_MB):
        seen.append(memory_mb)
        return real(image, probs, params, device, memory_mb=memory_mb)

    monkeypatch.setattr(tb, "dense_crf_torch", spy)
    image, probs = _inputs()
    a = dense_crf(image, probs, PARAMS, backend="torch", memory_mb=77)
    b = dense_crf(image, probs, PARAMS, backend="auto", memory_mb=333)
    c = dense_crf(image, probs, PARAMS, backend="torch")
    assert seen == [77, 333, tb.DEFAULT_MEMORY_MB]
    np.testing.assert_array_equal(a, b)  # the budget changes the chunking, never the numbers
    np.testing.assert_array_equal(a, c)


def test_cached_lattices_count_against_the_budget_and_are_trimmed():
    tb._GAUSSIAN_CACHE.clear()
    for h in (20, 24, 28):
        tb.dense_crf_torch(*_inputs(h=h), PARAMS)
    assert len(tb._GAUSSIAN_CACHE) == 3
    held = tb._GAUSSIAN_CACHE.nbytes()
    assert held > 0
    budget = 10 * held / 2**20
    assert tb._working_mb(budget) == pytest.approx(budget - held / 2**20)
    tiny = held / 2**20  # the cache may keep at most half of it: trimmed to the latest lattice
    tb._working_mb(tiny)
    assert len(tb._GAUSSIAN_CACHE) == 1
    ref = tb.dense_crf_torch(*_inputs(h=20), PARAMS, memory_mb=1024)
    np.testing.assert_array_equal(tb.dense_crf_torch(*_inputs(h=20), PARAMS, memory_mb=tiny), ref)


def test_out_of_memory_names_the_budget(monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tb, "mean_field", boom)
    with pytest.raises(memory.CRFOutOfMemory, match=r"budget of 123 MiB.*memory_mb") as err:
        tb.dense_crf_torch(*_inputs(), PARAMS, memory_mb=123)
    assert isinstance(err.value, DeepLabError) and isinstance(err.value, RuntimeError)
