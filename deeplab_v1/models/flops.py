"""Multiply-Adds of a network, counted with ``torch.utils.flop_counter.FlopCounterMode``.

Convention: ``FlopCounterMode`` counts 2 FLOPs per multiply-add of convolutions and matrix products
(``aten.convolution``, ``mm``, ``addmm``, ``bmm``; depthwise convolutions by their grouped weight shape), so
Multiply-Adds = FLOPs / 2. Not counted: BN, ReLU, additions of residuals and biases, pooling and bilinear
upsampling (the papers' Multiply-Adds, v3+ Tables 3 and 5, count the same way as far as we can tell: they
are dominated by convolutions).

``atrous="space_to_batch"`` adds what TensorFlow computes for an atrous convolution (stride 1, rate r > 1):
``tf.nn.atrous_conv2d`` / ``depthwise_conv2d`` with a rate run as space-to-batch -> convolution ->
batch-to-space, and the space-to-batch pads each side of the output grid up to a multiple of r, so
ceil(H / r) * r x ceil(W / r) * r output positions are computed instead of H x W (65 at rate 12 -> 72). The
papers' implementation is TensorFlow (v3 Sec. 4, v3+ Sec. 4), and this convention reproduces their ResNet-101
numbers (docs/v3_models.md).

The count runs on the ``meta`` device by default: shapes only, no memory and no arithmetic, so a
ResNet-101 at 513x513 output_stride 8 is built and counted in about a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class MultiplyAdds:
    """Result of ``count_multiply_adds``.

    Attributes:
        total: Multiply-Adds of one forward pass (FLOPs / 2).
        by_module: Multiply-Adds per top-level child of the model (``backbone``, ``aspp``, ``decoder``,
            ``classifier``, ...), same convention, without the space-to-batch extra.
        atrous_extra: Multiply-Adds added by ``atrous="space_to_batch"`` (0 for ``"exact"``; included in
            ``total``).
    """

    total: int
    by_module: dict[str, int]
    atrous_extra: int = 0

    @property
    def billions(self) -> float:
        """``total`` in units of 1e9 (the papers' "B")."""
        return self.total / 1e9


def count_multiply_adds(model_or_factory: nn.Module | Callable[[], nn.Module], height: int = 513, width: int = 513,
                        batch: int = 1, device: str | torch.device = "meta",
                        atrous: str = "exact") -> MultiplyAdds:
    """Multiply-Adds of one forward pass of an (N, 3, H, W) input in eval mode.

    Args:
        model_or_factory: a model, or a zero-argument callable building one; a callable is called under
            ``torch.device(device)`` so that a large model is never materialised on the meta device.
        height, width: input size in pixels (513 x 513 in the papers' tables).
        batch: images per forward pass.
        device: where to run; ``"meta"`` counts from shapes only. A model passed in is moved there.
        atrous: ``"exact"`` (H x W positions per convolution) or ``"space_to_batch"`` (TensorFlow's
            padded atrous convolution, see the module docstring).

    Returns:
        ``MultiplyAdds`` (FLOPs / 2, totals and per top-level module).

    Raises:
        ValueError: non-positive sizes or unknown ``atrous``.
    """
    if min(height, width, batch) < 1:
        raise ValueError(f"height, width and batch must be >= 1, got {height}, {width}, {batch}")
    if atrous not in ("exact", "space_to_batch"):
        raise ValueError(f"atrous must be 'exact' or 'space_to_batch', got {atrous!r}")
    device = torch.device(device)
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory.to(device)
    else:
        with device:
            model = model_or_factory()
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, 3, height, width, device=device)
    counter = FlopCounterMode(display=False, depth=None)
    extra = [0]

    def add_space_to_batch(conv: nn.Conv2d, _inputs: tuple, out: torch.Tensor) -> None:
        r = conv.dilation[0]
        if r > 1 and conv.stride == (1, 1) and conv.dilation[0] == conv.dilation[1]:
            h, w = out.shape[-2:]
            padded = math.ceil(h / r) * r * math.ceil(w / r) * r
            per_position = out.shape[0] * conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
            extra[0] += per_position * (padded - h * w)

    hooks = []
    if atrous == "space_to_batch":
        hooks = [m.register_forward_hook(add_space_to_batch) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    # FlopCounterMode keys modules by their dotted path under the model's class name.
    prefix = type(model).__name__
    by_module = {name: sum(counts.get(f"{prefix}.{name}", {}).values()) // 2 for name, _ in model.named_children()}
    return MultiplyAdds(total=counter.get_total_flops() // 2 + extra[0], by_module=by_module, atrous_extra=extra[0])


__all__ = ["MultiplyAdds", "count_multiply_adds"]
