"""Evaluating configurations of the search on its search input files: the per-process cache of the files,
one (group of configurations, image) task, and the :class:`Evaluator` that spreads the tasks of one plan
(``crf.search.plan``: the same batches and tasks on every rank) over the worker processes (``crf.pool``) of
every rank (``crf.search.dist``) and records the results.

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
from ..pool import InlineExecutor, make_executor, worker_threads
from ..trimap import trimap_band
from .config import SearchConfig, param_key
from .dist import Distributed
from .plan import SearchPlan, batches_of, share, tasks_of
from .store import append_records, finite_or_none
from ..errors import CRFTaskError

__all__ = ["set_cache_budget", "clear_cache", "cached_search_input", "evaluate_task", "lattice_groups",
           "default_cache_bytes", "image_order", "Evaluator"]

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


def evaluate_task(paths: str | tuple[str, ...], configs: tuple[CRFParams, ...], num_classes: int,
                  band_width: int | None, backend: str, device: str,
                  memory_mb: float | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """CRF of one or more images under every configuration of a group (sharing sigma_alpha, sigma_beta,
    sigma_gamma), their confusion matrices summed over the images.

    Several images run through the torch backend in one call (``dense_crf_torch_grid_batch``: their
    lattices as segments of one lattice, the group's configurations as channels); pydensecrf runs one
    configuration of one image at a time. The sums are integers, so how the images are split among tasks
    never changes a result.

    Args:
        paths: search input files (one path, or a tuple of them).
        configs: K configurations sharing one bilateral lattice.
        num_classes: C. band_width: the trimap band's width for ``trimap_miou`` (None: no band matrix).
        backend: ``"pydensecrf"`` or ``"torch"`` (already resolved). device: the torch device.
        memory_mb: the torch backend's working-memory bound (None: its default).

    Returns:
        (K, C, C) int64 confusion over labelled pixels, (K, C, C) int64 over the band pixels (or None),
        (K,) float64 CRF seconds summed over the images.

    Raises:
        CRFTaskError: a file is bad or the CRF failed (the files named).
    """
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    try:
        samples = [cached_search_input(path, num_classes, band_width) for path in paths]
        k = len(configs)
        conf = np.zeros((k, num_classes, num_classes), np.int64)
        conf_band = np.zeros_like(conf) if band_width is not None else None
        secs = np.zeros(k, np.float64)
        if backend == "torch":
            from ..torch_backend import DEFAULT_MEMORY_MB, dense_crf_torch_grid_batch

            t0 = time.perf_counter()
            labels = dense_crf_torch_grid_batch([s["image"] for s in samples], [s["probs"] for s in samples],
                                                list(configs), device=device, checked=True,
                                                memory_mb=memory_mb or DEFAULT_MEMORY_MB)
            secs[:] = (time.perf_counter() - t0) / k
            preds = [list(lab) for lab in labels]
        else:
            preds = []
            for s in samples:
                preds.append([])
                for i, p in enumerate(configs):
                    t0 = time.perf_counter()
                    preds[-1].append(dense_crf_pydensecrf(s["image"], s["probs"], p).argmax(0))
                    secs[i] += time.perf_counter() - t0
        for s, image_preds in zip(samples, preds):
            for i, pred in enumerate(image_preds):
                conf[i] += confusion(s["label"], pred, num_classes)
                if conf_band is not None:
                    conf_band[i] += confusion(s["label"], pred, num_classes, mask=s["band"])
        return conf, conf_band, secs
    except Exception as exc:
        names = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)"
        raise CRFTaskError(f"CRF search task on search input file {names} failed: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# the evaluator


def lattice_groups(configs: list[CRFParams]) -> list[tuple[CRFParams, ...]]:
    """Configurations sharing (sigma_alpha, sigma_beta, sigma_gamma): one lattice in the torch backend."""
    out: dict[tuple, list[CRFParams]] = {}
    for p in configs:
        out.setdefault((p.sigma_alpha, p.sigma_beta, p.sigma_gamma), []).append(p)
    return [tuple(g) for g in out.values()]


def default_cache_bytes(workers_on_machine: int) -> int:
    """The search's input-file cache per worker process when ``cache_mb`` is not set, bytes: half the
    physical memory shared among the worker processes of the machine. A cache of the search's input
    files (it changes no result), not the CRF's working-memory budget
    (``crf.backend_choice.default_memory_mb``, MiB, capped, which picks the backend)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(total // 2 // max(1, workers_on_machine))


def image_order(files: list[str], seed: int) -> list[int]:
    """The order in which the images join successive halving's rungs: indices into ``files``, a seeded
    permutation of the files sorted by id (stem), so the same subset gives the same order whatever the
    order of ``files``."""
    by_id = sorted(range(len(files)), key=lambda i: Path(files[i]).stem)
    perm = np.random.default_rng(seed).permutation(len(files))
    return [by_id[int(j)] for j in perm]


class Evaluator:
    """Scores configurations on prefixes of the images (in :func:`image_order`) and appends their lines.

    A configuration's record holds its confusion matrices summed over its first ``images`` images; asking
    for more images computes only the missing ones and adds them (successive halving's rungs, or the grid
    completing a halving search). Every line carries ``images`` (scored on), ``crf_runs`` (configuration
    x image runs made for this configuration so far), ``image_order`` (the halving seed of the order) and
    ``history`` (``[images, objective]`` per rung it reached).

    Args:
        files: the search input files (or, for a callable objective, names only).
        config: the search.
        key: :func:`crf.search.store.search_key` of this search.
        results: the ``results.jsonl`` to append to (rank 0).
        records: configuration key -> record; the evaluated configurations are added to it on every rank.
        dist: the ranks (:class:`crf.search.dist.Distributed`).
        progress: a tqdm bar per round (rank 0).
        plan: the one plan of every rank (:func:`crf.search.plan.decide_plan`): backend, device, layout,
            budget; every rank computes its share of the same tasks.
    """

    def __init__(self, files: list[str], config: SearchConfig, key: dict, results: Path, records: dict,
                 dist: Distributed, progress: bool, plan: SearchPlan) -> None:
        self.files, self.config, self.key, self.results, self.records = files, config, key, results, records
        self.dist, self.progress, self.plan = dist, progress, plan
        self.backend, self.device = plan.backend, plan.device
        self.order = image_order(files, config.halving_seed)
        self.computed = 0
        self.crf_runs = 0
        self.band_width = config.trimap_width if config.objective == "trimap_miou" else None
        self.executor = None
        self.num_classes = 0
        self.workers, self.layout_reason = plan.workers, plan.layout_reason
        self.in_process = False
        if not callable(config.objective):
            with np.load(files[0], allow_pickle=False) as z:
                if "probs" not in z.files:
                    raise ValueError(f"search input file {files[0]} lacks key 'probs'; it has {sorted(z.files)}")
                shape = z["probs"].shape
            if len(shape) != 3:
                raise ValueError(f"search input file {files[0]}: key 'probs' must be (C, H, W), got shape {shape}")
            self.num_classes = int(shape[0])
            self.in_process = plan.in_process
            local = self._local()
            # the file cache is this process's memory: its budget never changes a result, so each rank sizes
            # its own (the plan fixes only what decides the work split and the CRF's arithmetic)
            budget = (int(config.cache_mb * 2**20) if config.cache_mb is not None
                      else default_cache_bytes(self.workers * local))
            if self.in_process:
                self.executor = InlineExecutor()
                set_cache_budget(budget)
            else:
                self.executor = make_executor(self.workers, self.backend, processes_per_machine=local,
                                              initializer=set_cache_budget, initargs=(budget,))

    def _local(self) -> int:
        return self.dist.local_world if self.dist.world > 1 else 1

    @property
    def layout(self) -> str:
        """How the CRFs run, for the records: ``"2 processes x 1 thread"``, ``"in-process on cuda"``."""
        if callable(self.config.objective):
            return "callable objective"
        if self.in_process:
            if self.backend == "torch" and self.device.startswith("cuda"):
                return f"in-process on {self.device} (images batched)"
            if self.backend == "torch":
                import torch

                threads = torch.get_num_threads()
                return f"in-process on cpu x {threads} thread{'s' if threads > 1 else ''}"
            return f"in-process on {self.device}"
        threads = worker_threads(self.workers, self._local())
        return f"{self.workers} processes x {threads} thread{'s' if threads > 1 else ''}"

    def close(self) -> None:
        """Stop the workers, or give back the memory of the files cached in this process (workers=1)."""
        if isinstance(self.executor, InlineExecutor):
            clear_cache()  # the files were cached in this (the caller's) process: give the memory back
        elif self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def scored_images(self, p: CRFParams) -> int:
        """On how many images (a prefix of the order) ``p`` has a usable record: all of them, or a prefix
        of this search's order (a partial record of another ``halving_seed`` is not usable: 0)."""
        rec = self.records.get(param_key(p))
        if rec is None:
            return 0
        images = int(rec.get("images", 0))
        if images >= len(self.files):
            return len(self.files)
        return images if rec.get("image_order") == self.config.halving_seed else 0

    def _record(self, p: CRFParams, round_index: int, images: int, runs: int, objective: float | None,
                conf: np.ndarray | None, conf_band: np.ndarray | None, seconds: float, history: list) -> dict:
        rec = dict(self.key)
        rec.update(params=p.to_dict(), round=round_index, images=images, crf_runs=runs,
                   image_order=self.config.halving_seed, objective=finite_or_none(objective),
                   seconds=round(float(seconds), 4), history=history + [[images, finite_or_none(objective)]],
                   layout=self.layout)
        if conf is not None:
            rec.update(miou=finite_or_none(miou(conf)), pixel_accuracy=finite_or_none(pixel_accuracy(conf)),
                       confusion=conf.tolist())
        else:
            rec.update(miou=None, pixel_accuracy=None)
        if conf_band is not None:
            rec.update(band_miou=finite_or_none(miou(conf_band)),
                       band_pixel_accuracy=finite_or_none(pixel_accuracy(conf_band)), confusion_band=conf_band.tolist())
        return rec

    def _finish(self, recs: list[dict], new_runs: int) -> None:
        # every rank keeps the records (the next round's best must be the same everywhere); rank 0 writes
        for rec in recs:
            self.records[param_key(CRFParams.from_dict(rec["params"]))] = rec
        if self.dist.rank == 0:
            append_records(self.results, recs)
        self.computed += len(recs)
        self.crf_runs += new_runs

    def run(self, configs: list[CRFParams], round_index: int, total: int, images: int | None = None,
            desc: str = "") -> None:
        """Score ``configs`` (round ``round_index``; ``total`` configurations in the round) on the first
        ``images`` images of the order (default: all), computing only the images each one lacks."""
        from tqdm import tqdm

        target = len(self.files) if images is None else int(images)
        items = [(p, self.scored_images(p)) for p in configs]
        items = [(p, start) for p, start in items if start < target]
        pairs = sum(target - start for _, start in items)
        bar = tqdm(total=pairs, desc=desc or f"crf search round {round_index}", unit="run",
                   disable=not self.progress or self.dist.rank != 0 or not items, dynamic_ncols=True)
        try:
            if callable(self.config.objective):
                for p, start in items:
                    t0 = time.perf_counter()
                    value = float(self.config.objective(p))
                    history = self._history(p, start)
                    runs = self._old(p, start, "crf_runs", 0) + target - start
                    self._finish([self._record(p, round_index, target, runs, value, None, None,
                                               time.perf_counter() - t0, history)], target - start)
                    bar.update(target - start)
                return
            self._run_crf(items, target, round_index, bar)
        finally:
            bar.close()

    def _old(self, p: CRFParams, start: int, field: str, default):
        rec = self.records.get(param_key(p))
        return rec.get(field, default) if (rec is not None and start > 0) else default

    def _history(self, p: CRFParams, start: int) -> list:
        return [list(h) for h in self._old(p, start, "history", [])]

    def _run_crf(self, items: list[tuple[CRFParams, int]], target: int, round_index: int, bar) -> None:
        # groups: configurations sharing a lattice AND the images they lack (successive halving's survivors
        # of one rung all lack the same images)
        by_group: dict[tuple, list[CRFParams]] = {}
        for p, start in items:
            by_group.setdefault((p.sigma_alpha, p.sigma_beta, p.sigma_gamma, start), []).append(p)
        groups = [(tuple(ps), key[3]) for key, ps in by_group.items()]
        # a batch (the unit of all_reduce and of appending lines) holds whole groups; all batches are queued
        # at once, so no core idles between batches while rank 0 waits in all_reduce or writes. The batches
        # and tasks come from the plan alone: the same on every rank
        plan = self.plan
        batches = batches_of(groups, target, plan.want)
        parallel = not self.in_process

        def submit(batch_index: int) -> list[tuple[list[int], int, Future]]:
            batch = batches[batch_index]
            flat = [p for g in batch for p in g[0]]
            out = []
            for indices, chunk in share(tasks_of(batch, target, plan, self.files, self.order), self.dist):
                paths = tuple(self.files[self.order[j]] for j in chunk)
                out.append((indices, len(chunk), self.executor.submit(
                    evaluate_task, paths, tuple(flat[i] for i in indices), self.num_classes, self.band_width,
                    self.backend, self.device, plan.memory_mb)))
            return out

        pending = [submit(b) for b in range(len(batches))] if parallel else None
        c = self.num_classes
        for b, batch in enumerate(batches):
            futures = pending[b] if parallel else submit(b)
            size = sum(len(g[0]) for g in batch)
            conf = np.zeros((size, c, c), np.int64)
            conf_band = np.zeros_like(conf)
            secs = np.zeros(size, np.float64)
            for indices, n_images, fut in futures:
                cf, cb, sc = fut.result()
                conf[indices] += cf
                if cb is not None:
                    conf_band[indices] += cb
                secs[indices] += sc
                bar.update(n_images * len(indices))
            conf = self.dist.sum(conf)
            secs = self.dist.sum(secs)
            if self.band_width is not None:
                conf_band = self.dist.sum(conf_band)
            recs = []
            new_runs = 0
            i = 0
            for configs, start in batch:
                for p in configs:
                    old = self.records.get(param_key(p)) if start > 0 else None
                    full = conf[i] + (np.asarray(old["confusion"], np.int64) if old else 0)
                    band = None
                    if self.band_width is not None:
                        band = conf_band[i] + (np.asarray(old["confusion_band"], np.int64) if old else 0)
                    value = miou(band) if band is not None else miou(full)
                    runs = (int(old.get("crf_runs", old.get("images", 0))) if old else 0) + target - start
                    seconds = secs[i] + (float(old.get("seconds") or 0.0) if old else 0.0)
                    recs.append(self._record(p, round_index, target, runs, value, full, band, seconds,
                                             self._history(p, start)))
                    new_runs += target - start
                    i += 1
            self._finish(recs, new_runs)
