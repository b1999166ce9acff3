"""Training checkpoints: written atomically (see ``deeplab_v1.atomic``), read with
``torch.load(weights_only=True)``, and the latest ``iter_<N>.pth`` found for resuming."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_file


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint of ours with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        ValueError: the file is missing, unreadable or not a checkpoint dict (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


_ITER_RE = re.compile(r"^iter_(\d+)\.pth$")


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The ``iter_<N>.pth`` with the largest N in ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ITER_RE.match(p.name))]
    return max(found)[1] if found else None
