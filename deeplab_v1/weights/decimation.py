"""fc6/fc7 decimation (paper Sec. 3.2, "spatially subsampling (by simple decimation)"): the indices kept and
the decimated tensors. Pure tensor functions, below both ``mapping`` (which decimates an ImageNet source
while matching it to the model) and ``imagenet`` (which documents the rule, module docstring step 3).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["decimation_indices", "decimate_fc6", "decimate_fc7"]


def decimation_indices(n_src: int, n_dst: int, *, spatial: bool) -> list[int]:
    """Indices kept when decimating ``n_src`` positions to ``n_dst`` (paper Sec. 3.2).

    Spatial (rows/columns of fc6): an even step that keeps both ends, step = (n_src - 1) / (n_dst - 1):
    7 -> 4 gives [0, 2, 4, 6], 7 -> 3 gives [0, 3, 6] (7 -> 1 keeps the centre, [3]).
    Channels: every (n_src / n_dst)-th from 0: 4096 -> 1024 gives [0, 4, ..., 4092].

    Raises:
        ValueError: ``n_dst`` > ``n_src`` or the step is not an integer.
    """
    if not 1 <= n_dst <= n_src:
        raise ValueError(f"cannot decimate {n_src} to {n_dst}")
    if spatial:
        if n_dst == 1:
            return [n_src // 2]
        if (n_src - 1) % (n_dst - 1):
            raise ValueError(f"spatial decimation {n_src} -> {n_dst} has no integer step")
        return list(range(0, n_src, (n_src - 1) // (n_dst - 1)))
    if n_src % n_dst:
        raise ValueError(f"channel decimation {n_src} -> {n_dst} has no integer step")
    return list(range(0, n_src, n_src // n_dst))


def decimate_fc6(
    weight: torch.Tensor, bias: torch.Tensor, kernel: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Decimate fc6 (O, C, K, K) + (O,) to (channels, C, kernel, kernel) + (channels,).

    Returns:
        (weight, bias, spatial indices kept, output channels kept); tensors are new contiguous copies.

    Raises:
        ValueError: the sizes do not decimate evenly (see ``decimation_indices``).
    """
    o, _, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"fc6 kernel must be square, got {tuple(weight.shape)}")
    sp = decimation_indices(kh, kernel, spatial=True)
    ch = decimation_indices(o, channels, spatial=False)
    sp_t = torch.tensor(sp, device=weight.device)
    ch_t = torch.tensor(ch, device=weight.device)
    w = weight.index_select(0, ch_t).index_select(2, sp_t).index_select(3, sp_t).contiguous()
    return w, bias.index_select(0, ch_t).contiguous(), sp, ch


def decimate_fc7(
    weight: torch.Tensor, bias: torch.Tensor, in_channels: Sequence[int], out_channels: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep fc7's outputs ``out_channels`` and inputs ``in_channels`` (fc6's kept outputs).

    Args:
        weight: (O, I, 1, 1). bias: (O,).
    """
    out_t = torch.tensor(list(out_channels), device=weight.device)
    in_t = torch.tensor(list(in_channels), device=weight.device)
    w = weight.index_select(0, out_t).index_select(1, in_t).contiguous()
    return w, bias.index_select(0, out_t).contiguous()
