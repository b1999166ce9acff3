"""The search space of the CRF parameter search (DeepLab v1 Sec. 5): the coarse grid, the refinement rounds
around the best configuration, and the key of a configuration (see ``crf.search`` for the paper's text)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Union

import numpy as np

from ..inputs import check_backend
from ..params import CRFParams
from ..pool import resolve_workers
from ..errors import CRFInputError

__all__ = ["OBJECTIVES", "STRATEGIES", "DECIMALS", "HALVING_FLOOR", "HALVING_FLOOR_REASON", "SearchConfig", "param_key"]

OBJECTIVES = ("miou", "trimap_miou")
#: ``grid``: every configuration of a round on every image (the paper's); ``halving``: successive halving
#: (Jamieson & Talwalkar 2016) over the images, see :meth:`SearchConfig.halving_schedule`.
STRATEGIES = ("grid", "halving")
#: Decimal places kept for grid values (refinement steps such as 2.5 or 0.25 stay exact and the same
#: value always gives the same key, whatever float noise the arithmetic left).
DECIMALS = 6
#: The fewest images successive halving's first rung scores a configuration on (``SearchConfig.halving_floor``).
HALVING_FLOOR = 10
#: Why :data:`HALVING_FLOOR` (written into ``best.json`` beside it): the study that chose it.
HALVING_FLOOR_REASON = (
    "a first rung of few images drops the grid's best on small subsets: on VOC val images (tools/halving_study.py: "
    "the paper's 96-configuration grid, mIoU, DIAGNOSTIC degraded-GT scores, 2400 random subsets of 12-36 "
    "images and orders) halving missed the grid's best by more than 0.1 mIoU points in 12 % of them with "
    "the old first rung ceil(images / 9) (up to 2 points), 4.8 % with a floor of 4, 1.3 % of 6, 0.4 % of 8 "
    "and 1 of 2400 of 10; from 82 images on ceil(images / 9) >= 10 and the floor changes nothing")


def _floats(name: str, values: Any, minimum: float, strict: bool) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        out = sorted({round(float(v), DECIMALS) for v in values})
    except (TypeError, ValueError) as exc:
        raise CRFInputError(f"SearchConfig.{name} must be a list of numbers, got {values!r}") from exc
    if not out:
        raise CRFInputError(f"SearchConfig.{name} must not be empty")
    bad = [v for v in out if not math.isfinite(v) or v < minimum or (strict and v == minimum)]
    if bad:
        sign = ">" if strict else ">="
        raise CRFInputError(f"SearchConfig.{name} values must be finite and {sign} {minimum}, got {bad}")
    return out


@dataclass
class SearchConfig:
    """The search space and how to run it (paper Sec. 5).

    Args:
        w1: bilateral weights of the coarse grid (paper Sec. 5: "w1 in [5, 10]" in MATLAB notation, the
            two values 5 and 10, as the release's cross-validation script's W in {5, 10}; default
            ``[5.0, 10.0]``). The six values 5..10 are one YAML line away:
            ``crf_search.w1: [5, 6, 7, 8, 9, 10]``.
        sigma_alpha: bilateral spatial standard deviations, pixels (paper: [50:10:100] = 50, 60, ..., 100).
        sigma_beta: bilateral colour standard deviations, RGB units (paper: [3:1:10] = 3, 4, ..., 10).
        w2, sigma_gamma: the Gaussian kernel, fixed (paper: 3 and 3 pixels, never cross-validated).
        iterations: mean-field iterations (paper: 10 for every reported number).
        rounds: refinement rounds after the coarse one (0: coarse grid only).
        shrink: step factor per round, in (0, 1): round r steps are the coarse steps times shrink**r.
        objective: ``"miou"`` (mIoU of all labelled pixels), ``"trimap_miou"`` (mIoU of the pixels in the
            trimap band of ``trimap_width`` pixels around the void outlines, paper Fig. 5), or a callable
            ``f(params: CRFParams) -> float`` to maximise instead of running the CRF (a hook for tests and
            for studying the search itself; the search input files then only name the subset and are not read).
        trimap_width: band width w in pixels for ``"trimap_miou"`` (the band is
            ``dilate(label == 255, (2w+1) x (2w+1)) AND label != 255``).
        backend: ``"auto"`` (default: the torch backend when it is installed and the largest image fits
            ``memory_mb``, else pydensecrf; ``crf.backend_choice``; the choice is recorded in
            ``results.jsonl`` and ``best.json``), ``"pydensecrf"`` (the reference) or ``"torch"``.
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"`` (torch). On CUDA the search runs in this process
            (no CPU pool), images x configurations batched within ``memory_mb``.
        memory_mb: the torch backend's budget per process, MiB (``None``: half the memory shared among
            the workers, at most 4096; on CUDA half the free device memory).
        workers: worker processes per rank, one thread each; 1 -> in-process (torch: every core's threads;
            on CUDA images batched through one lattice); ``None`` -> :func:`crf.pool.default_workers`: on
            CPU (torch or pydensecrf) one process per core (cores / local ranks), on CUDA this process.
        strategy: ``"grid"`` (every configuration of a round on every image, the paper's) or
            ``"halving"``: successive halving over the images (:meth:`halving_schedule`): each round's
            configurations are scored on ``min_images`` images (at least ``halving_floor``), the best
            ``1/eta`` of them on ``eta`` times as many, and so on until the finalists are scored on all
            images with the same summed-confusion objective; the best finalist wins (and centres the next
            refinement round). The cut keeps whole lattice groups (every w1 of a (sigma_alpha,
            sigma_beta); ``crf.search.run.halving_cut``).
        eta: the halving factor (an integer >= 2): keep ``ceil(groups / eta)`` lattice groups per rung.
        min_images: images of the first rung (``None``: ``ceil(images / eta**2)``, three rungs), raised to
            ``halving_floor``.
        halving_seed: the order in which the images join the rungs (a permutation of the sorted ids).
        halving_floor: the fewest images the first rung scores a configuration on (default
            :data:`HALVING_FLOOR`, chosen from a study on VOC images, :data:`HALVING_FLOOR_REASON`); a subset
            of at most this many images is searched as the grid. Both are recorded in ``best.json``
            (:meth:`halving_plan`). Lower it only knowing that a first rung of few images can drop the best.
        cache_mb: per-process memory for cached search input files in MiB; ``None`` -> half the physical memory
            divided among the worker processes of the machine.
        label: a note on where the probabilities come from, written into ``ranked.md``, the heatmap title
            and ``best.json`` (e.g. that they are DIAGNOSTIC scores rather than a network's).

    Raises:
        CRFInputError (a ValueError): an empty or non-numeric list, a negative weight, a non-positive sigma, ``rounds`` < 0,
            ``shrink`` outside (0, 1), an unknown objective/backend/device, or bad ``workers``; the
            message names the field and the value.
    """

    #: paper Sec. 5 "w1 in [5, 10]" (MATLAB notation: the two values 5 and 10); 2 x 6 x 8 = 96 configurations
    w1: list[float] = field(default_factory=lambda: [5.0, 10.0])
    sigma_alpha: list[float] = field(default_factory=lambda: [50.0, 60.0, 70.0, 80.0, 90.0, 100.0])
    sigma_beta: list[float] = field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    w2: float = 3.0
    sigma_gamma: float = 3.0
    iterations: int = 10
    rounds: int = 1
    shrink: float = 0.5
    objective: Union[str, Callable[[CRFParams], float]] = "miou"
    trimap_width: int = 5
    backend: str = "auto"
    device: str = "cpu"
    workers: int | None = None
    label: str = ""
    cache_mb: float | None = None
    memory_mb: float | None = None
    strategy: str = "grid"
    eta: int = 3
    min_images: int | None = None
    halving_seed: int = 0
    halving_floor: int = HALVING_FLOOR

    def __post_init__(self) -> None:
        self.w1 = _floats("w1", self.w1, 0.0, strict=False)
        self.sigma_alpha = _floats("sigma_alpha", self.sigma_alpha, 0.0, strict=True)
        self.sigma_beta = _floats("sigma_beta", self.sigma_beta, 0.0, strict=True)
        # CRFParams checks w2, sigma_gamma and iterations with messages that name the field
        CRFParams(self.w1[0], self.sigma_alpha[0], self.sigma_beta[0], self.w2, self.sigma_gamma, self.iterations)
        self.w2, self.sigma_gamma = float(self.w2), float(self.sigma_gamma)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise CRFInputError(f"SearchConfig.rounds must be an integer >= 0, got {self.rounds!r}")
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, float)) or not 0 < self.shrink < 1:
            raise CRFInputError(f"SearchConfig.shrink must be a number in (0, 1), got {self.shrink!r}")
        if not callable(self.objective) and self.objective not in OBJECTIVES:
            raise CRFInputError(f"SearchConfig.objective must be one of {list(OBJECTIVES)} or a callable, "
                             f"got {self.objective!r}")
        tw = self.trimap_width
        if isinstance(tw, bool) or not isinstance(tw, int) or tw < 1:
            raise CRFInputError(f"SearchConfig.trimap_width must be an integer >= 1 (pixels), got {tw!r}")
        check_backend(self.backend, self.device)
        if self.workers is not None:
            resolve_workers(self.workers)
        if self.cache_mb is not None and not (isinstance(self.cache_mb, (int, float)) and self.cache_mb >= 0):
            raise CRFInputError(f"SearchConfig.cache_mb must be None or a number >= 0 (MiB), got {self.cache_mb!r}")
        mm = self.memory_mb
        if mm is not None and (isinstance(mm, bool) or not isinstance(mm, (int, float)) or not mm > 0):
            raise CRFInputError(f"SearchConfig.memory_mb must be None or a number > 0 (MiB), got {mm!r}")
        if self.strategy not in STRATEGIES:
            raise CRFInputError(f"SearchConfig.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise CRFInputError(f"SearchConfig.eta must be an integer >= 2, got {self.eta!r}")
        mi = self.min_images
        if mi is not None and (isinstance(mi, bool) or not isinstance(mi, int) or mi < 1):
            raise CRFInputError(f"SearchConfig.min_images must be None or an integer >= 1, got {mi!r}")
        hf = self.halving_floor
        if isinstance(hf, bool) or not isinstance(hf, int) or hf < 1:
            raise CRFInputError(f"SearchConfig.halving_floor must be an integer >= 1 (images), got {hf!r}")
        if isinstance(self.halving_seed, bool) or not isinstance(self.halving_seed, int):
            raise CRFInputError(f"SearchConfig.halving_seed must be an integer, got {self.halving_seed!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "SearchConfig":
        """Build from a plain dict (a YAML mapping); unknown keys raise ValueError naming them."""
        if not isinstance(values, dict):
            raise CRFInputError(f"search config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CRFInputError(f"unknown search config key(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)

    @property
    def objective_name(self) -> str:
        """``"miou"``, ``"trimap_miou(width=W)"``, or ``"callable:<module>.<name>"``."""
        if callable(self.objective):
            fn = self.objective
            return f"callable:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        if self.objective == "trimap_miou":
            return f"trimap_miou(width={self.trimap_width})"
        return "miou"

    def halving_schedule(self, images: int) -> list[int]:
        """Images per rung of successive halving for a subset of ``images``: ``min_images`` (default
        ``ceil(images / eta**2)``) but at least ``halving_floor``, times ``eta`` per rung, the last rung all
        ``images`` (increasing; one rung, the grid, when the first already covers them: a subset of at most
        ``halving_floor`` images). The grid strategy is the single rung ``[images]``.

        Example: 100 images, eta 3 -> [12, 36, 100]; the 96 configurations (48 sigma pairs x 2 w1) are
        scored on 12 images, the best 16 pairs (32 configurations) on 36, the best 6 pairs on all 100:
        2688 CRF runs instead of 9600 (28 %)."""
        if self.strategy == "grid":
            return [images]
        first = self.min_images if self.min_images is not None else math.ceil(images / self.eta**2)
        rungs = []
        n = max(first, self.halving_floor)
        while n < images:
            rungs.append(n)
            n *= self.eta
        return rungs + [images]

    def halving_plan(self, images: int) -> dict:
        """The record of the schedule for a subset of ``images`` (``best.json``): ``eta``, ``rungs``
        (:meth:`halving_schedule`), ``halving_floor``, ``halving_floor_reason`` and ``halving_note``: what
        the floor changed, in words (e.g. the grid on a subset too small for a first rung of the floor
        plus a later one). Empty for the grid strategy."""
        if self.strategy == "grid":
            return {}
        asked = self.min_images if self.min_images is not None else math.ceil(images / self.eta**2)
        rungs = self.halving_schedule(images)
        origin = "min_images" if self.min_images is not None else f"ceil({images} / eta**2)"
        if len(rungs) == 1:
            note = (f"the grid: {images} images are too few for halving with a first rung of at least "
                    f"halving_floor {self.halving_floor} images and a later rung")
        elif asked < rungs[0]:
            note = f"first rung raised from {asked} ({origin}) to halving_floor {self.halving_floor} images"
        else:
            note = f"first rung {rungs[0]} images ({origin}), not below halving_floor {self.halving_floor}"
        return {"eta": self.eta, "rungs": rungs, "halving_floor": self.halving_floor,
                "halving_floor_reason": HALVING_FLOOR_REASON, "halving_note": note}

    def params(self, w1: float, sigma_alpha: float, sigma_beta: float) -> CRFParams:
        """A configuration with this search's fixed w2, sigma_gamma and iterations."""
        return CRFParams(w1, sigma_alpha, sigma_beta, self.w2, self.sigma_gamma, self.iterations)

    def coarse_grid(self) -> list[CRFParams]:
        """The coarse grid, w1 slowest and sigma_beta fastest (len(w1) x len(sigma_alpha) x len(sigma_beta))."""
        return [self.params(a, b, c) for a in self.w1 for b in self.sigma_alpha for c in self.sigma_beta]

    def steps(self) -> dict[str, float]:
        """The coarse grid's step per axis (smallest gap between its values; 0 for a single value)."""
        return {name: (float(np.diff(v).min()) if len(v) > 1 else 0.0)
                for name, v in (("w1", self.w1), ("sigma_alpha", self.sigma_alpha), ("sigma_beta", self.sigma_beta))}

    def refine(self, best: CRFParams, round_index: int) -> list[CRFParams]:
        """Round ``round_index`` (>= 1): best +- 1 step of ``coarse step * shrink**round_index`` per axis.

        The values are NOT clipped to the coarse grid's [min, max]: a best on the grid's edge is refined
        on both sides of it, so that the search can move beyond the paper's initial ranges (e.g. to the
        release's LargeFOV w1 4 or sigma_alpha 49). Values outside the valid domain (w1 < 0,
        sigma_alpha or sigma_beta <= 0, after rounding to the grid's decimals) are DROPPED from their axis
        rather than clamped (a sigma clamped to the domain's edge would be the invalid 0); that axis then
        has 2 values. w1 = 0 (no bilateral term) is valid and kept. An axis with a single coarse value
        has step 0 and keeps the best's value only. At most 3 x 3 x 3 configurations come back (``best``
        itself included; the caller drops the ones already evaluated).
        """
        if round_index < 1:
            raise CRFInputError(f"refinement rounds start at 1, got {round_index}")
        steps = self.steps()
        axes = []
        for name, strict in (("w1", False), ("sigma_alpha", True), ("sigma_beta", True)):
            step = steps[name] * self.shrink**round_index
            centre = getattr(best, name)
            values = set()
            for k in (-1, 0, 1):
                v = round(centre + k * step, DECIMALS) + 0.0  # + 0.0: no -0.0
                if v > 0 or (v == 0 and not strict):
                    values.add(v)
            if round(centre, DECIMALS) + 0.0 not in values:
                values.add(centre)  # CRFParams checked it; a sigma below 1e-6 stays as given, not rounded to 0
            axes.append(sorted(values))
        return [self.params(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]


def param_key(p: CRFParams) -> tuple:
    """The key of a configuration: its five values rounded to :data:`DECIMALS` places, and the iterations
    (the same configuration always gives the same key, whatever float noise made it)."""
    return tuple(round(float(x), DECIMALS) for x in (p.w1, p.sigma_alpha, p.sigma_beta, p.w2, p.sigma_gamma)) + (
        p.iterations,)
