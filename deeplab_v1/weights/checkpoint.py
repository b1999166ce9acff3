"""Checkpoint files of ours: the one reader (``torch.load(weights_only=True)`` on the CPU), the atomic
writer, the state dict inside, and the source hash stored in converted checkpoints.

A *checkpoint of ours* is a dict holding ``state_dict`` (written by ``deeplab convert`` / the train stage's
``final.pth``) or ``model_state`` (the trainer's resumable ``iter_<N>.pth``). ``read_checkpoint`` accepts
any dict (also a bare state dict, e.g. an ImageNet ResNet ``.pth``); ``load_checkpoint`` only ours.
``deeplab_v1.engine.checkpoint`` re-exports these.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..atomic import atomic_file
from .errors import CheckpointError

__all__ = [
    "CheckpointError",
    "STATE_KEYS",
    "checkpoint_state_dict",
    "file_sha256",
    "load_checkpoint",
    "load_torch_file",
    "read_checkpoint",
    "save_checkpoint",
    "unloadable_reason",
]

#: The keys under which a checkpoint of ours holds the model's state dict, in order of preference.
STATE_KEYS: tuple[str, ...] = ("state_dict", "model_state")


def load_torch_file(path: Path) -> Any:
    """Whatever ``torch.load(weights_only=True)`` gives for ``path``, on the CPU.

    Raises:
        CheckpointError: the file is missing or not loadable (the message names the file; the torch
            exception is its ``__cause__``).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many exception types for foreign or damaged files
        raise CheckpointError(f"{path}: {unloadable_reason(path, exc)}") from exc


def unloadable_reason(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, on one line, without torch's own advice to
    load with ``weights_only=False`` (which would run whatever code the file holds; issue #21)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # neither torch.save's zip nor a pickle
        return ("not a checkpoint: not a file torch.save wrote (pass a .pth such as "
                "runs/<name>/checkpoints/final.pth, or a .caffemodel to deeplab convert)")
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: ([^\n]{1,100})", text)
        detail = f" (e.g. {found.group(1)})" if found else ""
        return f"not a checkpoint of tensors: it holds other Python objects{detail}, not loaded as they could run code"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"not a readable PyTorch file, damaged or cut short ({type(exc).__name__}: {first})"


def read_checkpoint(path: Union[str, Path]) -> dict:
    """Read a ``.pth`` holding a dict (a checkpoint of ours or a bare state dict) on the CPU.

    Raises:
        CheckpointError: the file is missing, not loadable with ``weights_only=True`` or not a dict.
    """
    path = Path(path)
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Load a checkpoint of ours with ``torch.load(weights_only=True)`` on the CPU.

    Returns:
        The checkpoint dict: ``{"model", "num_classes", "state_dict", "meta"}`` as written by
        ``convert_caffemodel``, or a trainer checkpoint (``model_state``, ...).

    Raises:
        CheckpointError: the file is missing, not loadable with ``weights_only=True``, not a dict, or has
            neither ``state_dict`` nor ``model_state``.
    """
    path = Path(path)
    obj = load_torch_file(path)
    if not isinstance(obj, dict) or not (set(STATE_KEYS) & set(obj)):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a checkpoint of ours (no 'state_dict' or 'model_state'; found {found})")
    return obj


def checkpoint_state_dict(checkpoint: Mapping[str, Any]) -> Optional[Any]:
    """The state dict a checkpoint of ours holds (``state_dict``, else ``model_state``), or None."""
    for key in STATE_KEYS:
        if key in checkpoint:
            return checkpoint[key]
    return None


def save_checkpoint(path: Union[str, Path], state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    with atomic_file(Path(path)) as f:
        torch.save(state, f)


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
