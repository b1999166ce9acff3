"""Dropout whose masks are keyed per sample, so that a training run does not depend on how its global
batch is split (one process with batch 2, batch 1 x iter_size 2, or two ranks of batch 1).

Source: the release's ``DROPOUT`` layers (``dropout_ratio: 0.5`` after fc6 and fc7, and in the MSc
branches); Caffe draws each mask from one generator per process, which ties the mask of a sample to its
position in the batch and to the process. Here the mask of sample n in a forward is drawn from a generator
seeded by that sample's key (the trainer gives ``(seed, epoch, index)``, ``engine.trainer``), the dropout
layer's ordinal in the model and the number of calls of that layer in this forward. Without keys (every
caller but the trainer) ``KeyedDropout`` is ``nn.Dropout``: same module, same state dict, same numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["KeyedDropout", "dropout_keys", "mask_seed"]

_TAG = 0xD0


def mask_seed(key: Sequence[int], layer: int, call: int) -> int:
    """The generator seed of one sample's mask: 63 bits from ``SeedSequence([*key, tag, layer, call])``."""
    state = np.random.SeedSequence([int(k) for k in key] + [_TAG, int(layer), int(call)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class KeyedDropout(nn.Dropout):
    """``nn.Dropout`` (element-wise, kept values scaled by 1 / (1 - p)) with per-sample keyed masks.

    While ``dropout_keys`` is active the mask of sample n is ``bernoulli(1 - p)`` of shape x.shape[1:] from
    a generator on ``x.device`` seeded by ``mask_seed(keys[n], layer, call)``; else ``F.dropout`` on the
    global generator as ``nn.Dropout``. Masks depend on the device's generator (CPU and CUDA differ).

    Shapes: (N, ...) -> (N, ...), any float dtype (the mask takes x's dtype, so autocast is kept).

    Raises:
        ValueError: keys are set but their number differs from the batch size N.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self._keys: Optional[list[tuple[int, ...]]] = None
        self._layer = 0
        self._calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._keys is None or not self.training or self.p == 0.0:
            return super().forward(x)
        return self._keyed(x)

    # Keys, generators and numpy change every step: traced by torch.compile they would be guarded on and
    # recompiled each step; drawn eagerly, the compiled graphs around this layer stay the same (#20).
    @torch.compiler.disable
    def _keyed(self, x: torch.Tensor) -> torch.Tensor:
        """The keyed masks applied to ``x`` (run eagerly, outside any compiled graph)."""
        assert self._keys is not None
        if len(self._keys) != x.shape[0]:
            raise ValueError(f"dropout keys for {len(self._keys)} samples, batch of {x.shape[0]}")
        call, self._calls = self._calls, self._calls + 1
        if self.p == 1.0:
            return x * 0.0
        masks = []
        for key in self._keys:
            g = torch.Generator(device=x.device)
            g.manual_seed(mask_seed(key, self._layer, call))
            masks.append(torch.empty(x.shape[1:], device=x.device, dtype=torch.float32).bernoulli_(1.0 - self.p, generator=g))
        mask = torch.stack(masks).to(x.dtype)
        return x * mask * (1.0 / (1.0 - self.p))


@contextmanager
def dropout_keys(model: nn.Module, keys: Sequence[Sequence[int]]) -> Iterator[None]:
    """Key every ``KeyedDropout`` of ``model`` by ``keys`` (one tuple of ints per sample of the batch)
    for the forward passes inside the block; layer ordinals are the modules' order in ``model.modules()``."""
    layers = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    frozen = [tuple(int(v) for v in k) for k in keys]
    for i, m in enumerate(layers):
        m._keys, m._layer, m._calls = frozen, i, 0
    try:
        yield
    finally:
        for m in layers:
            m._keys, m._calls = None, 0
