"""Training checkpoints: the reader and the atomic writer are ``deeplab_v1.weights.checkpoint``'s (one
reader, ``torch.load(weights_only=True)``, errors ``CheckpointError`` naming the file), re-exported here;
this module adds the latest ``iter_<N>.pth`` found for resuming."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from ..weights.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

#: ``load_checkpoint`` (a checkpoint of ours: ``state_dict`` or ``model_state``) and ``read_checkpoint``
#: (any dict, e.g. a bare ImageNet state dict) are the one reader of ``deeplab_v1.weights.checkpoint``.
__all__ = ["CheckpointError", "checkpoints_newest_first", "latest_checkpoint", "load_latest_checkpoint",
           "load_checkpoint", "read_checkpoint", "save_checkpoint"]

_ITER_RE = re.compile(r"^iter_(\d+)\.pth$")


def checkpoints_newest_first(folder: Path) -> list[Path]:
    """The ``iter_<N>.pth`` files of ``folder``, largest N first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ITER_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The ``iter_<N>.pth`` with the largest N in ``folder``, or None."""
    found = checkpoints_newest_first(folder)
    return found[0] if found else None


def load_latest_checkpoint(folder: Path, warn: Callable[[str], None] = print) -> Optional[tuple[Path, dict]]:
    """(path, state) of the newest readable ``iter_<N>.pth`` of ``folder``, or None. A checkpoint that
    cannot be read (a write killed midway, a damaged disk) is passed over for the one before, with a
    warning naming it; it is renamed ``<name>.corrupt`` so that it is not tried again."""
    for path in checkpoints_newest_first(folder):
        try:
            state = load_checkpoint(path)
            if not {"model_state", "optimizer_state", "iteration"} <= set(state):
                raise CheckpointError(f"{path}: not a training checkpoint (no model_state / optimizer_state / iteration)")
            return path, state
        except CheckpointError as exc:
            warn(f"warning: {exc}; falling back to the checkpoint before it")
            path.replace(path.with_name(path.name + ".corrupt"))
    return None
