"""Coarse-to-fine cross-validation of the CRF's bilateral term (DeepLab v1 Sec. 5).

Paper: "We use the default values of w2 = 3 and sigma_gamma = 3 and we search for the best values of w1,
sigma_alpha, and sigma_beta by cross-validation on a small subset of the validation set (we use 100
images). We employ coarse-to-fine search scheme. Specifically, the initial search range of the
parameters are w1 in [5, 10], sigma_alpha in [50:10:100] and sigma_beta in [3:1:10] (MATLAB notation),
and then we refine the search step sizes around the first round's best values. We fix the number of
mean field iterations to 10."

In MATLAB notation ``[5, 10]`` is the two-element vector {5, 10} (the release's own cross-validation
script also takes W in {5, 10}), while ``[50:10:100]`` is 50, 60, ..., 100 and ``[3:1:10]`` is 3, 4,
..., 10. The default coarse grid is therefore w1 in {5, 10}, sigma_alpha in {50, 60, ..., 100},
sigma_beta in {3, 4, ..., 10}: 2 x 6 x 8 = 96 configurations (w1 5, 6, ..., 10 instead is one YAML line
away: ``crf_search.w1: [5, 6, 7, 8, 9, 10]``). Each refinement round ``r`` (1..``rounds``) evaluates,
around the best configuration of the rounds before it, the points at -1, 0, +1 step of size
``coarse step * shrink**r`` on each axis (3 x 3 x 3 at most), without the configurations already
evaluated. The refinement is NOT held inside the coarse grid's bounds: it may step beyond them (towards
e.g. the release's LargeFOV w1 4, sigma_alpha 49 or 121); only values outside the valid domain (a
negative w1, a sigma <= 0) are dropped from their axis (see :meth:`SearchConfig.refine`).

Inputs are sample files (``.npz``, one per image, written ONCE by the caller; see ``crf.parallel``):
``image`` (H, W, 3) uint8 RGB, ``probs`` (C, H, W) float16/float32 (upsampled, cropped, softmaxed),
``label`` (H, W) uint8 and, for the trimap objective, optionally ``band`` (H, W) bool (computed here from
``label`` and ``trimap_width`` when absent). Worker processes load each file once and keep it in a
per-process cache.

Work split: the (configuration, image) pairs are divided among torch.distributed ranks (gloo; detected
from ``RANK``/``WORLD_SIZE`` as set by torchrun) and, within a rank, among worker processes. Every pair
yields an integer confusion matrix; the matrices are summed per configuration (all_reduce SUM of int64
tensors across ranks), so 1 process, N workers and N ranks give IDENTICAL matrices and tables.

Resumability: ``results.jsonl`` in the output folder gets one JSON line per finished configuration,
flushed and fsync'ed at once. Every line carries the search key: the hash of the image subset (sorted
sample ids), the objective name, the backend and the fixed parameters (w2, sigma_gamma, iterations).
On restart, configurations already in the file under the same key are not redone; a torn line (a
partial write from a kill) is ignored with a warning and cut off; lines under another key (another
image subset, objective or backend) are SKIPPED with a warning, kept in the file for the record, and
never mixed into the ranking. Rank 0 alone reads and writes the file and broadcasts what it read.

Outputs (all written atomically, by rank 0): ``ranked.md`` (all configurations of this search, best
first), ``heatmap.png`` (one panel per w1 of the coarse grid: objective over sigma_alpha x sigma_beta),
``best.json`` (``CRFParams.to_dict()`` of the best configuration plus its scores).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from .confusion import confusion, miou, pixel_accuracy
from .dense import _check_device, _dense_crf_pydensecrf, check_inputs
from .params import CRFParams
from .parallel import _atomic_write_bytes, load_sample, resolve_workers

__all__ = ["SearchConfig", "SearchResult", "run_search", "subset_hash", "read_results", "main"]

OBJECTIVES = ("miou", "trimap_miou")
RESULTS_FILE = "results.jsonl"
#: Decimal places kept for grid values (refinement steps such as 2.5 or 0.25 stay exact and the same
#: value always gives the same key, whatever float noise the arithmetic left).
_DECIMALS = 6


def _floats(name: str, values: Any, minimum: float, strict: bool) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        out = sorted({round(float(v), _DECIMALS) for v in values})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"SearchConfig.{name} must be a list of numbers, got {values!r}") from exc
    if not out:
        raise ValueError(f"SearchConfig.{name} must not be empty")
    bad = [v for v in out if not math.isfinite(v) or v < minimum or (strict and v == minimum)]
    if bad:
        sign = ">" if strict else ">="
        raise ValueError(f"SearchConfig.{name} values must be finite and {sign} {minimum}, got {bad}")
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
            for studying the search itself; the sample files then only name the subset and are not read).
        trimap_width: band width w in pixels for ``"trimap_miou"`` (the band is
            ``dilate(label == 255, (2w+1) x (2w+1)) AND label != 255``).
        backend, device: CRF backend (``"pydensecrf"`` or ``"torch"``) and device (``"cpu"``/``"cuda"``).
        workers: worker processes per rank; ``None`` -> CPU cores / local ranks; 1 -> in-process.
        cache_mb: per-process memory for cached samples in MiB; ``None`` -> half the physical memory
            divided among the worker processes of the machine.
        label: a note on where the probabilities come from, written into ``ranked.md``, the heatmap title
            and ``best.json`` (e.g. that they are DIAGNOSTIC scores rather than a network's).

    Raises:
        ValueError: an empty or non-numeric list, a negative weight, a non-positive sigma, ``rounds`` < 0,
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
    backend: str = "pydensecrf"
    device: str = "cpu"
    workers: int | None = None
    label: str = ""
    cache_mb: float | None = None

    def __post_init__(self) -> None:
        self.w1 = _floats("w1", self.w1, 0.0, strict=False)
        self.sigma_alpha = _floats("sigma_alpha", self.sigma_alpha, 0.0, strict=True)
        self.sigma_beta = _floats("sigma_beta", self.sigma_beta, 0.0, strict=True)
        # CRFParams checks w2, sigma_gamma and iterations with messages that name the field
        CRFParams(self.w1[0], self.sigma_alpha[0], self.sigma_beta[0], self.w2, self.sigma_gamma, self.iterations)
        self.w2, self.sigma_gamma = float(self.w2), float(self.sigma_gamma)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"SearchConfig.rounds must be an integer >= 0, got {self.rounds!r}")
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, float)) or not 0 < self.shrink < 1:
            raise ValueError(f"SearchConfig.shrink must be a number in (0, 1), got {self.shrink!r}")
        if not callable(self.objective) and self.objective not in OBJECTIVES:
            raise ValueError(f"SearchConfig.objective must be one of {list(OBJECTIVES)} or a callable, "
                             f"got {self.objective!r}")
        tw = self.trimap_width
        if isinstance(tw, bool) or not isinstance(tw, int) or tw < 1:
            raise ValueError(f"SearchConfig.trimap_width must be an integer >= 1 (pixels), got {tw!r}")
        _check_device(self.backend, self.device)
        if self.workers is not None:
            resolve_workers(self.workers)
        if self.cache_mb is not None and not (isinstance(self.cache_mb, (int, float)) and self.cache_mb >= 0):
            raise ValueError(f"SearchConfig.cache_mb must be None or a number >= 0 (MiB), got {self.cache_mb!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "SearchConfig":
        """Build from a plain dict (a YAML mapping); unknown keys raise ValueError naming them."""
        if not isinstance(values, dict):
            raise ValueError(f"search config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown search config key(s) {unknown}; expected a subset of {sorted(known)}")
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
            raise ValueError(f"refinement rounds start at 1, got {round_index}")
        steps = self.steps()
        axes = []
        for name, strict in (("w1", False), ("sigma_alpha", True), ("sigma_beta", True)):
            step = steps[name] * self.shrink**round_index
            centre = getattr(best, name)
            values = set()
            for k in (-1, 0, 1):
                v = round(centre + k * step, _DECIMALS) + 0.0  # + 0.0: no -0.0
                if v > 0 or (v == 0 and not strict):
                    values.add(v)
            if round(centre, _DECIMALS) + 0.0 not in values:
                values.add(centre)  # CRFParams checked it; a sigma below 1e-6 stays as given, not rounded to 0
            axes.append(sorted(values))
        return [self.params(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]


@dataclass
class SearchResult:
    """What :func:`run_search` found.

    ``best``: the best configuration; ``best_objective``: its objective; ``rows``: every configuration of
    this search (coarse and refinement rounds), best first, as dicts with rank, w1, sigma_alpha,
    sigma_beta, w2, sigma_gamma, iterations, objective, miou, pixel_accuracy (fractions, None where not
    measured), round and seconds (CRF seconds summed over the images); ``images``: the subset size;
    ``computed``: configurations evaluated by this call (the others came from ``results.jsonl``);
    ``seconds``: wall time; ``out_dir``: the search folder.
    """

    best: CRFParams
    best_objective: float | None
    rows: list[dict]
    images: int
    computed: int
    seconds: float
    out_dir: Path


# ---------------------------------------------------------------------------------------------------
# keys, results file


def _pkey(p: CRFParams) -> tuple:
    return tuple(round(float(x), _DECIMALS) for x in (p.w1, p.sigma_alpha, p.sigma_beta, p.w2, p.sigma_gamma)) + (
        p.iterations,)


def subset_hash(sample_files: Sequence[str | os.PathLike]) -> str:
    """Key of an image subset: SHA-256 (first 16 hex digits) of the sorted sample ids (file stems).

    Raises:
        ValueError: two files share a stem (the ids would be ambiguous).
    """
    ids = [Path(f).stem for f in sample_files]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"sample files must have distinct names (ids); duplicated: {dup[:10]}")
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _search_key(config: SearchConfig, subset: str) -> dict:
    return {"subset_hash": subset, "objective_name": config.objective_name, "backend": config.backend,
            "fixed": {"w2": config.w2, "sigma_gamma": config.sigma_gamma, "iterations": config.iterations}}


def read_results(path: str | os.PathLike, key: dict) -> tuple[dict[tuple, dict], int, bool]:
    """Read ``results.jsonl``: the records under ``key`` by configuration.

    Returns:
        ``(records, foreign, torn)``: records keyed by configuration (later lines win), the number of
        valid lines under another key (skipped, with one warning), and whether the file ends with a
        partial line (warned; the caller cuts it off before appending).
    """
    path = Path(path)
    records: dict[tuple, dict] = {}
    if not path.is_file():
        return records, 0, False
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    foreign: dict[tuple, int] = {}
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            params = CRFParams.from_dict(rec["params"])
            rec_key = {k: rec[k] for k in ("subset_hash", "objective_name", "backend", "fixed")}
        except Exception as exc:  # torn or otherwise broken line
            last = number == len(lines)
            what = "torn last line (a partial write, e.g. from a kill)" if last else "unreadable line"
            warnings.warn(f"results file {path} line {number}: {what} ignored; its configuration is redone "
                          f"({type(exc).__name__}: {exc})", stacklevel=2)
            continue
        if rec_key != key:
            k = (rec_key["subset_hash"], rec_key["objective_name"], rec_key["backend"],
                 json.dumps(rec_key["fixed"], sort_keys=True))
            foreign[k] = foreign.get(k, 0) + 1
            continue
        rec["params"] = params.to_dict()
        records[_pkey(params)] = rec
    n_foreign = sum(foreign.values())
    if n_foreign:
        other = "; ".join(f"subset {k[0]}, objective {k[1]}, backend {k[2]}, fixed {k[3]}: {n} line(s)"
                          for k, n in foreign.items())
        warnings.warn(f"results file {path}: {n_foreign} line(s) of another search ignored, never mixed in "
                      f"(this search: subset {key['subset_hash']}, objective {key['objective_name']}, backend "
                      f"{key['backend']}, fixed {json.dumps(key['fixed'], sort_keys=True)}; other: {other})",
                      stacklevel=2)
    return records, n_foreign, torn


def _cut_torn_tail(path: Path) -> None:
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def _append_lines(path: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------------------------------------
# worker side: cached samples, one (group of configurations, image) task


_CACHE: "OrderedDict[str, dict]" = OrderedDict()
_CACHE_BYTES = [0, 1 << 62]  # used, budget


def _set_cache_budget(budget: int) -> None:
    _CACHE_BYTES[1] = int(budget)


def _clear_cache() -> None:
    _CACHE.clear()
    _CACHE_BYTES[0] = 0


def _search_worker_init(threads: int, backend: str, budget: int) -> None:
    from .parallel import _worker_init

    _worker_init(threads, backend)
    _set_cache_budget(budget)


def _get_sample(path: str, num_classes: int, band_width: int | None) -> dict:
    """The checked arrays of one sample file, loaded once per process (LRU within the memory budget)."""
    st = os.stat(path)
    # size and mtime in the key: a sample file rewritten under the same name is loaded again
    ck = f"{path}|{st.st_size}|{st.st_mtime_ns}|{band_width}"
    hit = _CACHE.get(ck)
    if hit is not None:
        _CACHE.move_to_end(ck)
        return hit
    with np.load(path, allow_pickle=False) as z:
        has_band = "band" in z.files
    keys = ("image", "probs", "label") + (("band",) if band_width is not None and has_band else ())
    arrays = load_sample(path, keys)
    try:
        image, probs = check_inputs(arrays["image"], arrays["probs"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample file {path}: {exc}") from exc
    if probs.shape[0] != num_classes:
        raise ValueError(f"sample file {path}: probs has {probs.shape[0]} classes, the other samples {num_classes}")
    label = arrays["label"]
    if label.shape != image.shape[:2]:
        raise ValueError(f"sample file {path}: label shape {label.shape} differs from image (H, W) {image.shape[:2]}")
    band = None
    if band_width is not None:
        if "band" in arrays:
            band = arrays["band"].astype(bool)
            if band.shape != label.shape:
                raise ValueError(f"sample file {path}: band shape {band.shape} differs from label shape {label.shape}")
        else:
            import cv2

            void = (label == 255).astype(np.uint8)
            kernel = np.ones((2 * band_width + 1, 2 * band_width + 1), np.uint8)
            band = cv2.dilate(void, kernel).astype(bool) & (label != 255)
    entry = {"image": image, "probs": probs, "label": label, "band": band}
    size = sum(a.nbytes for a in entry.values() if a is not None)
    while _CACHE and _CACHE_BYTES[0] + size > _CACHE_BYTES[1]:
        _, old = _CACHE.popitem(last=False)
        _CACHE_BYTES[0] -= sum(a.nbytes for a in old.values() if a is not None)
    if size <= _CACHE_BYTES[1]:
        _CACHE[ck] = entry
        _CACHE_BYTES[0] += size
    return entry


def _eval_task(path: str, configs: tuple[CRFParams, ...], num_classes: int, band_width: int | None,
               backend: str, device: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """CRF of one image under every configuration of a group (sharing sigma_alpha, sigma_beta, sigma_gamma).

    Returns:
        (K, C, C) int64 confusion over labelled pixels, (K, C, C) int64 over the band pixels (or None),
        (K,) float64 CRF seconds.
    """
    try:
        s = _get_sample(path, num_classes, band_width)
        k = len(configs)
        conf = np.zeros((k, num_classes, num_classes), np.int64)
        conf_band = np.zeros_like(conf) if band_width is not None else None
        secs = np.zeros(k, np.float64)
        if backend == "torch":
            from .torch_backend import dense_crf_torch_grid

            t0 = time.perf_counter()
            labels = dense_crf_torch_grid(s["image"], s["probs"], list(configs), device=device, labels_only=True)
            secs[:] = (time.perf_counter() - t0) / k
            preds = list(labels)
        else:
            preds = []
            for i, p in enumerate(configs):
                t0 = time.perf_counter()
                preds.append(_dense_crf_pydensecrf(s["image"], s["probs"], p).argmax(0))
                secs[i] = time.perf_counter() - t0
        for i, pred in enumerate(preds):
            conf[i] = confusion(s["label"], pred, num_classes)
            if conf_band is not None:
                conf_band[i] = confusion(s["label"], pred, num_classes, mask=s["band"])
        return conf, conf_band, secs
    except Exception as exc:
        raise RuntimeError(f"CRF search task on sample file {path} failed: {exc}") from exc


class _InlineExecutor:
    """Runs a submitted call at once in this process (workers=1): same code path, no pool."""

    def submit(self, fn, *args):
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed over to the caller through the future
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# torch.distributed


class _Dist:
    """Rank, world size and the collectives the search needs (gloo on CPU tensors)."""

    def __init__(self) -> None:
        self.rank, self.world, self.group, self.owned = 0, 1, None, False

    @classmethod
    def from_env(cls) -> "_Dist":
        d = cls()
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return d
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            d.owned = True
        if dist.get_backend() != "gloo":
            # confusion matrices are CPU tensors: an NCCL default group cannot reduce them
            d.group = dist.new_group(backend="gloo")
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
        return d

    def sum(self, array: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return array
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(array))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# the search


def _sort_key(rec: dict) -> tuple:
    obj = rec.get("objective")
    p = rec["params"]
    return (0 if obj is not None else 1, -(obj if obj is not None else 0.0), p["w1"], p["sigma_alpha"], p["sigma_beta"])


def _best(records: dict[tuple, dict], keys: Sequence[tuple]) -> CRFParams:
    best = min((records[k] for k in keys), key=_sort_key)
    return CRFParams.from_dict(best["params"])


def _groups(configs: list[CRFParams]) -> list[tuple[CRFParams, ...]]:
    """Configurations sharing (sigma_alpha, sigma_beta, sigma_gamma): one lattice in the torch backend."""
    out: dict[tuple, list[CRFParams]] = {}
    for p in configs:
        out.setdefault((p.sigma_alpha, p.sigma_beta, p.sigma_gamma), []).append(p)
    return [tuple(g) for g in out.values()]


def _default_budget(workers_on_machine: int) -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(total // 2 // max(1, workers_on_machine))


class _Evaluator:
    """Evaluates lists of configurations on the sample files and appends their lines (rank 0)."""

    def __init__(self, files: list[str], config: SearchConfig, key: dict, results: Path, records: dict,
                 dist: _Dist, progress: bool) -> None:
        self.files, self.config, self.key, self.results, self.records = files, config, key, results, records
        self.dist, self.progress = dist, progress
        self.computed = 0
        self.band_width = config.trimap_width if config.objective == "trimap_miou" else None
        self.executor = None
        self.num_classes = 0
        if not callable(config.objective):
            with np.load(files[0], allow_pickle=False) as z:
                if "probs" not in z.files:
                    raise ValueError(f"sample file {files[0]} lacks key 'probs'; it has {sorted(z.files)}")
                shape = z["probs"].shape
            if len(shape) != 3:
                raise ValueError(f"sample file {files[0]}: key 'probs' must be (C, H, W), got shape {shape}")
            self.num_classes = int(shape[0])
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.world > 1 else 1
            cpus = os.cpu_count() or 1
            self.workers = config.workers or max(1, cpus // local)
            budget = (int(config.cache_mb * 2**20) if config.cache_mb is not None
                      else _default_budget(self.workers * local))
            if self.workers == 1:
                self.executor = _InlineExecutor()
                _set_cache_budget(budget)
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                threads = max(1, cpus // (self.workers * local))
                self.executor = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                                    initializer=_search_worker_init,
                                                    initargs=(threads, config.backend, budget))

    def close(self) -> None:
        if isinstance(self.executor, _InlineExecutor):
            _clear_cache()  # the samples were cached in this (the caller's) process: give the memory back
        elif self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _record(self, p: CRFParams, round_index: int, objective: float | None, conf: np.ndarray | None,
                conf_band: np.ndarray | None, seconds: float) -> dict:
        rec = dict(self.key)
        rec.update(params=p.to_dict(), round=round_index, images=len(self.files), objective=_clean(objective),
                   seconds=round(float(seconds), 4))
        if conf is not None:
            rec.update(miou=_clean(miou(conf)), pixel_accuracy=_clean(pixel_accuracy(conf)), confusion=conf.tolist())
        else:
            rec.update(miou=None, pixel_accuracy=None)
        if conf_band is not None:
            rec.update(band_miou=_clean(miou(conf_band)), band_pixel_accuracy=_clean(pixel_accuracy(conf_band)),
                       confusion_band=conf_band.tolist())
        return rec

    def _finish(self, recs: list[dict]) -> None:
        # every rank keeps the records (the next round's best must be the same everywhere); rank 0 writes
        for rec in recs:
            self.records[_pkey(CRFParams.from_dict(rec["params"]))] = rec
        if self.dist.rank == 0:
            _append_lines(self.results, recs)
        self.computed += len(recs)

    def run(self, configs: list[CRFParams], round_index: int, total: int) -> None:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=total - len(configs), desc=f"crf search round {round_index}",
                   unit="config", disable=not self.progress or self.dist.rank != 0, dynamic_ncols=True)
        try:
            if callable(self.config.objective):
                for p in configs:
                    t0 = time.perf_counter()
                    value = float(self.config.objective(p))
                    self._finish([self._record(p, round_index, value, None, None, time.perf_counter() - t0)])
                    bar.update()
                return
            self._run_crf(configs, round_index, bar)
        finally:
            bar.close()

    def _run_crf(self, configs: list[CRFParams], round_index: int, bar) -> None:
        groups = _groups(configs)
        n_img = len(self.files)
        # a batch (the unit of all_reduce and of appending lines) holds whole groups, enough tasks to
        # keep every worker of every rank busy; all batches are queued at once, so no core idles
        # between batches while rank 0 waits in all_reduce or writes
        target = max(1, self.workers * self.dist.world)
        batches: list[list[tuple[CRFParams, ...]]] = [[]]
        for g in groups:
            if batches[-1] and len(batches[-1]) * n_img >= target:
                batches.append([])
            batches[-1].append(g)
        cfg = self.config
        parallel = not isinstance(self.executor, _InlineExecutor)

        def submit(batch_index: int) -> list[tuple[int, Future]]:
            out = []
            tasks = [(gi, fi) for gi in range(len(batches[batch_index])) for fi in range(n_img)]
            for t, (gi, fi) in enumerate(tasks):
                if t % self.dist.world == self.dist.rank:
                    out.append((gi, self.executor.submit(_eval_task, self.files[fi], batches[batch_index][gi],
                                                         self.num_classes, self.band_width, cfg.backend, cfg.device)))
            return out

        pending = [submit(b) for b in range(len(batches))] if parallel else None
        c = self.num_classes
        for b, batch in enumerate(batches):
            futures = pending[b] if parallel else submit(b)
            offsets = np.cumsum([0] + [len(g) for g in batch])
            conf = np.zeros((offsets[-1], c, c), np.int64)
            conf_band = np.zeros_like(conf)
            secs = np.zeros(offsets[-1], np.float64)
            for gi, fut in futures:
                cf, cb, sc = fut.result()
                sl = slice(offsets[gi], offsets[gi + 1])
                conf[sl] += cf
                if cb is not None:
                    conf_band[sl] += cb
                secs[sl] += sc
            conf = self.dist.sum(conf)
            secs = self.dist.sum(secs)
            if self.band_width is not None:
                conf_band = self.dist.sum(conf_band)
            recs = []
            for i, p in enumerate(p for g in batch for p in g):
                band = conf_band[i] if self.band_width is not None else None
                value = miou(band) if band is not None else miou(conf[i])
                recs.append(self._record(p, round_index, value, conf[i], band, secs[i]))
            self._finish(recs)
            bar.update(len(recs))


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _rows(records: dict[tuple, dict], round_of: dict[tuple, int]) -> list[dict]:
    recs = sorted((records[k] for k in round_of), key=_sort_key)
    rows = []
    for rank, rec in enumerate(recs, start=1):
        p = rec["params"]
        rows.append({"rank": rank, **p, "objective": rec.get("objective"), "miou": rec.get("miou"),
                     "pixel_accuracy": rec.get("pixel_accuracy"),
                     "round": round_of[_pkey(CRFParams.from_dict(p))], "seconds": rec.get("seconds")})
    return rows


def _ranked_md(rows: list[dict], key: dict, images: int, callable_objective: bool, label: str = "") -> str:
    obj_head = "objective" if callable_objective else f"objective ({key['objective_name']}, %)"
    fixed = key["fixed"]
    lines = [
        "# CRF parameter search (DeepLab v1 Sec. 5), best first",
        "",
        *([f"- scores: **{label}**"] if label else []),
        f"- images: {images} (subset {key['subset_hash']})",
        f"- objective: {key['objective_name']}; backend: {key['backend']}",
        f"- fixed: w2 = {fixed['w2']:g}, sigma_gamma = {fixed['sigma_gamma']:g} pixels, "
        f"{fixed['iterations']} mean-field iterations",
        "",
        f"| rank | w1 | sigma_alpha | sigma_beta | {obj_head} | mIoU (%) | pixel acc (%) | round |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        obj = r["objective"]
        obj_s = "n/a" if obj is None else (f"{obj:.6g}" if callable_objective else f"{100 * obj:.2f}")
        lines.append(f"| {r['rank']} | {r['w1']:g} | {r['sigma_alpha']:g} | {r['sigma_beta']:g} | {obj_s} | "
                     f"{_fmt_pct(r['miou'])} | {_fmt_pct(r['pixel_accuracy'])} | {r['round']} |")
    return "\n".join(lines) + "\n"


def _heatmap_png(config: SearchConfig, records: dict[tuple, dict], best: CRFParams, title: str) -> bytes:
    # the object-oriented API with an explicit Agg canvas: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w1s, sas, sbs = config.w1, config.sigma_alpha, config.sigma_beta
    grid = np.full((len(w1s), len(sas), len(sbs)), np.nan)
    for i, a in enumerate(w1s):
        for j, b in enumerate(sas):
            for k, c in enumerate(sbs):
                rec = records.get(_pkey(config.params(a, b, c)))
                if rec is not None and rec.get("objective") is not None:
                    grid[i, j, k] = rec["objective"]
    scale = 1.0 if callable(config.objective) else 100.0
    grid *= scale
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ncols = min(3, len(w1s))
    nrows = math.ceil(len(w1s) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 1.2, 3.4 * nrows + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.84, bottom=0.1, top=0.88, wspace=0.25, hspace=0.4)
    im = None
    starred = False
    annotate = len(sas) * len(sbs) <= 64  # numbers stay legible up to the paper's 6 x 8 panels
    for i, a in enumerate(w1s):
        ax = axes[i // ncols][i % ncols]
        im = ax.imshow(grid[i], origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_xticks(range(len(sbs)), [f"{v:g}" for v in sbs])
        ax.set_yticks(range(len(sas)), [f"{v:g}" for v in sas])
        if i // ncols == nrows - 1 or i + ncols >= len(w1s):
            ax.set_xlabel("sigma_beta (RGB)")
        if i % ncols == 0:
            ax.set_ylabel("sigma_alpha (px)")
        ax.set_title(f"w1 = {a:g}")
        if annotate:
            for j in range(len(sas)):
                for k in range(len(sbs)):
                    if np.isfinite(grid[i, j, k]):
                        ax.text(k, j, f"{grid[i, j, k]:.1f}" if scale == 100.0 else f"{grid[i, j, k]:.3g}",
                                ha="center", va="center", fontsize=6, color="w")
        if best.w1 == a and best.sigma_alpha in sas and best.sigma_beta in sbs:
            ax.scatter([sbs.index(best.sigma_beta)], [sas.index(best.sigma_alpha)], marker="*", s=160,
                       facecolors="none", edgecolors="r")
            starred = True
    for i in range(len(w1s), nrows * ncols):
        axes[i // ncols][i % ncols].axis("off")
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.87, 0.1, 0.02, 0.78)), label=title)
    where = "red star" if starred else "a refined point, off this grid"
    fig.suptitle(f"coarse grid: {title}; best: w1={best.w1:g}, sigma_alpha={best.sigma_alpha:g}, "
                 f"sigma_beta={best.sigma_beta:g} ({where})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def run_search(sample_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, config: SearchConfig, *,
               progress: bool = True) -> SearchResult:
    """Coarse-to-fine search of w1, sigma_alpha, sigma_beta on the sample files (paper Sec. 5).

    Under torchrun (``WORLD_SIZE`` > 1) every rank must call this with the same files and config; the
    (configuration, image) pairs are split among the ranks and the confusion matrices summed (gloo).

    Args:
        sample_files: one ``.npz`` per image (keys ``image``, ``probs``, ``label``, optionally ``band``;
            see the module docstring); their stems are the image ids.
        out_dir: the search folder (``results.jsonl``, ``ranked.md``, ``heatmap.png``, ``best.json``).
        config: the search space and how to run it.
        progress: tqdm bars (rank 0) and a summary line at the end.

    Returns:
        A :class:`SearchResult` (best configuration, its objective, all rows best first).

    Raises:
        ValueError: no sample files, duplicated ids, a missing sample file (named), a sample file with a
            missing key or bad array (file and key named), or ranks with different subsets.
        RuntimeError: a CRF task failed (the sample file is named).
    """
    if not isinstance(config, SearchConfig):
        raise ValueError(f"config must be a crf.search.SearchConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    files = [str(Path(f)) for f in sample_files]
    if not files:
        raise ValueError("run_search needs at least one sample file")
    subset = subset_hash(files)
    if not callable(config.objective):
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} sample file(s) do not exist, e.g. {missing[:3]}")
    out_dir = Path(out_dir)
    key = _search_key(config, subset)
    results = out_dir / RESULTS_FILE
    dist = _Dist.from_env()
    evaluator = None
    try:
        if dist.world > 1 and dist.broadcast(subset) != subset:
            raise ValueError(f"rank {dist.rank} has another image subset ({subset}) than rank 0")
        if dist.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            records, _, torn = read_results(results, key)
            if torn:
                _cut_torn_tail(results)
        else:
            records = None
        records = dist.broadcast(records)
        evaluator = _Evaluator(files, config, key, results, records, dist, progress)
        round_of: dict[tuple, int] = {}
        best = None
        for r in range(config.rounds + 1):
            configs = config.coarse_grid() if r == 0 else config.refine(best, r)
            configs = [p for p in configs if _pkey(p) not in round_of]
            for p in configs:
                round_of[_pkey(p)] = r
            todo = [p for p in configs if _pkey(p) not in records]
            if todo:
                evaluator.run(todo, r, len(configs))
            best = _best(records, list(round_of))
    finally:
        if evaluator is not None:
            evaluator.close()
        dist.close()
    rows = _rows(records, round_of)
    best_rec = records[_pkey(best)]
    seconds = time.perf_counter() - t0
    result = SearchResult(best=best, best_objective=best_rec.get("objective"), rows=rows, images=len(files),
                          computed=evaluator.computed, seconds=seconds, out_dir=out_dir)
    if dist.rank == 0:
        title = config.objective_name + ("" if callable(config.objective) else " (%)")
        if config.label:
            title = f"{title} [{config.label}]"
        _atomic_write_bytes(out_dir / "ranked.md",
                            _ranked_md(rows, key, len(files), callable(config.objective), config.label).encode())
        _atomic_write_bytes(out_dir / "heatmap.png", _heatmap_png(config, records, best, title))
        best_json = {**best.to_dict(), "objective": best_rec.get("objective"), "objective_name": key["objective_name"],
                     "miou": best_rec.get("miou"), "pixel_accuracy": best_rec.get("pixel_accuracy"),
                     "subset_hash": subset, "images": len(files), "configurations": len(rows),
                     "backend": config.backend, **({"scores": config.label} if config.label else {})}
        _atomic_write_bytes(out_dir / "best.json", (json.dumps(best_json, indent=2) + "\n").encode())
        if progress:
            from tqdm import tqdm

            obj = best_rec.get("objective")
            obj_s = "n/a" if obj is None else (f"{obj:.6g}" if callable(config.objective) else f"{100 * obj:.2f}%")
            tqdm.write(f"crf search: {len(rows)} configurations ({evaluator.computed} computed, "
                       f"{len(rows) - evaluator.computed} from {RESULTS_FILE}) x {len(files)} images in "
                       f"{seconds:.1f} s; best w1={best.w1:g} sigma_alpha={best.sigma_alpha:g} "
                       f"sigma_beta={best.sigma_beta:g}: {key['objective_name']} {obj_s}")
    return result


# ---------------------------------------------------------------------------------------------------
# command line (usable under torchrun)


def _read_list(path: Path) -> list[Path]:
    if not path.is_file():
        raise SystemExit(f"--samples: list file {path} does not exist")
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crf.search --samples LIST.txt --out DIR [--config search.yaml] [--workers N]``.

    LIST.txt holds one sample file per line (relative paths are taken from the list's folder). The
    YAML file is a mapping of :class:`SearchConfig` fields. Run it under ``torchrun`` (or
    ``python -m torch.distributed.run``) to split the work across ranks.
    """
    ap = argparse.ArgumentParser(prog="python -m crf.search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=Path, required=True, help="text file: one sample .npz per line")
    ap.add_argument("--out", type=Path, required=True, help="search folder (results.jsonl, ranked.md, ...)")
    ap.add_argument("--config", type=Path, help="YAML mapping of SearchConfig fields (default: the paper's grid)")
    ap.add_argument("--workers", type=int, help="worker processes per rank (overrides the YAML)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    values: dict = {}
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            raise SystemExit(f"--config: {args.config} does not exist")
        values = yaml.safe_load(args.config.read_text()) or {}
    if args.workers is not None:
        values["workers"] = args.workers
    try:
        config = SearchConfig.from_dict(values)
    except ValueError as exc:
        raise SystemExit(f"{args.config}: {exc}")
    run_search(_read_list(args.samples), args.out, config, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    # run the importable module's main, so that worker processes unpickle crf.search functions (not
    # __main__'s copies) under the spawn start method
    from crf.search import main as _main

    sys.exit(_main())
