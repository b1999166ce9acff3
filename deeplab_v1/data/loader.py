"""``torch.utils.data.DataLoader`` for training and test: worker processes, pinned memory (CUDA),
persistent workers and prefetch, with every random choice keyed by the sample, never by the process.

Training is a stream of **global sample positions** 0, 1, 2, ...: position p is sample
``perm(seed, epoch)[p % n]`` of epoch ``p // n`` (a permutation per epoch, as before), and its crop,
mirror, scale (``TrainDataset.item``) and dropout masks (``models.dropout``) are drawn from
``(seed, epoch, index)``. Iteration ``it`` takes the ``batch_size x iter_size x world_size`` positions
after those of the iterations before it; rank r takes a contiguous run of ``batch_size x iter_size`` of
them, micro-batch k the k-th ``batch_size`` of that run. One process with batch 2, batch 1 x iter_size 2
and two ranks of batch 1 therefore see the same samples with the same crops and masks in each iteration,
and a run resumed at position P (with any world size) continues the same stream.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..process import available_cores
from .datasets import TrainDataset

__all__ = ["TrainPositions", "TrainBatches", "epoch_index", "loader_workers", "train_loader", "loader_kwargs",
           "opencv_one_thread"]


@lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_index(position: int, n: int, seed: int) -> tuple[int, int]:
    """(epoch, sample index) of global sample ``position`` in a list of ``n`` samples."""
    epoch = position // n
    return epoch, int(_permutation(int(seed), int(epoch), int(n))[position % n])


class TrainPositions(Dataset):
    """``TrainDataset`` addressed by global sample position.

    Items: ``(image (3, crop, crop) float32 mean-subtracted BGR, label (h, w) int64, key (3,) int64 =
    (seed, epoch, index))``; the key is what the dropout masks of that sample are drawn from.
    """

    def __init__(self, dataset: TrainDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:  # positions are unbounded; the batch sampler says which are used
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = epoch_index(int(position), len(self.dataset), self.dataset.seed)
        image, label = self.dataset.item(index, epoch)
        return image, label, torch.tensor([self.dataset.seed, epoch, index], dtype=torch.int64)


class TrainBatches(Sampler[list[int]]):
    """The micro-batches (lists of global positions) of one rank, iteration after iteration.

    Args:
        start_position: global position of the first sample of iteration ``start_iteration``.
        start_iteration, iterations: iterations [start_iteration, iterations) are yielded.
        batch_size, iter_size: per rank (Caffe's semantics).
        rank, world: this process and the number of processes.

    Yields ``iter_size`` lists of ``batch_size`` positions per iteration.
    """

    def __init__(self, start_position: int, start_iteration: int, iterations: int, batch_size: int,
                 iter_size: int = 1, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.start_position, self.start_iteration, self.iterations = int(start_position), int(start_iteration), int(iterations)
        self.batch_size, self.iter_size, self.rank, self.world = int(batch_size), int(iter_size), int(rank), int(world)

    @property
    def global_batch(self) -> int:
        """Samples per iteration over all ranks: batch_size x iter_size x world."""
        return self.batch_size * self.iter_size * self.world

    def positions(self, iteration: int, micro: int) -> list[int]:
        """The positions of micro-batch ``micro`` of ``iteration`` on this rank."""
        base = self.start_position + (iteration - self.start_iteration) * self.global_batch
        first = base + self.rank * self.batch_size * self.iter_size + micro * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for it in range(self.start_iteration, self.iterations):
            for k in range(self.iter_size):
                yield self.positions(it, k)

    def __len__(self) -> int:
        return max(0, self.iterations - self.start_iteration) * self.iter_size


def loader_workers(requested: Optional[int], local_world: int = 1) -> int:
    """Loader worker processes: ``requested`` when given (0: load in the main process), else the cores
    left to this rank after its own process, at most 8 (one per core on a 2-core machine)."""
    if requested is not None:
        return int(requested)
    cores = available_cores()
    return max(1, min(8, cores // max(1, local_world) - 1))


def opencv_one_thread(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: OpenCV on one thread in a DataLoader worker process (the
    workers are the parallelism; torch runs on one thread there too, as the DataLoader sets it)."""
    import cv2

    cv2.setNumThreads(1)


def loader_kwargs(num_workers: int, device: torch.device, prefetch: int = 4) -> dict:
    """The DataLoader options shared by train and test: workers, pinned memory on CUDA, persistent
    workers and ``prefetch`` batches per worker (where there are workers).

    The workers run OpenCV on one thread (:func:`opencv_one_thread`, in the worker processes only); the
    calling process's settings are its entry point's (``deeplab_v1.process``), never changed here.
    """
    kw: dict = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=prefetch, worker_init_fn=opencv_one_thread)
    return kw


def train_loader(dataset: TrainDataset, batches: TrainBatches, *, num_workers: int,
                 device: torch.device | str = "cpu") -> DataLoader:
    """Batches ``(images (N, 3, crop, crop) float32, labels (N, h, w) int64, keys (N, 3) int64)`` in the
    order of ``batches``; the same for any ``num_workers`` (items are keyed by position)."""
    return DataLoader(TrainPositions(dataset), batch_sampler=batches,
                      **loader_kwargs(num_workers, torch.device(device)))


def collate_list(items: Sequence) -> list:
    """Keep a batch as the list of its items (test items differ in size)."""
    return list(items)
