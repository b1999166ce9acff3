"""Training checkpoints: the reader and the atomic writer are ``deeplab_v1.weights.checkpoint``'s (one
reader, ``torch.load(weights_only=True)``, errors ``CheckpointError`` naming the file), re-exported here;
this module adds the latest ``iter_<N>.pth`` found for resuming."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..weights.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

#: ``load_checkpoint`` (a checkpoint of ours: ``state_dict`` or ``model_state``) and ``read_checkpoint``
#: (any dict, e.g. a bare ImageNet state dict) are the one reader of ``deeplab_v1.weights.checkpoint``.
__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

_ITER_RE = re.compile(r"^iter_(\d+)\.pth$")


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The ``iter_<N>.pth`` with the largest N in ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ITER_RE.match(p.name))]
    return max(found)[1] if found else None
