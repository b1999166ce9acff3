"""Fully connected CRF mean-field inference in PyTorch (same code on CPU and CUDA), batched.

Reimplements the inference of Krähenbühl & Koltun (NIPS 2011) as ``pydensecrf`` runs it for
DeepLab v1 (Chen et al., ICLR 2015, Sec. 4.2; the release's ``run_densecrf.sh``):

* unary ``U = -log(clip(P, PROB_EPSILON, 1))`` from class probabilities ``P`` (as ``pydensecrf.utils.
  unary_from_softmax``); DeepLab's raw-score unaries differ by a per-pixel constant, which
  mean-field inference ignores;
* a Gaussian (smoothness) kernel on ``(x, y) / sigma_gamma`` with Potts weight ``w2`` and a bilateral
  (appearance) kernel on ``((x, y) / sigma_alpha, (r, g, b) / sigma_beta)`` with Potts weight ``w1``
  (``addPairwiseGaussian(sxy=sigma_gamma, compat=w2)``, ``addPairwiseBilateral(sxy=sigma_alpha,
  srgb=sigma_beta, compat=w1)``), each filtered on a permutohedral lattice
  (:mod:`crf.permutohedral`) with densecrf's default symmetric normalisation
  ``K~(Q) = n * K(n * Q)``, ``n = 1 / sqrt(K(1) + 1e-20)`` (the filter includes the pixel itself);
* densecrf's ``inference(T)``: ``Q = softmax(-U)``; ``T`` times: ``Q = softmax(-U + sum_k w_k K~_k(Q))``
  (``PottsCompatibility(w)`` turns a filtered ``Q`` into ``-w K~(Q)``, which is subtracted).

Speed comes from sharing: a lattice is built once per (image, kernel standard deviations) and reused
for all iterations and for every configuration that shares those standard deviations; the
configurations' ``Q`` run as extra channels through one filter. Several images run through one
lattice whose point sets are kept apart (:class:`~crf.permutohedral.PermutohedralLattice` segments).
Channels are filtered in chunks and configurations in batches so that memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .dense import PROB_EPSILON, check_inputs
from .params import CRFParams
from .permutohedral import PermutohedralLattice, bilateral_features, gaussian_features

__all__ = [
    "PairwiseTerm",
    "mean_field",
    "unary_from_probs",
    "symmetric_normalization",
    "resolve_device",
    "dense_crf_torch",
    "dense_crf_torch_grid",
    "dense_crf_torch_batch",
    "dense_crf_tensor",
]

# One unary convention for both backends: probabilities clipped at crf.dense.PROB_EPSILON before the log.
PROB_CLIP = PROB_EPSILON
#: Default bound on the working memory of one inference call, in MiB (lattice filtering and the
#: configurations' Q); larger problems run in chunks of channels and batches of configurations.
DEFAULT_MEMORY_MB = 1024


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device``; raises RuntimeError for CUDA when it is not available."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {str(device)!r} was requested for the dense CRF but CUDA is not available "
            "(torch.cuda.is_available() is False); use device='cpu'"
        )
    return dev


def unary_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Unary energy ``-log(clip(probs, PROB_EPSILON, 1))``, float32, the same as the pydensecrf backend's."""
    return -torch.log(probs.to(torch.float32).clamp(PROB_CLIP, 1.0))


def symmetric_normalization(lattice: PermutohedralLattice) -> torch.Tensor:
    """densecrf's NORMALIZE_SYMMETRIC factor ``1 / sqrt(K(1) + 1e-20)``, float32 ``(N,)``."""
    ones = torch.ones(lattice.num_points, 1, dtype=torch.float32, device=lattice.device)
    return torch.rsqrt(lattice.filter(ones)[:, 0] + 1e-20)


@dataclass
class PairwiseTerm:
    """One Potts pairwise kernel of a CRF: a lattice, its normalisation and a weight per configuration.

    Args:
        lattice: the kernel's permutohedral lattice over all N points.
        weights: float32 ``(k,)`` Potts weights (``w1`` or ``w2``), one per configuration in ``members``.
        members: int64 ``(k,)`` indices of the configurations (along K of :func:`mean_field`) that use
            this kernel, increasing; None = all K configurations, in order.
        norm: float32 ``(N,)`` normalisation; None = computed with :func:`symmetric_normalization`.
    """

    lattice: PermutohedralLattice
    weights: torch.Tensor
    members: torch.Tensor | None = None
    norm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.norm is None:
            self.norm = symmetric_normalization(self.lattice)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32, device=self.lattice.device).reshape(-1)


#: On CPU, sparse products over a few dozen channels at a time stay cache-friendlier than very wide
#: ones (measured with tools/bench_crf.py on VOC-sized images); on CUDA wider is better.
CPU_CHANNEL_CAP = 42


def _channel_chunk(lattice: PermutohedralLattice, memory_mb: float) -> int:
    # filter() holds four (M + 1, c) lattice buffers and about three (N, c) tensors per chunk.
    per_channel = 4 * (4 * (lattice.num_lattice + 1) + 3 * lattice.num_points)
    chunk = max(1, int(memory_mb * 2**20 // per_channel))
    return min(chunk, CPU_CHANNEL_CAP) if lattice.device.type == "cpu" else chunk


def mean_field(
    unary: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    iterations: int = 10,
    *,
    num_configs: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> torch.Tensor:
    """Mean-field inference of a fully connected CRF with Potts kernels (densecrf's ``inference``).

    Args:
        unary: float32 ``(K, C, N)`` unary energies of K configurations (or K problems) with C labels
            over N points, or ``(1, C, N)`` / ``(C, N)`` shared by all ``num_configs`` configurations
            (then the first iteration's messages are computed once and only scaled per weight).
        terms: the pairwise kernels; each lists the configurations it applies to and their weights.
        iterations: number of mean-field iterations (10 in DeepLab).
        num_configs: K when ``unary`` is shared; default ``unary.shape[0]``.
        memory_mb: bound on the filter's working memory; channels are filtered in chunks within it.

    Returns:
        float32 ``(K, C, N)`` marginals Q (softmax over C) on the unary's device.

    Raises:
        ValueError: wrong shapes, a term's lattice with another N, members out of range, or
            ``iterations`` < 0.
    """
    if unary.dim() == 2:
        unary = unary.unsqueeze(0)
    if unary.dim() != 3:
        raise ValueError(f"unary must be (K, C, N), got shape {tuple(unary.shape)}")
    k_in, c, n = unary.shape
    k = int(num_configs) if num_configs is not None else k_in
    if k_in not in (1, k):
        raise ValueError(f"unary has K={k_in} configurations but num_configs={k}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    device = unary.device
    plans = []
    for index, term in enumerate(terms):
        if term.lattice.num_points != n:
            raise ValueError(f"terms[{index}]: lattice has N={term.lattice.num_points} points, unary has N={n}")
        members = term.members
        if members is None:
            members_t, full = torch.arange(k, device=device), True
        else:
            members_t = torch.as_tensor(members, dtype=torch.int64, device=device).reshape(-1)
            if members_t.numel() and (int(members_t.min()) < 0 or int(members_t.max()) >= k):
                raise ValueError(f"terms[{index}]: members must lie in [0, {k}), got {members_t.tolist()}")
            full = members_t.numel() == k and bool((members_t == torch.arange(k, device=device)).all())
        if term.weights.numel() != members_t.numel():
            raise ValueError(
                f"terms[{index}]: {term.weights.numel()} weights for {members_t.numel()} member configurations"
            )
        if members_t.numel() == 0 or not bool((term.weights != 0).any()):
            continue  # a zero Potts weight adds exactly nothing (densecrf adds -0 * message)
        plans.append((term, members_t, full, _channel_chunk(term.lattice, memory_mb)))

    # Points-major layout (N, K, C): the lattice filters rows of K*C contiguous channels.
    neg_unary = (-unary.to(torch.float32)).permute(2, 0, 1).contiguous()  # (N, k_in, C)
    q = torch.softmax(neg_unary, dim=2)
    shared = k_in == 1 and k > 1
    if iterations == 0:
        return q.expand(n, k, c).permute(1, 2, 0).contiguous()
    for it in range(iterations):
        # densecrf: tmp = -U; for each kernel: tmp -= -w * K~(Q); Q = softmax(tmp).
        energy = neg_unary.expand(n, k, c).clone()
        for term, members_t, full, chunk in plans:
            weights = term.weights.view(1, -1, 1)
            if it == 0 and shared:
                # Q0 = softmax(-U) is the same for every configuration: filter it once.
                message = term.lattice.filter(q[:, 0, :], scale=term.norm, max_channels=chunk).unsqueeze(1)
            else:
                q_members = q if full else q.index_select(1, members_t)
                km = q_members.shape[1]
                message = term.lattice.filter(q_members.reshape(n, km * c), scale=term.norm, max_channels=chunk)
                message = message.view(n, km, c)
            if full:
                energy.addcmul_(message, weights)
            else:
                energy.index_add_(1, members_t, message * weights)
        q = torch.softmax(energy, dim=2)
    return q.permute(1, 2, 0).contiguous()


# ---------------------------------------------------------------------- numpy entry points
def _checked(image: np.ndarray, probs: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The pydensecrf backend's input checks (``crf.dense.check_inputs``), the message prefixed with
    ``where`` (e.g. ``images[1]``) for batches; returns C-contiguous uint8 image and float32 probs."""
    try:
        return check_inputs(image, probs)
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}: {exc}") from exc


def _check_params(params: object, name: str = "params") -> CRFParams:
    if not isinstance(params, CRFParams):
        raise ValueError(f"{name} must be a crf.params.CRFParams, got {type(params).__name__}")
    return params


def _run_configs(
    images: Sequence[torch.Tensor],
    unary: torch.Tensor,
    params_list: Sequence[CRFParams],
    memory_mb: float,
) -> torch.Tensor:
    """Core: images (each (H_b, W_b, 3) uint8 on the device), unary (1, C, sum N_b) shared by the
    configurations, K configurations -> Q (K, C, sum N_b). Lattices are built once per distinct
    sigma_gamma / (sigma_alpha, sigma_beta) and dropped when no later configuration needs them."""
    device = unary.device
    c, n = unary.shape[1], unary.shape[2]
    segments = [int(im.shape[0] * im.shape[1]) for im in images]
    seg_arg = segments if len(segments) > 1 else None

    def build(feature_list: list[torch.Tensor]) -> PermutohedralLattice:
        return PermutohedralLattice(torch.cat(feature_list, dim=0), segments=seg_arg)

    # Configurations that share every lattice and the iteration count run together as one batch.
    groups: dict[tuple, list[int]] = {}
    for index, p in enumerate(params_list):
        groups.setdefault((p.sigma_gamma, p.sigma_alpha, p.sigma_beta, p.iterations), []).append(index)
    out = torch.empty(len(params_list), c, n, dtype=torch.float32, device=device)
    gaussian_cache: dict[float, PairwiseTerm] = {}
    # Memory per configuration in a batch: about five (N, C) float32 tensors in mean_field.
    batch = max(1, int(memory_mb * 2**20 // (5 * 4 * n * c * 2)))
    for (sigma_gamma, sigma_alpha, sigma_beta, iterations), indices in groups.items():
        if sigma_gamma not in gaussian_cache:
            lattice = build([gaussian_features(im.shape[0], im.shape[1], sigma_gamma, device) for im in images])
            gaussian_cache[sigma_gamma] = PairwiseTerm(lattice, torch.zeros(0))
        gaussian = gaussian_cache[sigma_gamma]
        bilateral_lattice = build([bilateral_features(im, sigma_alpha, sigma_beta) for im in images])
        bilateral_norm = symmetric_normalization(bilateral_lattice)
        for start in range(0, len(indices), batch):
            members = indices[start : start + batch]
            w2 = torch.tensor([params_list[i].w2 for i in members], dtype=torch.float32, device=device)
            w1 = torch.tensor([params_list[i].w1 for i in members], dtype=torch.float32, device=device)
            # densecrf's order: the Gaussian term is added first, then the bilateral one.
            terms = [
                PairwiseTerm(gaussian.lattice, w2, norm=gaussian.norm),
                PairwiseTerm(bilateral_lattice, w1, norm=bilateral_norm),
            ]
            q = mean_field(unary, terms, iterations, num_configs=len(members), memory_mb=memory_mb)
            out[torch.tensor(members, device=device)] = q
        del bilateral_lattice, bilateral_norm
    return out


def _prepare(image: np.ndarray, probs: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image_t = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    unary = unary_from_probs(torch.from_numpy(np.ascontiguousarray(probs)).to(device))
    return image_t, unary.reshape(probs.shape[0], -1)


def dense_crf_torch(
    image: np.ndarray, probs: np.ndarray, params: CRFParams, device: str | torch.device = "cpu", *, memory_mb: float = DEFAULT_MEMORY_MB
) -> np.ndarray:
    """Dense CRF of one image, as ``pydensecrf`` computes it (see the module docstring).

    Args:
        image: RGB uint8 ``(H, W, 3)`` (0..255), the image the probabilities belong to.
        probs: float32 ``(C, H, W)`` class probabilities summing to 1 over C (e.g. softmax of fc8
            upsampled to the image size).
        params: the CRF parameters (w1, sigma_alpha, sigma_beta, w2, sigma_gamma, iterations).
        device: torch device to compute on ("cpu", "cuda", "cuda:1", ...).
        memory_mb: working-memory bound; larger problems are filtered in chunks of channels.

    Returns:
        float32 ``(C, H, W)`` marginals Q after ``params.iterations`` mean-field iterations.

    Raises:
        ValueError: a wrong shape, dtype, non-finite value or a ``probs`` sum off 1 (the message names
            the argument, the expected and the actual value); ``params`` not a CRFParams.
        RuntimeError: ``device`` is CUDA and CUDA is not available.
    """
    _check_params(params)
    return dense_crf_torch_grid(image, probs, [params], device, memory_mb=memory_mb)[0]


def dense_crf_torch_grid(
    image: np.ndarray,
    probs: np.ndarray,
    params_list: Sequence[CRFParams],
    device: str | torch.device = "cpu",
    *,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> np.ndarray:
    """Dense CRF of one image under K parameter configurations (a cross-validation grid, paper Sec. 5).

    All configurations share the Gaussian lattice; those sharing ``(sigma_alpha, sigma_beta)`` share
    one bilateral lattice and run their Q's as K*C channels through it (their ``w1`` and ``w2`` only
    scale the messages). The first iteration's messages (from ``softmax(-U)``) are computed once per
    lattice. Each result equals :func:`dense_crf_torch` with that configuration.

    Args:
        image: RGB uint8 ``(H, W, 3)``. probs: float32 ``(C, H, W)`` summing to 1 over C.
        params_list: K >= 1 CRFParams. device, memory_mb: as in :func:`dense_crf_torch`.

    Returns:
        float32 ``(K, C, H, W)`` marginals, in the order of ``params_list``.

    Raises:
        ValueError: bad ``image``/``probs`` (as in :func:`dense_crf_torch`), an empty ``params_list``
            or an entry that is not a CRFParams (named by index).
        RuntimeError: ``device`` is CUDA and CUDA is not available.
    """
    image, probs = _checked(image, probs)
    if isinstance(params_list, CRFParams) or len(params_list) == 0:
        raise ValueError("params_list must be a non-empty sequence of CRFParams")
    params_list = [_check_params(p, f"params_list[{i}]") for i, p in enumerate(params_list)]
    dev = resolve_device(device)
    image_t, unary = _prepare(image, probs, dev)
    with torch.no_grad():
        q = _run_configs([image_t], unary.unsqueeze(0), params_list, memory_mb)
    return q.reshape(len(params_list), *probs.shape).cpu().numpy()


def dense_crf_torch_batch(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    params: CRFParams,
    device: str | torch.device = "cpu",
    *,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> list[np.ndarray]:
    """Dense CRF of several images at once (sizes may differ), one configuration.

    The images' points go through one Gaussian and one bilateral lattice whose point sets are kept
    apart, so each result equals :func:`dense_crf_torch` on that image alone.

    Args:
        images: B RGB uint8 ``(H_b, W_b, 3)`` arrays. probs: B float32 ``(C, H_b, W_b)`` arrays with
            the same C. params, device, memory_mb: as in :func:`dense_crf_torch`.

    Returns:
        B float32 ``(C, H_b, W_b)`` arrays of marginals.

    Raises:
        ValueError: different lengths, an empty batch, a different C, or a bad entry (named
            ``images[b]`` / ``probs[b]``). RuntimeError: CUDA requested but not available.
    """
    if len(images) != len(probs) or len(images) == 0:
        raise ValueError(f"images and probs must be non-empty and of equal length, got {len(images)} and {len(probs)}")
    checked = [_checked(image, prob, f"images[{b}]/probs[{b}]") for b, (image, prob) in enumerate(zip(images, probs))]
    images, probs = [c[0] for c in checked], [c[1] for c in checked]
    for b, prob in enumerate(probs):
        if prob.shape[0] != probs[0].shape[0]:
            raise ValueError(f"probs[{b}] has C={prob.shape[0]} labels, probs[0] has C={probs[0].shape[0]}")
    _check_params(params)
    dev = resolve_device(device)
    prepared = [_prepare(image, prob, dev) for image, prob in zip(images, probs)]
    unary = torch.cat([u for _, u in prepared], dim=1).unsqueeze(0)
    with torch.no_grad():
        q = _run_configs([im for im, _ in prepared], unary, [params], memory_mb)[0]
    results, start = [], 0
    for prob in probs:
        size = prob.shape[1] * prob.shape[2]
        results.append(q[:, start : start + size].reshape(prob.shape).cpu().numpy())
        start += size
    return results


def dense_crf_tensor(
    images: torch.Tensor,
    unary: torch.Tensor,
    params: CRFParams | Sequence[CRFParams],
    *,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> torch.Tensor:
    """Torch-level batched dense CRF: B same-size images, one or K configurations.

    Args:
        images: RGB ``(B, H, W, 3)`` (uint8 or float 0..255) on the device to compute on.
        unary: float32 ``(B, C, H, W)`` unary energies (e.g. ``-log P`` or ``-fc8``), same device.
        params: one CRFParams, or K of them (a grid).

    Returns:
        float32 ``(B, C, H, W)`` marginals for one CRFParams, ``(K, B, C, H, W)`` for a sequence.

    Raises:
        ValueError: shapes that do not match, a non-finite unary, or a bad ``params``.
    """
    if images.dim() != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {tuple(images.shape)}")
    if unary.dim() != 4 or unary.shape[0] != images.shape[0] or unary.shape[2:] != images.shape[1:3]:
        raise ValueError(
            f"unary must be (B, C, H, W) = ({images.shape[0]}, C, {images.shape[1]}, {images.shape[2]}), "
            f"got {tuple(unary.shape)}"
        )
    if not bool(torch.isfinite(unary).all()):
        raise ValueError("unary must be finite")
    single = isinstance(params, CRFParams)
    params_list = [params] if single else [_check_params(p, f"params[{i}]") for i, p in enumerate(params)]
    if not params_list:
        raise ValueError("params must be a CRFParams or a non-empty sequence of them")
    b, c, h, w = unary.shape
    flat = unary.to(torch.float32).permute(1, 0, 2, 3).reshape(1, c, b * h * w)
    with torch.no_grad():
        q = _run_configs(list(images.unbind(0)), flat, params_list, memory_mb)
    q = q.reshape(len(params_list), c, b, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return q[0] if single else q
