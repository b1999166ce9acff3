"""The normalised lattice filter of the dense CRF as a differentiable operator whose backward is its
exact transpose, computed by the same lattice (no autograd graph of the lattice passes is kept).

densecrf's symmetric normalisation (``NORMALIZE_SYMMETRIC``, its default, which DeepLab and the torch
backend use) filters ``K~(Q) = D K(D Q)`` with ``D = diag(1 / sqrt(K(1) + 1e-20))``, and the lattice's
``K = alpha S^T B_d ... B_1 B_0 S``: ``S`` the splat (barycentric weights, ``M x N``), ``B_j`` the blur
along lattice direction ``j`` and ``alpha S^T`` the slice (:mod:`crf.permutohedral`). Each ``B_j`` is
symmetric (``v <- v + 0.5 (v[n1] + v[n2])`` with ``n2 = n1^-1``, an absent neighbour counting 0), but
the blurs along different directions do not commute where the lattice is sparse (at the edges of the
occupied cells), so ``K`` itself is not symmetric and its transpose is

    ``K~^T = D alpha S^T B_0 B_1 ... B_d S D``:

the same splat and slice with the blur directions in reverse order. ``D`` does not depend on Q or on
any learnable parameter (the lattice is fixed), so no gradient flows into the normalisation. densecrf
itself computes this transpose the same way (``DenseKernel::filter(..., transpose=true)`` calls
``Permutohedral::compute(..., reverse=true)``) for its own parameter learning.

The operator runs in the values' dtype (float32 as the torch backend, float64 for ``gradcheck``); the
float32 forward performs the same operations in the same order as ``PermutohedralLattice.filter(values,
scale=norm)``.

Source: Krähenbühl & Koltun, "Parameter Learning and Convergent Inference for Dense Random Fields"
(ICML 2013), Sec. 5; densecrf 2013 ``pairwise.cpp`` / ``permutohedral.cpp``; issue #24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .permutohedral import PermutohedralLattice

__all__ = ["NormalisedFilter", "filter_with_adjoint"]


class NormalisedFilter:
    """``Q -> D K(D Q)`` on one lattice and its transpose, in one floating dtype.

    Args:
        lattice: the kernel's lattice over all points (a batch of images as segments).
        norm: float ``(N,)`` symmetric normalisation ``1 / sqrt(K(1) + 1e-20)`` (the torch backend's
            ``symmetric_normalization``); it is folded into the splat and slice weights.
        dtype: the dtype the values will have (float32 or float64).

    The lattice's bags (``_splat_index``, ``_blur_index``, ...) are reused as they are; only the
    weights are cast to ``dtype``.
    """

    def __init__(self, lattice: PermutohedralLattice, norm: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        if norm.shape != (lattice.num_points,):
            raise ValueError(f"norm must be (N={lattice.num_points},), got {tuple(norm.shape)}")
        self.lattice = lattice
        self.dtype = dtype
        # The products of PermutohedralLattice._scaled (in float32 the same values), then alpha in
        # ``dtype`` so that the slice is exactly alpha times the splat's transpose in float64 too.
        weights = (lattice.weights * norm.to(torch.float32).view(-1, 1)).to(dtype)
        self._splat_weights = weights.reshape(-1)[lattice._splat_order]
        self._slice_weights = weights * lattice.alpha
        self._blur_weights = lattice._blur_weight.to(dtype)

    def apply(self, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``K~(values)`` (``transpose=False``) or ``K~^T(values)``: ``(N, C)`` -> ``(N, C)`` in ``dtype``."""
        lat = self.lattice
        values = values.to(self.dtype).contiguous()
        out = F.embedding_bag(lat._splat_index, values, lat._splat_bags, mode="sum",
                              per_sample_weights=self._splat_weights)
        directions = range(lat.dim, -1, -1) if transpose else range(lat.dim + 1)
        for j in directions:
            out = F.embedding_bag(lat._blur_index[j], out, mode="sum", per_sample_weights=self._blur_weights[j])
        return F.embedding_bag(lat.offsets, out, mode="sum", per_sample_weights=self._slice_weights)


class _FilterFunction(torch.autograd.Function):
    """Autograd of a linear operator: the backward applies the transpose; nothing is saved."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, op: NormalisedFilter) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        return op.apply(values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.op.apply(grad, transpose=True), None


def filter_with_adjoint(values: torch.Tensor, op: NormalisedFilter) -> torch.Tensor:
    """``op.apply(values)`` with a backward that is ``op``'s transpose (no lattice intermediates are
    stored for it). ``values``: ``(N, C)`` in ``op.dtype``; returns ``(N, C)``."""
    return _FilterFunction.apply(values, op)
