"""The ranks of the search: who this process is among the torch.distributed ranks and the two collectives the
search needs (gloo, CPU tensors). The (configuration, image) pairs of one plan (``crf.search.plan``) are
divided among the ranks and their integer confusion matrices summed (all_reduce SUM of int64 tensors), so 1
process and N ranks give IDENTICAL matrices.

Nothing here starts, joins or destroys a process group, nor reads torchrun's environment (issue #20 item 9):
the entry point (the ``crf_search`` stage of ``deeplab_v1``, ``python -m crf.search``, or the caller) starts
the job, makes one gloo group where the default group is not gloo, hands it in, and destroys it at the end.
torch is imported only when a job has more than one rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CRFInputError

__all__ = ["Distributed"]


class Distributed:
    """This process's place among the ranks of a search, given explicitly by the entry point.

    ``Distributed()`` is the single process (rank 0 of 1).

    Args:
        rank: this process, 0 .. ``world`` - 1.
        world: the number of ranks (>= 1).
        group: the torch.distributed process group to use, which must be a gloo one (the confusion matrices
            are CPU tensors); None: the default group (then itself gloo).
        local_world: processes of the job on this machine (torchrun's local ranks), which share its cores
            and memory (>= 1).

    Raises:
        CRFInputError (a ValueError): a rank outside 0 .. world - 1, or a world or local world below 1.
    """

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None, local_world: int = 1) -> None:
        for name, value in (("rank", rank), ("world", world), ("local_world", local_world)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise CRFInputError(f"Distributed.{name} must be an integer, got {value!r}")
        if world < 1 or local_world < 1 or not 0 <= rank < world:
            raise CRFInputError(f"Distributed: rank {rank} of world {world} (local world {local_world}) is not a "
                                "place in a job: need 0 <= rank < world and world, local_world >= 1")
        self.rank, self.world, self.group, self.local_world = rank, world, group, local_world

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world={self.world}, local_world={self.local_world})"

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
