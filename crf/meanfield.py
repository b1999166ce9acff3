"""General mean-field inference of a fully connected CRF: any features, any label compatibility, any
of densecrf's normalisations (Krähenbühl & Koltun, NIPS 2011, Sec. 3-4; densecrf 2013's ``DenseCRF``,
``DenseKernel``, ``LabelCompatibility``).

``crf.torch_backend.mean_field`` runs DeepLab's case (Potts weights, symmetric normalisation) as fast
as it can; this module adds what pydensecrf's general API allows (``crf.densecrf``):

* a kernel ``K`` on one :class:`~crf.permutohedral.PermutohedralLattice` of any feature dimension,
  normalised per point with ``norm = K(1)``: ``NORMALIZE_SYMMETRIC`` filters ``n * K(n * Q)`` with
  ``n = 1 / sqrt(norm + 1e-20)``, ``NORMALIZE_BEFORE`` ``K(n * Q)`` and ``NORMALIZE_AFTER`` ``n * K(Q)``
  with ``n = 1 / (norm + 1e-20)``, ``NO_NORMALIZATION`` ``K(Q)``;
* a compatibility ``mu`` turning the filtered ``Q`` into the message: Potts ``-w K~(Q)``, diagonal
  ``diag(w) K~(Q)``, matrix ``(W + W^T) / 2 K~(Q)`` (densecrf symmetrises the matrix; the signs are
  densecrf's: a Potts weight > 0 attracts, a diagonal or matrix entry < 0 does);
* one step: ``Q <- softmax(-U - sum_k mu_k(K~_k(Q)))`` over labels, starting from ``softmax(-U)``.

Layout: points-major ``(N, C)`` float32 tensors, on any device. Several images run as segments of one
lattice (``PermutohedralLattice(segments=...)``), so a batch is one problem with more points.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from .errors import CRFInputError
from .permutohedral import PermutohedralLattice

__all__ = ["KernelType", "NormalizationType", "Compatibility", "Kernel", "build_lattice", "step", "kl_divergence"]


class KernelType(IntEnum):
    """densecrf's kernel types; they differ only in what parameter learning may change, so inference
    is the same for all three."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(IntEnum):
    """densecrf's kernel normalisations (see the module docstring)."""

    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


@dataclass(frozen=True)
class Compatibility:
    """A label compatibility: ``kind`` ``"potts"`` (``value`` a 0-d tensor w), ``"diagonal"`` (``(C,)``)
    or ``"matrix"`` (``(C, C)``, already symmetrised), float32 on the lattice's device."""

    kind: str
    value: torch.Tensor

    def apply(self, filtered: torch.Tensor) -> torch.Tensor:
        """The message ``mu(K~(Q))`` from the filtered ``(N, C)`` values."""
        if self.kind == "potts":
            return filtered * (-self.value)
        if self.kind == "diagonal":
            return filtered * self.value
        return filtered @ self.value.T

    def same_as(self, other: "Compatibility") -> bool:
        return (self.kind == other.kind and self.value.shape == other.value.shape
                and bool(torch.equal(self.value.cpu(), other.value.cpu())))


class Kernel:
    """One pairwise term: a lattice over the points' features, its normalisation and compatibility.

    Args:
        features: float32 ``(N, d)`` features (already divided by the standard deviations), any device.
        compat: the term's :class:`Compatibility`.
        normalization: a :class:`NormalizationType`.
        segments: sizes of point sets that must not interact (a batch of images), or None.
        lattice: the lattice of these features when it is already built (a cache); None builds it.

    Raises:
        CRFInputError (a ValueError): features the lattice refuses (non-finite, a span too large to encode).
    """

    def __init__(self, features: torch.Tensor, compat: Compatibility, normalization: NormalizationType,
                 segments: list[int] | None = None, lattice: PermutohedralLattice | None = None) -> None:
        if lattice is None:
            lattice = build_lattice(features, segments)
        self.lattice = lattice
        self.compat = compat
        self.normalization = NormalizationType(normalization)
        norm = self.lattice.filter_ones()
        if self.normalization == NormalizationType.NORMALIZE_SYMMETRIC:
            self.norm = torch.rsqrt(norm + 1e-20)
        else:
            self.norm = 1.0 / (norm + 1e-20)

    def filter(self, q: torch.Tensor) -> torch.Tensor:
        """``K~(Q)`` of ``(N, C)`` values under the term's normalisation."""
        kind = self.normalization
        if kind == NormalizationType.NORMALIZE_SYMMETRIC:
            return self.lattice.filter(q, scale=self.norm)
        if kind == NormalizationType.NORMALIZE_BEFORE:
            return self.lattice.filter(q * self.norm[:, None])
        out = self.lattice.filter(q)
        if kind == NormalizationType.NORMALIZE_AFTER:
            out = out * self.norm[:, None]
        return out

    def message(self, q: torch.Tensor) -> torch.Tensor:
        """The term's pairwise message ``mu(K~(Q))``, ``(N, C)``."""
        return self.compat.apply(self.filter(q))


def build_lattice(features: torch.Tensor, segments: list[int] | None = None) -> PermutohedralLattice:
    """The lattice of ``(N, d)`` features; the lattice's refusal as a :class:`CRFInputError`."""
    try:
        return PermutohedralLattice(features, segments=segments)
    except ValueError as exc:
        raise CRFInputError(f"pairwise features {tuple(features.shape)}: {exc}") from exc


def step(neg_unary: torch.Tensor, kernels: list[Kernel], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mean-field iteration (densecrf's ``stepInference``).

    Args:
        neg_unary: float32 ``(N, C)``, minus the unary energy. kernels: the pairwise terms, in the order
            they were added. q: float32 ``(N, C)``, the current marginals.

    Returns:
        ``(Q', energy, last message)``: the new marginals ``softmax(energy)``, the energy
        ``-U - sum_k message_k(Q)`` and the last term's message (zeros without terms), all ``(N, C)``.
    """
    energy = neg_unary.clone()
    message = torch.zeros_like(neg_unary)
    for kernel in kernels:
        message = kernel.message(q)
        energy -= message
    return torch.softmax(energy, dim=1), energy, message


def kl_divergence(neg_unary: torch.Tensor, kernels: list[Kernel], q: torch.Tensor) -> float:
    """densecrf's ``klDivergence(Q)``: ``sum Q log max(Q, 1e-20) + sum U Q + sum_k sum Q * message_k(Q)``
    (the mean-field free energy up to a constant), summed in float64; ``(N, C)`` inputs."""
    q64 = q.to(torch.float64)
    total = (q64 * torch.log(q.clamp_min(1e-20).to(torch.float64))).sum()
    total -= (neg_unary.to(torch.float64) * q64).sum()
    for kernel in kernels:
        total += (q64 * kernel.message(q).to(torch.float64)).sum()
    return float(total)
