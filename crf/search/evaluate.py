"""Evaluating configurations of the search on its search input files: the per-process cache of the files,
one (group of configurations, image) task, and the :class:`Evaluator` that spreads the tasks over the worker
processes (``crf.pool``) of every rank (``crf.search.dist``) and records the results.

Every (configuration, image) pair yields an integer confusion matrix (``crf.confusion``) over the labelled
pixels and, for the ``trimap_miou`` objective, one over the trimap band (``crf.trimap``); the matrices are
summed per configuration, so 1 process, N workers and N ranks give IDENTICAL matrices and tables. Worker
processes load each file once and keep it in a per-process LRU cache within a memory budget.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..confusion import confusion, miou, pixel_accuracy
from ..dense import dense_crf_pydensecrf
from ..input_files import load_search_input
from ..inputs import check_inputs
from ..params import CRFParams
from ..pool import InlineExecutor, make_executor
from ..trimap import trimap_band
from .config import SearchConfig, param_key
from .dist import Distributed
from .store import append_records, finite_or_none
from ..errors import CRFTaskError

__all__ = ["set_cache_budget", "clear_cache", "cached_search_input", "evaluate_task", "lattice_groups",
           "default_budget", "Evaluator"]

# ---------------------------------------------------------------------------------------------------
# worker side: cached search input files, one (group of configurations, image) task

_CACHE: "OrderedDict[str, dict]" = OrderedDict()
_CACHE_BYTES = [0, 1 << 62]  # used, budget


def set_cache_budget(budget: int) -> None:
    """Bytes this process may keep in cached search input files (the workers' initializer)."""
    _CACHE_BYTES[1] = int(budget)


def clear_cache() -> None:
    """Drop every cached file of this process."""
    _CACHE.clear()
    _CACHE_BYTES[0] = 0


def cached_search_input(path: str, num_classes: int, band_width: int | None) -> dict:
    """The checked arrays of one search input file, loaded once per process (LRU within the memory budget).

    Returns:
        ``{"image", "probs", "label", "band"}``: C-contiguous uint8 image, float32 probs, uint8 label and,
        with ``band_width``, the (H, W) bool trimap band (the file's, or ``crf.trimap.trimap_band``).

    Raises:
        FileNotFoundError, ValueError: the file is missing or bad, or has another number of classes
            (the file is named).
    """
    st = os.stat(path)
    # size and mtime in the key: a file rewritten under the same name is loaded again
    ck = f"{path}|{st.st_size}|{st.st_mtime_ns}|{band_width}"
    hit = _CACHE.get(ck)
    if hit is not None:
        _CACHE.move_to_end(ck)
        return hit
    arrays = load_search_input(path, band=band_width is not None)
    try:
        image, probs = check_inputs(arrays["image"], arrays["probs"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"search input file {path}: {exc}") from exc
    if probs.shape[0] != num_classes:
        raise ValueError(f"search input file {path}: probs has {probs.shape[0]} classes, the other files {num_classes}")
    label = arrays["label"]
    band = None
    if band_width is not None:
        band = arrays["band"].astype(bool) if "band" in arrays else trimap_band(label, band_width)
    entry = {"image": image, "probs": probs, "label": label, "band": band}
    size = sum(a.nbytes for a in entry.values() if a is not None)
    while _CACHE and _CACHE_BYTES[0] + size > _CACHE_BYTES[1]:
        _, old = _CACHE.popitem(last=False)
        _CACHE_BYTES[0] -= sum(a.nbytes for a in old.values() if a is not None)
    if size <= _CACHE_BYTES[1]:
        _CACHE[ck] = entry
        _CACHE_BYTES[0] += size
    return entry


def evaluate_task(path: str, configs: tuple[CRFParams, ...], num_classes: int, band_width: int | None,
                  backend: str, device: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """CRF of one image under every configuration of a group (sharing sigma_alpha, sigma_beta, sigma_gamma).

    Returns:
        (K, C, C) int64 confusion over labelled pixels, (K, C, C) int64 over the band pixels (or None),
        (K,) float64 CRF seconds.
    """
    try:
        s = cached_search_input(path, num_classes, band_width)
        k = len(configs)
        conf = np.zeros((k, num_classes, num_classes), np.int64)
        conf_band = np.zeros_like(conf) if band_width is not None else None
        secs = np.zeros(k, np.float64)
        if backend == "torch":
            from ..torch_backend import dense_crf_torch_grid

            t0 = time.perf_counter()
            labels = dense_crf_torch_grid(s["image"], s["probs"], list(configs), device=device, labels_only=True)
            secs[:] = (time.perf_counter() - t0) / k
            preds = list(labels)
        else:
            preds = []
            for i, p in enumerate(configs):
                t0 = time.perf_counter()
                preds.append(dense_crf_pydensecrf(s["image"], s["probs"], p).argmax(0))
                secs[i] = time.perf_counter() - t0
        for i, pred in enumerate(preds):
            conf[i] = confusion(s["label"], pred, num_classes)
            if conf_band is not None:
                conf_band[i] = confusion(s["label"], pred, num_classes, mask=s["band"])
        return conf, conf_band, secs
    except Exception as exc:
        raise CRFTaskError(f"CRF search task on search input file {path} failed: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# the evaluator


def lattice_groups(configs: list[CRFParams]) -> list[tuple[CRFParams, ...]]:
    """Configurations sharing (sigma_alpha, sigma_beta, sigma_gamma): one lattice in the torch backend."""
    out: dict[tuple, list[CRFParams]] = {}
    for p in configs:
        out.setdefault((p.sigma_alpha, p.sigma_beta, p.sigma_gamma), []).append(p)
    return [tuple(g) for g in out.values()]


def default_budget(workers_on_machine: int) -> int:
    """Half the physical memory, shared among the worker processes of the machine (bytes each)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(total // 2 // max(1, workers_on_machine))


class Evaluator:
    """Evaluates lists of configurations on the search input files and appends their lines (rank 0).

    Args:
        files: the search input files (or, for a callable objective, names only).
        config: the search.
        key: :func:`crf.search.store.search_key` of this search.
        results: the ``results.jsonl`` to append to (rank 0).
        records: configuration key -> record; the evaluated configurations are added to it on every rank.
        dist: the ranks (:class:`crf.search.dist.Distributed`).
        progress: a tqdm bar per round (rank 0).
    """

    def __init__(self, files: list[str], config: SearchConfig, key: dict, results: Path, records: dict,
                 dist: Distributed, progress: bool) -> None:
        self.files, self.config, self.key, self.results, self.records = files, config, key, results, records
        self.dist, self.progress = dist, progress
        self.computed = 0
        self.band_width = config.trimap_width if config.objective == "trimap_miou" else None
        self.executor = None
        self.num_classes = 0
        if not callable(config.objective):
            with np.load(files[0], allow_pickle=False) as z:
                if "probs" not in z.files:
                    raise ValueError(f"search input file {files[0]} lacks key 'probs'; it has {sorted(z.files)}")
                shape = z["probs"].shape
            if len(shape) != 3:
                raise ValueError(f"search input file {files[0]}: key 'probs' must be (C, H, W), got shape {shape}")
            self.num_classes = int(shape[0])
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.world > 1 else 1
            cpus = os.cpu_count() or 1
            self.workers = config.workers or max(1, cpus // local)
            budget = (int(config.cache_mb * 2**20) if config.cache_mb is not None
                      else default_budget(self.workers * local))
            if self.workers == 1:
                self.executor = InlineExecutor()
                set_cache_budget(budget)
            else:
                self.executor = make_executor(self.workers, config.backend, processes_per_machine=local,
                                              initializer=set_cache_budget, initargs=(budget,))

    def close(self) -> None:
        """Stop the workers, or give back the memory of the files cached in this process (workers=1)."""
        if isinstance(self.executor, InlineExecutor):
            clear_cache()  # the files were cached in this (the caller's) process: give the memory back
        elif self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _record(self, p: CRFParams, round_index: int, objective: float | None, conf: np.ndarray | None,
                conf_band: np.ndarray | None, seconds: float) -> dict:
        rec = dict(self.key)
        rec.update(params=p.to_dict(), round=round_index, images=len(self.files),
                   objective=finite_or_none(objective), seconds=round(float(seconds), 4))
        if conf is not None:
            rec.update(miou=finite_or_none(miou(conf)), pixel_accuracy=finite_or_none(pixel_accuracy(conf)),
                       confusion=conf.tolist())
        else:
            rec.update(miou=None, pixel_accuracy=None)
        if conf_band is not None:
            rec.update(band_miou=finite_or_none(miou(conf_band)),
                       band_pixel_accuracy=finite_or_none(pixel_accuracy(conf_band)), confusion_band=conf_band.tolist())
        return rec

    def _finish(self, recs: list[dict]) -> None:
        # every rank keeps the records (the next round's best must be the same everywhere); rank 0 writes
        for rec in recs:
            self.records[param_key(CRFParams.from_dict(rec["params"]))] = rec
        if self.dist.rank == 0:
            append_records(self.results, recs)
        self.computed += len(recs)

    def run(self, configs: list[CRFParams], round_index: int, total: int) -> None:
        """Evaluate ``configs`` (round ``round_index``, ``total`` configurations in the round with those
        already done) and record each one."""
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
        groups = lattice_groups(configs)
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
        parallel = not isinstance(self.executor, InlineExecutor)

        def submit(batch_index: int) -> list[tuple[int, Future]]:
            out = []
            tasks = [(gi, fi) for gi in range(len(batches[batch_index])) for fi in range(n_img)]
            for t, (gi, fi) in enumerate(tasks):
                if t % self.dist.world == self.dist.rank:
                    out.append((gi, self.executor.submit(evaluate_task, self.files[fi], batches[batch_index][gi],
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
