"""The search across torch.distributed ranks (gloo; detected from ``RANK``/``WORLD_SIZE`` as torchrun sets
them): the (configuration, image) pairs are divided among the ranks, and their integer confusion matrices
summed (all_reduce SUM of int64 tensors), so 1 process and N ranks give IDENTICAL matrices. torch is imported
only when a job has more than one rank."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["Distributed"]


class Distributed:
    """Rank, world size and the collectives the search needs (gloo on CPU tensors).

    ``Distributed()`` is the single process (rank 0 of 1); :meth:`from_env` joins the torch.distributed job
    that torchrun describes in ``WORLD_SIZE`` / ``RANK`` (and starts its process group if nobody has).
    """

    def __init__(self) -> None:
        self.rank, self.world, self.group, self.owned = 0, 1, None, False

    @classmethod
    def from_env(cls) -> "Distributed":
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
        """``array`` summed over the ranks (all_reduce SUM); integer counts stay exact."""
        if self.world == 1:
            return array
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(array))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` started it."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
