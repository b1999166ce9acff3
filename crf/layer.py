"""The fully connected CRF as a trainable layer: mean-field inference unrolled as a recurrent network
(CRF-as-RNN, Zheng et al., ICCV 2015), on the exact lattice of the post-hoc CRF.

One iteration is densecrf's ``stepInference`` with a matrix compatibility shared by the two kernels:

    ``Q = softmax(E)``;  ``m = w1 K~_bil(Q) + w2 K~_gauss(Q)``;  ``E <- S - m mu^T``,

starting from ``E = S`` (the scores, logits), with ``K~`` the symmetrically normalised lattice filters
of :mod:`crf.torch_backend` (the same lattices, features and normalisation). With ``mu = -I`` (Potts, as
CRF-RNN initialises it) this is exactly the post-hoc CRF: ``E = S + w1 K~_bil(Q) + w2 K~_gauss(Q)``, and
the scores play the part of ``-U`` (``log P`` up to a per-pixel constant, which softmax ignores).

Learnable: the kernel weights (``w = w_init * exp(g)`` with a learnable log-gain ``g`` initialised 0, so
they stay positive and start exactly at ``params``) and the compatibility ``mu = (W + W^T) / 2`` of a
learnable ``C x C`` matrix ``W`` initialised ``-I`` (symmetric as densecrf's ``MatrixCompatibility``,
so a learned ``mu`` runs unchanged in ``crf.densecrf`` and pydensecrf). The kernel widths define the
lattices and stay fixed.

Gradients: the filters go through :func:`crf._adjoint.filter_with_adjoint`, whose backward is the
filter's exact transpose on the same lattice, so backward keeps per iteration only a few ``(N H W, C)``
tensors (Q, the two filtered Q, the message), never the lattice passes.

Source: Krähenbühl & Koltun NIPS 2011 / ICML 2013; Zheng et al. ICCV 2015 Sec. 4; DeepLab v1 Sec. 6;
issue #24.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ._adjoint import NormalisedFilter, filter_with_adjoint
from .errors import CRFInputError
from .meanfield import build_lattice
from .params import CRFParams
from .permutohedral import PermutohedralLattice, bilateral_features, gaussian_features
from .memory import reuse_freed_memory
from .torch_backend import symmetric_normalization

__all__ = ["DenseCRFLayer", "CRFLattices", "LEARNABLE"]

#: The parameters a :class:`DenseCRFLayer` can learn.
LEARNABLE = ("w1", "w2", "compatibility")


@dataclass
class CRFLattices:
    """The two lattices (and normalisations) of a batch of images, built by :meth:`DenseCRFLayer.prepare`.

    Reusable for any scores over the same images (e.g. every step of a parameter fit). ``shape`` is
    ``(N, H, W)``; ``bilateral``/``gaussian`` are None for a kernel the layer skips (weight 0, not learned).
    """

    shape: tuple[int, int, int]
    device: torch.device
    bilateral: tuple[PermutohedralLattice, torch.Tensor] | None
    gaussian: tuple[PermutohedralLattice, torch.Tensor] | None
    _ops: dict = field(default_factory=dict, repr=False)

    def ops(self, dtype: torch.dtype) -> list[tuple[str, NormalisedFilter]]:
        """(kernel name, filter in ``dtype``) of each kernel present."""
        if dtype not in self._ops:
            self._ops[dtype] = [(name, NormalisedFilter(lat, norm, dtype))
                                for name, pair in (("w1", self.bilateral), ("w2", self.gaussian))
                                if pair is not None for lat, norm in [pair]]
        return self._ops[dtype]


def _lattice_and_norm(features: torch.Tensor, segments: list[int]) -> tuple[PermutohedralLattice, torch.Tensor]:
    lattice = build_lattice(features, segments if len(segments) > 1 else None)
    return lattice, symmetric_normalization(lattice)


class DenseCRFLayer(nn.Module):
    """Mean-field inference of the dense CRF with learnable kernel weights and label compatibility.

    Args:
        num_classes: C, the number of labels (>= 1).
        params: the CRF parameters; ``w1``/``w2`` are the initial kernel weights, the standard deviations
            define the lattices (fixed), ``iterations`` is the default number of iterations.
        learn: which of ``"w1"``, ``"w2"``, ``"compatibility"`` are ``nn.Parameter`` s; the others are
            fixed buffers. A learned weight must start > 0 (it is log-parametrised).
        iterations: mean-field iterations (>= 0; 0 returns the scores); None takes ``params.iterations``.

    Parameters (when learned): ``w1_log_gain``, ``w2_log_gain`` (0-d; ``w = params.w * exp(gain)``) and
    ``compatibility_raw`` (``(C, C)``, initialised ``-I``; the compatibility is its symmetric part).

    Raises:
        CRFInputError (a ValueError): a bad ``num_classes``, ``params``, ``learn`` entry (named) or
            ``iterations``, or a learned weight that starts at 0.

    Source: Zheng et al. ICCV 2015 (CRF-as-RNN); issue #24.
    """

    def __init__(self, num_classes: int, params: CRFParams, learn: Sequence[str] = LEARNABLE,
                 iterations: int | None = None) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise CRFInputError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not isinstance(params, CRFParams):
            raise CRFInputError(f"params must be a crf.params.CRFParams, got {type(params).__name__}")
        if isinstance(learn, str):
            raise CRFInputError(f"learn must be a sequence of names from {list(LEARNABLE)}, got the string {learn!r}")
        learn = tuple(learn)
        unknown = [name for name in learn if name not in LEARNABLE]
        if unknown or len(set(learn)) != len(learn):
            raise CRFInputError(f"learn must be distinct names from {list(LEARNABLE)}, got {list(learn)}")
        if iterations is None:
            iterations = params.iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise CRFInputError(f"iterations must be an integer >= 0, got {iterations!r}")
        self.num_classes, self.params, self.learn, self.iterations = num_classes, params, learn, iterations
        for name in ("w1", "w2"):
            initial = getattr(params, name)
            if name in learn and initial <= 0:
                raise CRFInputError(f"CRFParams.{name} = {initial} cannot be learned: a learned kernel weight is "
                                    "log-parametrised and must start > 0")
            self.register_buffer(f"{name}_initial", torch.tensor(initial, dtype=torch.float32))
            gain = torch.zeros((), dtype=torch.float32)
            if name in learn:
                self.register_parameter(f"{name}_log_gain", nn.Parameter(gain))
            else:
                self.register_buffer(f"{name}_log_gain", gain)
        potts = -torch.eye(num_classes, dtype=torch.float32)
        if "compatibility" in learn:
            self.compatibility_raw = nn.Parameter(potts)
        else:
            self.register_buffer("compatibility_raw", potts)
        self._gaussian_cache: tuple | None = None

    # ------------------------------------------------------------------ current values
    def kernel_weight(self, name: str) -> torch.Tensor:
        """The current weight ``w1`` or ``w2`` (0-d, differentiable, the parameters' dtype)."""
        return getattr(self, f"{name}_initial") * torch.exp(getattr(self, f"{name}_log_gain"))

    def compatibility(self) -> torch.Tensor:
        """The current ``(C, C)`` label compatibility ``mu = (W + W^T) / 2`` (differentiable); ``-I`` is
        Potts (densecrf's sign convention: a negative entry attracts)."""
        raw = self.compatibility_raw
        return (raw + raw.T) / 2

    def current_params(self) -> CRFParams:
        """``params`` with the current kernel weights (the compatibility is :meth:`compatibility`)."""
        values = self.params.to_dict()
        with torch.no_grad():
            values.update(w1=float(self.kernel_weight("w1")), w2=float(self.kernel_weight("w2")))
        return CRFParams.from_dict(values)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, params={self.params}, learn={list(self.learn)}, iterations={self.iterations}"

    # ------------------------------------------------------------------ lattices
    def _uses(self, name: str) -> bool:
        return name in self.learn or getattr(self.params, name) != 0

    def prepare(self, images: torch.Tensor) -> CRFLattices:
        """The lattices of ``images`` (N, 3, H, W), RGB 0..255, uint8 or float, on the device to compute on.

        Raises:
            CRFInputError (a ValueError): ``images`` is not (N, 3, H, W), not finite, or outside 0..255.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.numel() == 0:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise CRFInputError(f"images must be a tensor (N, 3, H, W) of RGB values 0..255, got {shape}")
        if images.dtype != torch.uint8:
            if not torch.is_floating_point(images):
                raise CRFInputError(f"images must be uint8 or float RGB 0..255, got dtype {images.dtype}")
            low, high = float(images.min()), float(images.max())
            if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 255:
                raise CRFInputError(f"images must be RGB values in 0..255, got values in [{low}, {high}]")
        n, _, h, w = (int(s) for s in images.shape)
        device = images.device
        segments = [h * w] * n
        with torch.no_grad():
            bilateral = gaussian = None
            if self._uses("w1"):
                p = self.params
                features = torch.cat([bilateral_features(im, p.sigma_alpha, p.sigma_beta)
                                      for im in images.permute(0, 2, 3, 1)])
                bilateral = _lattice_and_norm(features, segments)
            if self._uses("w2"):
                key = (n, h, w, str(device), self.params.sigma_gamma)
                if self._gaussian_cache is None or self._gaussian_cache[0] != key:
                    features = gaussian_features(h, w, self.params.sigma_gamma, device=device).repeat(n, 1)
                    self._gaussian_cache = (key, _lattice_and_norm(features, segments))
                gaussian = self._gaussian_cache[1]
        return CRFLattices((n, h, w), device, bilateral, gaussian)

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor | None, scores: torch.Tensor, *,
                lattices: CRFLattices | None = None, iterations: int | None = None) -> torch.Tensor:
        """Mean-field refined scores.

        Args:
            images: RGB ``(N, 3, H, W)``, 0..255, uint8 or float, on the scores' device (may be None when
                ``lattices`` is given).
            scores: ``(N, C, H, W)`` logits (``log P`` up to a per-pixel constant), float. float64 runs in
                float64 (for ``gradcheck``); any other dtype, and any autocast, in float32.
            lattices: :meth:`prepare` of these images, to reuse; None builds them.
            iterations: overrides the layer's ``iterations`` for this call.

        Returns:
            ``(N, C, H, W)`` logits ``E`` after the iterations (float32, or float64 for float64 scores);
            ``softmax(E, dim=1)`` is the mean-field Q. Differentiable with respect to ``scores`` and the
            learned parameters (not the images).

        Raises:
            CRFInputError (a ValueError): bad shapes (named), C other than ``num_classes``, scores not
                float or not finite, images on another device, lattices of other images, bad iterations.
        """
        if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or not torch.is_floating_point(scores):
            desc = f"{tuple(scores.shape)} {scores.dtype}" if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise CRFInputError(f"scores must be a float tensor (N, C, H, W), got {desc}")
        n, c, h, w = (int(s) for s in scores.shape)
        if c != self.num_classes:
            raise CRFInputError(f"scores have C={c} classes, the layer has num_classes={self.num_classes}")
        if not bool(torch.isfinite(scores).all()):
            raise CRFInputError("scores must be finite (logits, not log of probabilities that are 0)")
        iterations = self.iterations if iterations is None else iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise CRFInputError(f"iterations must be an integer >= 0, got {iterations!r}")
        if lattices is None:
            if images is None:
                raise CRFInputError("images are needed when no lattices are given")
            if isinstance(images, torch.Tensor) and images.dim() == 4:
                if images.device != scores.device:
                    raise CRFInputError(f"images are on {images.device}, scores on {scores.device}")
                if (images.shape[0], *images.shape[2:]) != (n, h, w):
                    raise CRFInputError(f"images {tuple(images.shape)} do not match scores {tuple(scores.shape)}")
            lattices = self.prepare(images)
        elif lattices.shape != (n, h, w) or lattices.device != scores.device:
            raise CRFInputError(f"lattices of {lattices.shape} on {lattices.device} do not match scores "
                                f"{tuple(scores.shape)} on {scores.device}")
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        if scores.device.type == "cpu":
            reuse_freed_memory()  # as the post-hoc backend: freed (P, C) blocks reused, not page-faulted anew
        with torch.autocast(device_type=scores.device.type, enabled=False):
            unary = scores.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)
            energy = self._mean_field(unary, lattices.ops(dtype), iterations, dtype)
        return energy.reshape(n, h, w, c).permute(0, 3, 1, 2)

    def _mean_field(self, unary: torch.Tensor, ops: list[tuple[str, NormalisedFilter]], iterations: int,
                    dtype: torch.dtype) -> torch.Tensor:
        """``iterations`` steps from ``E = unary`` on points-major ``(P, C)`` values; returns ``E``."""
        weights = [(self.kernel_weight(name).to(dtype), op) for name, op in ops]
        mu_t = self.compatibility().to(dtype).T
        energy = unary
        for _ in range(iterations):
            q = torch.softmax(energy, dim=1)
            message = None
            for weight, op in weights:
                term = weight * filter_with_adjoint(q, op)
                message = term if message is None else message + term
            if message is None:
                break
            energy = unary - message @ mu_t
        return energy
