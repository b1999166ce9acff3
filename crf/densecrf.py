"""A drop-in for ``pydensecrf.densecrf`` on the project's permutohedral lattice (issue #23).

A pydensecrf script changes only its imports::

    import crf.densecrf as dcrf                       # was: import pydensecrf.densecrf as dcrf
    from crf.utils import unary_from_softmax          # was: from pydensecrf.utils import ...

    d = dcrf.DenseCRF2D(width, height, n_labels)
    d.setUnaryEnergy(unary_from_softmax(probs))       # float32 (n_labels, width * height)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
    labels = np.argmax(d.inference(5), axis=0).reshape(height, width)

Names, argument orders, defaults, shapes and dtypes are pydensecrf's (Krähenbühl's densecrf 2013 under
Lucas Beyer's binding); the results are the same labels and marginals to float rounding, because the
lattice (``crf.permutohedral``) reproduces densecrf's step by step and the inference
(``crf.meanfield``) is densecrf's: ``Q = softmax(-U)``, then ``n`` times
``Q = softmax(-U - sum_k mu_k(K~_k(Q)))`` with the terms in the order they were added. Inference of
Potts terms with symmetric normalisation (DeepLab's case) runs on ``crf.torch_backend.mean_field``.

What differs:

* Every input is checked before any work, and where pydensecrf reads past a buffer or computes on
  garbage (an RGBA image, a compatibility vector of the wrong length, NaN in a unary, features of a
  second image size) this module raises :class:`~crf.errors.CRFInputError` (a ``ValueError``) naming the
  method, the argument, what was expected and what was given; wrong dtypes and non-contiguous arrays,
  where pydensecrf's Cython buffers say only "Buffer dtype mismatch" / "ndarray is not C-contiguous",
  say which argument and how to fix it.
* ``inference``, ``startInference`` return numpy ``float32 (n_labels, n_pixels)`` arrays (pydensecrf's
  ``eigen.MatrixXf``, which ``np.array`` turns into the same); ``stepInference`` updates them in place.
* Unsupported (named in the error): ``setUnary`` and ``setUnaryEnergy(u, n)`` (the learning-time unaries
  ``ConstUnary`` / ``LogisticUnary``). Kernel types (``CONST_KERNEL``, ``DIAG_KERNEL``, ``FULL_KERNEL``)
  only say what densecrf's parameter learning may change; inference ignores them, here as there.
* Extras: ``device="cuda"`` on the constructors, and :func:`inference_batch` for many images at once
  (in this process, or on every core with ``workers``).
"""

from __future__ import annotations

from collections import OrderedDict
from numbers import Real
from typing import Any, Sequence

import numpy as np
import torch

from .errors import CRFInputError
from .meanfield import Compatibility, Kernel, KernelType, NormalizationType, build_lattice, kl_divergence, step
from .permutohedral import PermutohedralLattice

__all__ = ["DenseCRF", "DenseCRF2D", "KernelType", "NormalizationType", "CONST_KERNEL", "DIAG_KERNEL",
           "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC",
           "inference_batch"]

CONST_KERNEL = KernelType.CONST_KERNEL
DIAG_KERNEL = KernelType.DIAG_KERNEL
FULL_KERNEL = KernelType.FULL_KERNEL
NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC

_UNSUPPORTED = {
    "ConstUnary": "a learning-time unary; pass its energies to setUnaryEnergy(U) instead",
    "LogisticUnary": "a learning-time unary; pass its energies to setUnaryEnergy(U) instead",
    "Unary": "the base of the learning-time unaries; use setUnaryEnergy(U)",
}


def __getattr__(name: str):
    if name in _UNSUPPORTED:
        raise AttributeError(f"crf.densecrf does not support pydensecrf's {name} ({_UNSUPPORTED[name]})")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _where(method: str, arg: str) -> str:
    return f"{method}: {arg}"


def _float32_array(value: Any, where: str, shape: tuple, contiguous: bool = True, finite: bool = True) -> np.ndarray:
    """``value`` as it must be: a float32 numpy array of ``shape`` (None = any), C-contiguous when
    ``contiguous`` (what pydensecrf's buffers take), finite when ``finite``."""
    if not isinstance(value, np.ndarray):
        raise CRFInputError(f"{where} must be a numpy array, got {type(value).__name__}")
    expected = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        raise CRFInputError(f"{where} must have shape {expected}, got {value.shape}")
    if value.dtype != np.float32:
        raise CRFInputError(f"{where} must be float32, got {value.dtype} (use .astype(np.float32))")
    if contiguous and not value.flags.c_contiguous:
        raise CRFInputError(f"{where} must be C-contiguous, got a strided view of shape {value.shape} "
                            "(use np.ascontiguousarray)")
    if finite and not np.isfinite(value).all():
        raise CRFInputError(f"{where} holds NaN or infinite values")
    return value


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor of ``array``'s values (a read-only array, which torch will not share, is copied)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _positive(value: Any, count: int, where: str) -> tuple[float, ...]:
    """A standard deviation given as one number or ``count`` numbers, each finite and > 0."""
    values = (value,) * count if isinstance(value, Real) else tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else None
    if values is None or len(values) != count or not all(isinstance(v, Real) and np.isfinite(v) and v > 0 for v in values):
        raise CRFInputError(f"{where} must be a number > 0 or {count} of them, got {value!r}")
    return tuple(float(v) for v in values)


def _enum(value: Any, kind: type, where: str):
    try:
        return kind(int(value))
    except (TypeError, ValueError):
        names = ", ".join(f"{m.name} ({m.value})" for m in kind)
        raise CRFInputError(f"{where} must be one of {names}, got {value!r}") from None


class DenseCRF:
    """A fully connected CRF over ``n_pixels`` points and ``n_labels`` labels (pydensecrf's ``DenseCRF``).

    Args:
        n_pixels: N, the number of points (pixels, voxels, ...). n_labels: C >= 1.
        device: extra: where the lattices and the inference run (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Raises:
        CRFInputError (a ValueError): N or C not a positive integer, a bad device, or CUDA asked for and
            not available.
    """

    def __init__(self, n_pixels: int, n_labels: int, *, device: str | torch.device = "cpu") -> None:
        for name, value in (("n_pixels", n_pixels), ("n_labels", n_labels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise CRFInputError(f"{type(self).__name__}: {name} must be an integer >= 1, got {value!r}")
        from .torch_backend import resolve_device

        try:
            self._device = resolve_device(device)
        except (TypeError, RuntimeError) as exc:
            raise CRFInputError(f"{type(self).__name__}: device {device!r}: {exc}") from exc
        self._n, self._c = int(n_pixels), int(n_labels)
        self._neg_unary: torch.Tensor | None = None
        self._terms: list[tuple[torch.Tensor, Compatibility, NormalizationType]] = []
        self._kernels: list[Kernel] | None = None
        self._cache_keys: list[tuple | None] = []  # a term's key in _POSITION_LATTICES, None: built per object

    def __getstate__(self) -> dict:
        # sent to a worker of inference_batch: the model, not the lattices built from it
        return {**self.__dict__, "_kernels": None}

    # ------------------------------------------------------------------ the model
    def setUnaryEnergy(self, u: np.ndarray, n: np.ndarray | None = None) -> None:  # noqa: N802 (pydensecrf's name)
        """Set the unary energy ``U``: float32 C-contiguous ``(n_labels, n_pixels)`` (e.g.
        :func:`crf.utils.unary_from_softmax`, ``-log P``); ``+inf`` forbids a label at a pixel (probability
        0, as ``unary_from_softmax(clip=None)`` gives), as in densecrf.

        Raises:
            CRFInputError: another shape, dtype or layout, NaN or ``-inf``, a pixel where every label is
                ``+inf`` (densecrf's Q would be NaN there), or ``n`` given (pydensecrf's logistic unary
                ``setUnaryEnergy(u, n)`` is not supported).
        """
        if n is not None:
            raise CRFInputError("setUnaryEnergy(u, n) (pydensecrf's LogisticUnaryEnergy) is not supported by "
                                "crf.densecrf; pass the energies U = -log P alone")
        where = _where("setUnaryEnergy", "u (the unary energy)")
        u = _float32_array(u, where, (self._c, self._n), finite=False)
        if not np.isfinite(u).all():
            if np.isnan(u).any() or (u == -np.inf).any():
                raise CRFInputError(f"{where} holds NaN or -inf values")
            blocked = np.isinf(u).all(axis=0)
            if blocked.any():
                raise CRFInputError(f"{where} is +inf for every label at {int(blocked.sum())} pixel(s), e.g. "
                                    f"pixel {int(np.argmax(blocked))}; clip the probabilities (unary_from_softmax's clip)")
        # -U points-major, (n_pixels, n_labels): one pass that negates and transposes
        neg_unary = torch.neg(_tensor(u).T, out=torch.empty(self._n, self._c, dtype=torch.float32))
        self._neg_unary = neg_unary.to(self._device)

    def setUnary(self, u: Any) -> None:  # noqa: N802
        """Not supported: pydensecrf's ``Unary`` objects are for parameter learning.

        Raises:
            CRFInputError: always.
        """
        raise CRFInputError("setUnary (pydensecrf's Unary objects) is not supported by crf.densecrf; "
                            "use setUnaryEnergy(U) with U float32 (n_labels, n_pixels)")

    def addPairwiseEnergy(self, features: np.ndarray, compat: Any, kernel: int = DIAG_KERNEL,  # noqa: N802
                          normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """Add a Gaussian pairwise term on arbitrary features.

        Args:
            features: float32 C-contiguous ``(D, n_pixels)``, any D >= 1, already divided by the kernel's
                standard deviations (:func:`crf.utils.create_pairwise_gaussian` / ``_bilateral``).
            compat: a number (Potts weight w: ``-w K~(Q)``), a ``(n_labels,)`` vector (diagonal) or an
                ``(n_labels, n_labels)`` matrix (symmetrised as ``(W + W^T) / 2``), as in densecrf.
            kernel: ``CONST_KERNEL``, ``DIAG_KERNEL`` or ``FULL_KERNEL`` (the same inference).
            normalization: ``NO_NORMALIZATION``, ``NORMALIZE_BEFORE``, ``NORMALIZE_AFTER`` or
                ``NORMALIZE_SYMMETRIC``.

        Raises:
            CRFInputError: a bad shape, dtype, layout or value of any argument (named).
        """
        method = "addPairwiseEnergy"
        features = _float32_array(features, _where(method, "features"), (None, self._n))
        if features.shape[0] < 1:
            raise CRFInputError(f"{method}: features must have D >= 1 rows, got shape {features.shape}")
        self._add(_tensor(features).T, compat, kernel, normalization, method)

    def _add(self, features: torch.Tensor, compat: Any, kernel: Any, normalization: Any, method: str,
             cache_key: tuple | None = None) -> None:
        _enum(kernel, KernelType, _where(method, "kernel"))
        norm = _enum(normalization, NormalizationType, _where(method, "normalization"))
        comp = self._compat(compat, _where(method, "compat"))
        # a copy: pydensecrf copies at this call, so later changes to the caller's array do not count
        self._terms.append((features.to(self._device, torch.float32).contiguous().clone(), comp, norm))
        self._cache_keys.append(cache_key)
        self._kernels = None

    def _compat(self, compat: Any, where: str) -> Compatibility:
        c = self._c
        if isinstance(compat, Real) and not isinstance(compat, bool):
            if not np.isfinite(compat):
                raise CRFInputError(f"{where} must be finite, got {compat!r}")
            return Compatibility("potts", torch.tensor(float(compat), dtype=torch.float32, device=self._device))
        try:
            array = np.asarray(compat)
        except Exception:  # noqa: BLE001 - any object numpy cannot take
            array = None
        if array is None or array.dtype.kind not in "fiu" or array.ndim not in (1, 2):
            raise CRFInputError(f"{where} must be a number (Potts), a ({c},) vector (diagonal) or a ({c}, {c}) "
                                f"matrix of real numbers, got {compat!r:.80}")
        if array.shape not in ((c,), (c, c)):
            raise CRFInputError(f"{where} must be ({c},) or ({c}, {c}) for n_labels={c}, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise CRFInputError(f"{where} holds NaN or infinite values")
        value = torch.from_numpy(array.astype(np.float32)).to(self._device)
        if array.ndim == 1:
            return Compatibility("diagonal", value)
        return Compatibility("matrix", (value + value.T) * 0.5)

    # ------------------------------------------------------------------ inference
    def _minus_unary(self) -> torch.Tensor:
        """``-U``, ``(n_pixels, n_labels)``; densecrf takes no unary as a zero unary."""
        if self._neg_unary is None:
            return torch.zeros(self._n, self._c, dtype=torch.float32, device=self._device)
        return self._neg_unary

    def _ready(self) -> tuple[torch.Tensor, list[Kernel]]:
        """``-U`` and the terms' kernels (their lattices built on first use and kept)."""
        if self._kernels is None:
            self._kernels = [Kernel(f, comp, norm, lattice=_position_lattice(key, f))
                             for (f, comp, norm), key in zip(self._terms, self._cache_keys)]
        return self._minus_unary(), self._kernels

    def inference(self, n_iterations: int) -> np.ndarray:
        """Run ``n_iterations`` mean-field iterations from ``softmax(-U)``.

        Returns:
            float32 ``(n_labels, n_pixels)`` marginals Q (softmax over labels), column-major as
            pydensecrf's; the labels are ``np.argmax(Q, axis=0)``.

        Raises:
            CRFInputError: ``n_iterations`` not an integer >= 0.
        """
        return inference_batch([self], n_iterations)[0]

    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: N802
        """``(Q, tmp1, tmp2)`` for :meth:`stepInference`: Q = softmax(-U), two scratch arrays; all float32
        ``(n_labels, n_pixels)`` in pydensecrf's column-major layout."""
        neg_unary, _ = self._ready()
        q = torch.softmax(neg_unary, dim=1).cpu().numpy().T
        shape = (self._c, self._n)
        return q, np.zeros(shape, np.float32, order="F"), np.zeros(shape, np.float32, order="F")

    def stepInference(self, Q: np.ndarray, tmp1: np.ndarray, tmp2: np.ndarray) -> None:  # noqa: N802,N803
        """One mean-field iteration, in place: ``Q <- softmax(tmp1)`` with ``tmp1 = -U - sum_k
        message_k(Q)``; ``tmp2`` gets the last term's message (as densecrf leaves them).

        Raises:
            CRFInputError: an argument that is not a writable float32 ``(n_labels, n_pixels)`` array (named).
        """
        arrays = {}
        for name, value in (("Q", Q), ("tmp1", tmp1), ("tmp2", tmp2)):
            arrays[name] = _float32_array(value, _where("stepInference", name), (self._c, self._n), contiguous=False)
            if not value.flags.writeable:
                raise CRFInputError(f"stepInference: {name} must be writable (it is updated in place)")
        neg_unary, kernels = self._ready()
        q = _tensor(np.ascontiguousarray(Q.T)).to(self._device)
        with torch.no_grad():
            new_q, energy, message = step(neg_unary, kernels, q)
        for target, value in ((Q, new_q), (tmp1, energy), (tmp2, message)):
            target[...] = value.T.cpu().numpy()

    def klDivergence(self, Q: np.ndarray) -> float:  # noqa: N802,N803
        """densecrf's ``klDivergence(Q)``: the KL divergence of Q to the CRF's distribution up to a
        constant, ``sum Q log Q + sum U Q + sum_k sum Q * message_k(Q)``.

        Raises:
            CRFInputError: ``Q`` not float32 ``(n_labels, n_pixels)``, or not finite.
        """
        Q = _float32_array(np.asarray(Q), _where("klDivergence", "Q"), (self._c, self._n), contiguous=False)
        neg_unary, kernels = self._ready()
        with torch.no_grad():
            return kl_divergence(neg_unary, kernels, _tensor(np.ascontiguousarray(Q.T)).to(self._device))


class DenseCRF2D(DenseCRF):
    """A fully connected CRF over an image of ``width`` x ``height`` pixels (pydensecrf's ``DenseCRF2D``);
    pixel ``y * width + x`` is the unary's column.

    Args:
        width, height: the image size in pixels (note the order: width first). n_labels: C.
        device: as for :class:`DenseCRF`.
    """

    def __init__(self, width: int, height: int, n_labels: int, *, device: str | torch.device = "cpu") -> None:
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise CRFInputError(f"DenseCRF2D: {name} must be an integer >= 1, got {value!r}")
        super().__init__(int(width) * int(height), n_labels, device=device)
        self._w, self._h = int(width), int(height)

    def _positions(self, sx: float, sy: float) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(self._h, dtype=torch.float32, device=self._device),
                                torch.arange(self._w, dtype=torch.float32, device=self._device), indexing="ij")
        return torch.stack([xs.reshape(-1) / torch.tensor(sx, dtype=torch.float32),
                            ys.reshape(-1) / torch.tensor(sy, dtype=torch.float32)], dim=1)

    def addPairwiseGaussian(self, sxy: Any, compat: Any, kernel: int = DIAG_KERNEL,  # noqa: N802
                            normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """Add the smoothness kernel on ``(x / sx, y / sy)``; ``sxy`` one number or ``(sx, sy)`` pixels.
        ``compat``, ``kernel``, ``normalization``: as in :meth:`DenseCRF.addPairwiseEnergy`.

        Raises:
            CRFInputError: a bad argument (named).
        """
        sx, sy = _positive(sxy, 2, "addPairwiseGaussian: sxy")
        key = (self._w, self._h, sx, sy, str(self._device))
        self._add(self._positions(sx, sy), compat, kernel, normalization, "addPairwiseGaussian", key)

    def addPairwiseBilateral(self, sxy: Any, srgb: Any, rgbim: np.ndarray, compat: Any,  # noqa: N802
                             kernel: int = DIAG_KERNEL, normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """Add the appearance kernel on ``(x / sx, y / sy, r / sr, g / sg, b / sb)``.

        Args:
            sxy: one number or ``(sx, sy)``, pixels. srgb: one number or ``(sr, sg, sb)``, colour units.
            rgbim: uint8 C-contiguous ``(height, width, 3)`` image.
            compat, kernel, normalization: as in :meth:`DenseCRF.addPairwiseEnergy`.

        Raises:
            CRFInputError: a bad argument (named), e.g. an image of another size, RGBA, float or strided.
        """
        method = "addPairwiseBilateral"
        sx, sy = _positive(sxy, 2, f"{method}: sxy")
        srgb = _positive(srgb, 3, f"{method}: srgb")
        if not isinstance(rgbim, np.ndarray):
            raise CRFInputError(f"{method}: rgbim must be a numpy array, got {type(rgbim).__name__}")
        if rgbim.shape != (self._h, self._w, 3):
            raise CRFInputError(f"{method}: rgbim must be (height, width, 3) = ({self._h}, {self._w}, 3), "
                                f"got {rgbim.shape}")
        if rgbim.dtype != np.uint8:
            raise CRFInputError(f"{method}: rgbim must be uint8 RGB 0..255, got {rgbim.dtype}")
        if not rgbim.flags.c_contiguous:
            raise CRFInputError(f"{method}: rgbim must be C-contiguous, got a strided view "
                                "(use np.ascontiguousarray)")
        colour = _tensor(rgbim).to(self._device).reshape(-1, 3).to(torch.float32)
        colour = colour / torch.tensor(srgb, dtype=torch.float32, device=self._device)
        self._add(torch.cat([self._positions(sx, sy), colour], dim=1), compat, kernel, normalization, method)


#: The lattices of addPairwiseGaussian depend only on the image size and sxy: the last few are kept for
#: the CRFs that follow (a script's next image of the same size).
_POSITION_LATTICES: "OrderedDict[tuple, PermutohedralLattice]" = OrderedDict()
_POSITION_LATTICES_SIZE = 4


def _position_lattice(key: tuple | None, features: torch.Tensor) -> PermutohedralLattice | None:
    """The cached lattice of ``key`` (built from ``features`` on a miss); None when ``key`` is None."""
    if key is None:
        return None
    lattice = _POSITION_LATTICES.get(key)
    if lattice is None:
        lattice = _POSITION_LATTICES[key] = build_lattice(features)
        while len(_POSITION_LATTICES) > _POSITION_LATTICES_SIZE:
            _POSITION_LATTICES.popitem(last=False)
    else:
        _POSITION_LATTICES.move_to_end(key)
    return lattice


def _check_batch(crfs: Sequence[DenseCRF]) -> None:
    if not crfs or not all(isinstance(c, DenseCRF) for c in crfs):
        raise CRFInputError("inference_batch needs a non-empty sequence of DenseCRF / DenseCRF2D objects")
    first = crfs[0]
    for b, other in enumerate(crfs[1:], start=1):
        if other._c != first._c or other._device != first._device or len(other._terms) != len(first._terms):
            raise CRFInputError(f"inference_batch: crfs[{b}] has {other._c} labels, {len(other._terms)} terms on "
                                f"{other._device}; crfs[0] has {first._c}, {len(first._terms)} on {first._device}")
        for k, ((f0, c0, n0), (f1, c1, n1)) in enumerate(zip(first._terms, other._terms)):
            if f0.shape[1] != f1.shape[1] or n0 != n1 or not c0.same_as(c1):
                raise CRFInputError(f"inference_batch: term {k} of crfs[{b}] differs from crfs[0]'s (feature "
                                    "dimension, compatibility or normalization); batch CRFs of one model only")


def inference_batch(crfs: Sequence[DenseCRF], n_iterations: int, *, workers: int | None = 1) -> list[np.ndarray]:
    """Extra: the inference of several CRFs of one model at once (images of any sizes), in this process or
    on every core.

    The CRFs must have the same labels, device, and terms of the same kind in the same order (feature
    dimension, compatibility, normalization). With ``workers=1`` their points run as separate segments
    of one lattice per term in this process (on CUDA: one batch on the GPU). With ``workers`` None (one
    per available core) or > 1, on CPU, each CRF is one task of a pool of single-threaded worker
    processes (``crf.pool``; the layout that stays fast on a busy machine), the way a pipeline would run
    pydensecrf on every core; the pool is started on first use and kept for later calls with the same
    number of workers. Either way each result equals ``crfs[b].inference(n_iterations)``.

    Returns:
        One float32 ``(n_labels, n_pixels_b)`` array per CRF (column-major, as pydensecrf's), in order.

    Raises:
        CRFInputError: an empty batch, CRFs of different models (the first difference named),
            ``n_iterations`` not an integer >= 0, or ``workers`` not None or an integer >= 1.
        CRFTaskError: a worker process died (e.g. killed for memory).
    """
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, (int, np.integer)) or n_iterations < 0:
        raise CRFInputError(f"inference: n_iterations must be an integer >= 0, got {n_iterations!r}")
    from .pool import resolve_workers

    workers = resolve_workers(workers)
    _check_batch(crfs)
    if workers > 1 and len(crfs) > 1 and crfs[0]._device.type == "cpu":
        return _inference_pooled(crfs, int(n_iterations), workers)
    sizes = [c._n for c in crfs]
    if len(crfs) == 1:
        neg_unary, kernels = crfs[0]._ready()
    else:
        neg_unary = torch.cat([c._minus_unary() for c in crfs], dim=0)
        kernels = [Kernel(torch.cat([c._terms[k][0] for c in crfs]), comp, norm, segments=sizes)
                   for k, (_, comp, norm) in enumerate(crfs[0]._terms)]
    with torch.no_grad():
        q = _infer(neg_unary, kernels, int(n_iterations))
    # (n_labels, n_pixels) views of (n_pixels, n_labels) memory: the layout of pydensecrf's MatrixXf
    return [part.cpu().numpy().T for part in torch.split(q.contiguous(), sizes, dim=0)]


#: The worker pool of inference_batch(workers > 1): (workers, executor), started on first use.
_POOL: list = []


def _inference_pooled(crfs: Sequence[DenseCRF], n_iterations: int, workers: int) -> list[np.ndarray]:
    """Each CRF's ``inference(n_iterations)`` as one task of the kept pool of ``workers`` processes."""
    from concurrent.futures.process import BrokenProcessPool

    from .errors import CRFTaskError
    from .pool import make_executor

    if _POOL and _POOL[0][0] != workers:
        _POOL.pop()[1].shutdown()
    if not _POOL:
        _POOL.append((workers, make_executor(workers, "torch")))
    try:
        return list(_POOL[0][1].map(_inference_task, crfs, [n_iterations] * len(crfs)))
    except BrokenProcessPool as exc:
        _POOL.pop()
        raise CRFTaskError(f"inference_batch: a worker process died ({exc}); was it killed for memory?") from exc


def _inference_task(crf: DenseCRF, n_iterations: int) -> np.ndarray:
    """In a worker: one CRF's inference (pickled back by value, in its column-major layout)."""
    return crf.inference(n_iterations)


def _infer(neg_unary: torch.Tensor, kernels: list[Kernel], iterations: int) -> torch.Tensor:
    """``(N, C)`` marginals after ``iterations`` steps; Potts terms with symmetric normalisation (DeepLab's
    model) take ``crf.torch_backend.mean_field``, which applies the weights on the lattice."""
    if kernels and all(k.compat.kind == "potts" and k.normalization == NORMALIZE_SYMMETRIC for k in kernels):
        from .torch_backend import PairwiseTerm, mean_field_points

        terms = [PairwiseTerm(k.lattice, k.compat.value.reshape(1), norm=k.norm) for k in kernels]
        return mean_field_points(neg_unary, terms, iterations)
    q = torch.softmax(neg_unary, dim=1)
    for _ in range(iterations):
        q = step(neg_unary, kernels, q)[0]
    return q
