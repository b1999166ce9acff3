"""The plan of a search: the backend that runs and its device, the worker layout, the torch backend's memory
budget, and how the (configuration, image) pairs are cut into batches and tasks and dealt to the ranks.

Every rank computes its share of ONE plan (issue #20 item 1). What depends on the machine -- the layout
(from the cores, ``crf.pool.default_workers``) and the budget (from the memory,
``crf.backend_choice.default_memory_mb``) -- is decided by rank 0 alone and broadcast (:func:`decide_plan`);
the backend of ``auto`` comes from the configuration and the input shapes only (``crf.parallel.run_backend``).
The batches and tasks are then pure functions of the plan, the records (rank 0's, broadcast) and the images
(:func:`batches_of`, :func:`tasks_of`), and rank r takes every ``world``-th task from r (:func:`share`). Ranks
that see other cores, load or memory thus count every pair exactly once, and give the matrices of one process.

The plan also carries the digest of the search input files' contents (:func:`inputs_digest`): the search's
records are keyed by it (``crf.search.store.search_key``), and ranks whose files differ stop with one error.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..backend_choice import BackendChoice, default_memory_mb, torch_memory_mb
from ..errors import CRFInputError
from ..input_files import array_shape
from ..params import CRFParams
from ..parallel import run_backend
from ..pool import default_workers
from .config import SearchConfig
from .dist import Distributed

__all__ = ["GROUPS_PER_BATCH", "SearchPlan", "inputs_digest", "make_plan", "decide_plan", "batches_of", "tasks_of",
           "share"]

#: Lattice groups per batch of the search (the unit of all_reduce and of appending lines to results.jsonl):
#: a task runs one image under several groups, so the image's Gaussian lattice (38 sizes among the first
#: 100 VOC val images: too many to cache) and unary are built once per batch, not once per group.
GROUPS_PER_BATCH = 8

#: A batch: its lattice groups, each (configurations sharing a lattice, the first image position they lack).
Batch = list[tuple[tuple[CRFParams, ...], int]]
#: A task: (configuration indices in its batch, image positions in the search's image order).
Task = tuple[list[int], tuple[int, ...]]


@dataclass(frozen=True)
class SearchPlan:
    """How a search runs, the same on every rank.

    ``backend``, ``device``, ``backend_reason``: the backend that runs (``auto`` resolved once). ``workers``:
    worker processes per rank (1: in the rank's own process), with ``layout_reason``. ``memory_mb``: the
    torch backend's working-memory bound per call, MiB (None for pydensecrf or a callable objective).
    ``world``: the ranks. ``inputs``: :func:`inputs_digest` of the search input files (None for a callable
    objective, whose files are names only).
    """

    backend: str
    device: str
    backend_reason: str
    workers: int
    layout_reason: str
    memory_mb: float | None
    world: int
    inputs: str | None

    @property
    def in_process(self) -> bool:
        """The CRFs run in each rank's own process (no worker pool)."""
        return self.workers == 1

    @property
    def want(self) -> int:
        """Tasks a batch needs to keep every worker of every rank busy."""
        return max(1, self.workers * self.world)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)  # a rewritten file is hashed again
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def inputs_digest(files: Sequence[str | os.PathLike]) -> str:
    """The digest of a search's inputs: SHA-256 (first 16 hex digits) of every file's id (its stem) and the
    SHA-256 of its contents, in id order. A file rewritten with other probabilities, labels or image gives
    another digest, whatever its name (issue #20 item 6).

    Raises:
        FileNotFoundError: a file does not exist.
    """
    lines = sorted(f"{Path(f).stem} {_file_sha256(str(f))}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def make_plan(files: Sequence[str], config: SearchConfig, dist: Distributed) -> SearchPlan:
    """The plan as this process sees it (:func:`decide_plan` asks rank 0 alone).

    The backend: ``crf.parallel.run_backend`` of the configuration and the files' shapes. The layout:
    ``config.workers``, or one process on CUDA, or ``crf.pool.default_workers`` of this machine (its cores
    shared among ``dist.local_world`` local ranks). The budget: ``config.memory_mb`` or
    ``crf.backend_choice.default_memory_mb`` of this machine.
    """
    world = dist.world
    if callable(config.objective):
        return SearchPlan(config.backend, config.device, "callable objective: no CRF runs", 1, "", None, world, None)
    shapes = [array_shape(f, "probs") for f in files]
    choice: BackendChoice = run_backend(config.backend, config.device, shapes, memory_mb=config.memory_mb,
                                        configs=len(config.w1))
    local = dist.local_world if world > 1 else 1
    if choice.backend == "torch" and choice.device.startswith("cuda"):
        # CUDA: the GPU-owning process runs everything, no CPU pool (issue #13 item 6)
        workers, reason = 1, "torch on CUDA: this process"
    elif config.workers:
        workers, reason = config.workers, f"workers: {config.workers} configured"
    else:
        workers, reason = default_workers(choice.backend, choice.device, local)
    if world > 1 and not config.workers:
        reason = f"{reason} (decided by rank 0 for every rank)"
    memory = None
    if choice.backend == "torch":
        memory = float(config.memory_mb) if config.memory_mb else default_memory_mb(choice.device, workers)
    return SearchPlan(choice.backend, choice.device, choice.reason, workers, reason, memory, world,
                      inputs_digest(files))


def _check_alone() -> None:
    """A single-process search inside a started torch.distributed job would run every pair on every rank, each
    rank writing the same files: the entry point must hand its ranks in."""
    import sys

    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        raise CRFInputError(f"run_search in a torch.distributed job of {tdist.get_world_size()} ranks needs "
                            "dist=crf.search.Distributed(rank, world, group, local_world) from its entry point")


def decide_plan(files: Sequence[str], config: SearchConfig, dist: Distributed) -> SearchPlan:
    """The one plan of every rank: rank 0's :func:`make_plan`, broadcast. Every rank hashes its own files and
    compares the digest with rank 0's.

    Raises:
        CRFInputError (a ValueError): on every rank, when any rank's search input files (ids or contents)
            differ from rank 0's, or rank 0 could not plan (its error, e.g. a file without ``probs``).
    """
    if dist.world == 1:
        _check_alone()
        return make_plan(files, config, dist)
    plan: SearchPlan | BaseException | None = None
    if dist.rank == 0:
        try:
            plan = make_plan(files, config, dist)
        except (ValueError, OSError) as exc:  # handed to every rank, then raised on each
            plan = exc
    plan = dist.broadcast(plan)
    if isinstance(plan, BaseException):
        if dist.rank == 0:
            raise plan
        raise CRFInputError(f"rank 0 could not plan the search: {plan}")
    mine = None if callable(config.objective) else inputs_digest(files)
    differ = int(dist.sum(np.array([int(mine != plan.inputs)], np.int64))[0])
    if differ:
        raise CRFInputError(f"{differ} rank(s) have other search input files (ids or contents) than rank 0 "
                            f"(digest {plan.inputs}; rank {dist.rank}: {mine}): every rank must search the same "
                            "files")
    return plan


def batches_of(groups: Batch, target: int, want: int) -> list[Batch]:
    """The batches of a round: consecutive lattice groups, each batch up to :data:`GROUPS_PER_BATCH` of them
    and enough (configuration, image) tasks for ``want`` workers (all ranks' together).

    Args:
        groups: (configurations sharing a lattice, first image position they lack), in a fixed order.
        target: the images every configuration is scored on after the round (a prefix of the order).
        want: :attr:`SearchPlan.want`.
    """
    batches: list[Batch] = [[]]
    count = 0
    for g in groups:
        if len(batches[-1]) >= GROUPS_PER_BATCH and count >= want:
            batches.append([])
            count = 0
        batches[-1].append(g)
        count += target - g[1]
    return batches


def _image_chunks(start: int, target: int, configs: int, plan: SearchPlan, files: Sequence[str],
                  order: Sequence[int]) -> list[tuple[int, ...]]:
    positions = list(range(start, target))
    if not plan.in_process or plan.backend != "torch" or not plan.device.startswith("cuda"):
        # one image per call on CPU: batching images through one lattice was slower there
        # (2 threads, VOC images: 3.6 pairs/s for 1 image per call, 3.4 for 2, 3.4 for 4)
        return [(j,) for j in positions]
    # in-process torch on CUDA: as many images per call as the plan's budget holds (one lattice)
    chunks: list[tuple[int, ...]] = []
    current: list[int] = []
    pixels = 0
    for j in positions:
        c, h, w = array_shape(files[order[j]], "probs")
        if current and torch_memory_mb(pixels + h * w, c, configs) > plan.memory_mb:
            chunks.append(tuple(current))
            current, pixels = [], 0
        current.append(j)
        pixels += h * w
    if current:
        chunks.append(tuple(current))
    return chunks


def tasks_of(batch: Batch, target: int, plan: SearchPlan, files: Sequence[str], order: Sequence[int]) -> list[Task]:
    """The tasks of one batch, the same on every rank: one image's (or, on CUDA, a chunk of images') CRFs for
    several lattice groups per task, so a worker builds the image's Gaussian lattice and unary once for all
    of them (consecutive groups lacking the same images; enough tasks for every worker), image-major (the
    tasks of one image follow each other: its file is cached once per worker).

    Returns:
        (configuration indices into the batch's configurations in order, image positions) per task; every
        (configuration, image position) pair of the batch is in exactly one task.
    """
    offsets = np.cumsum([0] + [len(g[0]) for g in batch])
    want = plan.want
    pairs = sum(len(g[0]) * (target - g[1]) for g in batch)
    per_task = max(1, min(len(batch), len(batch) * pairs // max(1, 2 * want * sum(len(g[0]) for g in batch))))
    chunks: list[list[int]] = []
    for gi, (_, start) in enumerate(batch):
        if chunks and len(chunks[-1]) < per_task and batch[chunks[-1][0]][1] == start:
            chunks[-1].append(gi)
        else:
            chunks.append([gi])
    tasks: list[Task] = []
    for chunk in chunks:
        indices = [int(i) for gi in chunk for i in range(offsets[gi], offsets[gi + 1])]
        first = batch[chunk[0]]
        tasks += [(indices, images) for images in _image_chunks(first[1], target, len(first[0]), plan, files, order)]
    return sorted(tasks, key=lambda t: (t[1], t[0]))


def share(tasks: list[Task], dist: Distributed) -> list[Task]:
    """This rank's tasks: every ``world``-th one from ``rank`` (every task on exactly one rank)."""
    return tasks[dist.rank::dist.world]
