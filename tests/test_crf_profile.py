"""crf.step_times: the step profile of the torch backend (tools/profile_crf.py's measurement)."""

from __future__ import annotations

import time

import numpy as np

from crf import CRFParams
from crf.step_times import StepTimes, profile_steps
from crf.torch_backend import dense_crf_torch_grid


def test_profile_steps_times_every_step_and_only_inside_the_block():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    probs = rng.random((3, 20, 30)).astype(np.float32)
    probs /= probs.sum(0)
    configs = [CRFParams(5, 10, 3), CRFParams(10, 10, 3)]
    plain = dense_crf_torch_grid(image, probs, configs, labels_only=True)
    with profile_steps() as times:
        t0 = time.perf_counter()
        profiled = dense_crf_torch_grid(image, probs, configs, labels_only=True)
        wall = time.perf_counter() - t0
    np.testing.assert_array_equal(plain, profiled)  # timing changes nothing
    assert set(times.seconds) == set(StepTimes.STEPS)
    assert all(times.seconds[k] > 0 and times.calls[k] > 0 for k in StepTimes.STEPS)
    assert sum(times.seconds.values()) <= wall
    # what matters, not the schedule: every splat is blurred, and the counts follow the work (fewer
    # mean-field iterations, fewer filterings)
    assert times.calls["splat"] == times.calls["blur"] >= times.calls["slice"] > 0
    with profile_steps() as short:
        dense_crf_torch_grid(image, probs, [CRFParams(5, 10, 3, iterations=3), CRFParams(10, 10, 3, iterations=3)],
                             labels_only=True)
    assert 0 < short.calls["splat"] < times.calls["splat"] and 0 < short.calls["slice"] < times.calls["slice"]
    before = dict(times.seconds)
    dense_crf_torch_grid(image, probs, configs, labels_only=True)
    assert times.seconds == before  # nothing is counted outside the block
