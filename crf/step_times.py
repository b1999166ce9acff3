"""Seconds per step of the torch CRF backend (``crf.torch_backend``), for ``tools/profile_crf.py``
(issue #14: "the next optimisation starts from a measurement, not from guesses").

``with profile_steps() as times:`` sums, over every torch-backend call made inside it, the seconds of each
step of mean-field inference (Kraehenbuehl & Koltun 2011; densecrf's ``inference``): ``softmax``,
``lattice`` (features, permutohedral lattice build and normalisation), ``splat``, ``blur``, ``slice``,
``compatibility`` (Potts weights and the unary added). Outside it a step costs one list check.
"""

from __future__ import annotations

import time

import torch

__all__ = ["StepTimes", "Step", "profile_steps"]


class StepTimes:
    """Seconds per step of the torch backend, summed while :func:`profile_steps` is active (for
    ``tools/profile_crf.py``): ``softmax``, ``lattice`` (features, lattice build and normalisation),
    ``splat``, ``blur``, ``slice``, ``compatibility`` (Potts weights and the unary added). On CUDA each
    step synchronises the device first, so the times are the kernels'. Inactive, a step costs one check."""

    STEPS = ("softmax", "lattice", "splat", "blur", "slice", "compatibility")

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in self.STEPS}
        self.calls = {k: 0 for k in self.STEPS}


_PROFILE: list[StepTimes] = []


class Step:
    """``with Step("blur", device):`` adds the block's seconds to the active :class:`StepTimes` (if any)."""

    __slots__ = ("name", "t0", "device")

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device

    def __enter__(self) -> None:
        if _PROFILE:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if _PROFILE:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            _PROFILE[-1].seconds[self.name] += time.perf_counter() - self.t0
            _PROFILE[-1].calls[self.name] += 1


class profile_steps:
    """``with profile_steps() as times:`` sums the seconds of each step of every torch-backend call made
    inside it into ``times.seconds`` (a :class:`StepTimes`)."""

    def __enter__(self) -> StepTimes:
        times = StepTimes()
        _PROFILE.append(times)
        return times

    def __exit__(self, *exc) -> None:
        _PROFILE.pop()
