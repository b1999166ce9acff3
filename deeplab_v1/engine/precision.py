"""How the arithmetic is done: precision (autocast, GradScaler), TF32, ``torch.compile`` and the memory
format. ``fp32`` without compile or channels_last is the release's arithmetic; the others trade exactness
for speed (``bf16`` / ``fp16`` agree with fp32 to about 1 % of the score scale, tests/test_pipeline.py).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

__all__ = ["PRECISIONS", "autocast", "grad_scaler", "set_tf32", "maybe_compile", "to_memory_format", "compile_supported"]

#: ``precision`` value -> the autocast dtype (None: fp32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """``torch.autocast`` for ``precision`` (``bf16``, ``fp16``) on ``device``; a no-op for ``fp32``.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for ``fp16`` (gradients scaled against underflow), else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def set_tf32(enabled: bool, device: torch.device | str) -> None:
    """Allow TF32 matmuls and convolutions on CUDA (the ``tf32`` key); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model in ``channels_last`` memory format (NHWC strides; faster convolutions on tensor cores)
    when asked, in place; its state dict is unchanged."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_supported() -> tuple[bool, str]:
    """(whether ``torch.compile`` works here, why not): tried on a tiny function."""
    try:
        f = torch.compile(lambda x: x * 2 + 1)
        ok = bool(torch.equal(f(torch.ones(2)), torch.full((2,), 3.0)))
        return ok, "" if ok else "torch.compile gave a wrong result"
    except Exception as exc:  # no C++ compiler, an unsupported platform ...
        return False, f"torch.compile is not supported here: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def maybe_compile(fn, enabled: bool):
    """``torch.compile(fn)`` when ``enabled`` (the ``compile`` key), else ``fn``."""
    return torch.compile(fn) if enabled else fn
