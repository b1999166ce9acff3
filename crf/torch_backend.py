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
for all iterations and for every configuration that shares those standard deviations (the Gaussian
lattice, which depends only on the image size, is also kept across calls); the configurations' ``Q``
run as extra channels through one filter, the first iteration's filtering (of ``softmax(-U)``, the same
for all) is done once, the Potts weights are applied on the lattice (fewer rows than pixels), and
both kernels are sliced in one gather. Several images run through one lattice whose point sets are
kept apart (:class:`~crf.permutohedral.PermutohedralLattice` segments). Configurations run in groups
and channels in chunks so that memory stays bounded (``memory_mb``, which also counts the cached
Gaussian lattices). On CPU, an entry point that tells glibc to reuse freed blocks
(:func:`crf.memory.reuse_freed_memory`) removes the page faults that otherwise dominate the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .inputs import PROB_EPSILON, check_inputs
from .params import CRFParams
from .permutohedral import PermutohedralLattice, bilateral_features, gaussian_features
from .step_times import StepTimes, Step, profile_steps
from .errors import CRFInputError
from .memory import LatticeCache, out_of_memory_hint

__all__ = ["PairwiseTerm", "mean_field", "mean_field_points", "unary_from_probs", "symmetric_normalization",
           "resolve_device", "dense_crf_torch", "dense_crf_torch_grid", "dense_crf_torch_batch",
           "dense_crf_torch_grid_batch", "dense_crf_tensor", "StepTimes", "profile_steps"]

# One unary convention for both backends: probabilities clipped at crf.inputs.PROB_EPSILON before the log.
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
    return torch.rsqrt(lattice.filter_ones() + 1e-20)


@dataclass
class PairwiseTerm:
    """One Potts pairwise kernel of a CRF: a lattice, its normalisation and a weight per configuration.

    Args:
        lattice: the kernel's permutohedral lattice over all N points.
        weights: float32 ``(K,)`` Potts weights (``w1`` or ``w2``), one per configuration of
            :func:`mean_field`.
        norm: float32 ``(N,)`` normalisation; None = computed with :func:`symmetric_normalization`.
    """

    lattice: PermutohedralLattice
    weights: torch.Tensor
    norm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.norm is None:
            self.norm = symmetric_normalization(self.lattice)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32, device=self.lattice.device).reshape(-1)


#: On CPU, configurations run through the lattices in groups of at most this many channels (labels x
#: configurations). Wider is faster per channel: on a VOC-sized image, groups of 21 / 42 / 63 / 126
#: channels took about 190 / 150 / 130 / 105 ms per configuration (2 cores), so the w1 values of a
#: grid point (2 by default, 6 with w1 5..10) run as one group; the cap bounds memory when more
#: configurations share a lattice. On CUDA all configurations that fit the memory bound run as one group.
CPU_GROUP_CHANNELS = 128

def _group_size(terms: Sequence[PairwiseTerm], k: int, c: int, n: int, device: torch.device, memory_mb: float) -> tuple[int, int]:
    """(configurations per group, channels per pass) within ``memory_mb``."""
    lattice_rows = sum(t.lattice.num_lattice for t in terms)
    # per channel: about five (N,) float32 columns (Q, energy, softmax, slice output, splat input) and
    # four lattice-sized ones (splat output, two blur buffers, the concatenated rows)
    per_channel = 4 * (5 * n + 4 * lattice_rows)
    budget = max(1, int(memory_mb * 2**20 // per_channel))
    per_group = max(1, min(k, budget // c))
    if device.type == "cpu":
        per_group = min(per_group, max(1, CPU_GROUP_CHANNELS // c))
    return per_group, min(per_group * c, budget)


def mean_field(
    unary: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    iterations: int = 10,
    *,
    num_configs: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    labels_only: bool = False,
) -> torch.Tensor:
    """Mean-field inference of a fully connected CRF with Potts kernels (densecrf's ``inference``).

    K configurations (or K problems) over the same points are independent; they run in groups whose
    Q's pass through each lattice as extra channels. In every iteration each kernel's filtered Q is
    scaled by the configurations' weights on the lattice (fewer rows than points), and the slices of
    all kernels run as one weighted gather, which gives the pairwise energy directly.

    Args:
        unary: float32 ``(K, C, N)`` unary energies of K configurations with C labels over N points,
            or ``(1, C, N)`` / ``(C, N)`` shared by all ``num_configs`` configurations (then the first
            iteration's lattice values are computed once and only scaled per configuration).
        terms: the pairwise kernels, each with one weight per configuration.
        iterations: number of mean-field iterations (10 in DeepLab).
        num_configs: K when ``unary`` is shared; default ``unary.shape[0]``.
        memory_mb: bound on the working memory; larger problems run fewer configurations per group,
            and channels in chunks.
        labels_only: return the labelling (argmax of Q) instead of Q.

    Returns:
        float32 ``(K, C, N)`` marginals Q (softmax over C) on the unary's device, or int64 ``(K, N)``
        labels with ``labels_only``.

    Raises:
        CRFInputError (a ValueError): wrong shapes, a term's lattice with another N or another number of weights, or
            ``iterations`` < 0.
    """
    if unary.dim() == 2:
        unary = unary.unsqueeze(0)
    if unary.dim() != 3:
        raise CRFInputError(f"unary must be (K, C, N), got shape {tuple(unary.shape)}")
    k_in, c, n = unary.shape
    k = int(num_configs) if num_configs is not None else k_in
    if k_in not in (1, k):
        raise CRFInputError(f"unary has K={k_in} configurations but num_configs={k}")
    device = unary.device
    _check_terms(terms, n, k, iterations)
    # Points-major layout (N, K, C): the lattices filter rows of (configurations x labels) channels.
    neg_unary = (-unary.to(torch.float32)).permute(2, 0, 1).contiguous()  # (N, k_in, C)
    out_shape = (k, n) if labels_only else (k, c, n)
    out = torch.empty(out_shape, dtype=torch.int64 if labels_only else torch.float32, device=device)
    for g0, q in _mean_field_groups(neg_unary, terms, iterations, k, memory_mb):
        kg = q.shape[1]
        if labels_only:
            out[g0 : g0 + kg] = q.argmax(dim=2).T
        else:
            out[g0 : g0 + kg] = q.permute(1, 2, 0)
    return out


def mean_field_points(neg_unary: torch.Tensor, terms: Sequence[PairwiseTerm], iterations: int = 10) -> torch.Tensor:
    """:func:`mean_field` of one configuration in the points-major layout (``crf.densecrf``'s), with no
    transposition on the way in or out: float32 ``(N, C)`` minus the unary energies -> float32 ``(N, C)``
    marginals Q (contiguous), the same values as ``mean_field(-neg_unary.T, terms, iterations)[0].T``.

    Raises:
        CRFInputError (a ValueError): as :func:`mean_field`.
    """
    if neg_unary.dim() != 2:
        raise CRFInputError(f"neg_unary must be (N, C), got shape {tuple(neg_unary.shape)}")
    _check_terms(terms, neg_unary.shape[0], 1, iterations)
    neg_unary = neg_unary.to(torch.float32).contiguous()[:, None]
    ((_, q),) = _mean_field_groups(neg_unary, terms, iterations, 1, DEFAULT_MEMORY_MB)
    return q[:, 0]


def _check_terms(terms: Sequence[PairwiseTerm], n: int, k: int, iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise CRFInputError(f"iterations must be an integer >= 0, got {iterations!r}")
    for index, term in enumerate(terms):
        if term.lattice.num_points != n:
            raise CRFInputError(f"terms[{index}]: lattice has N={term.lattice.num_points} points, unary has N={n}")
        if term.weights.numel() != k:
            raise CRFInputError(f"terms[{index}]: {term.weights.numel()} weights for {k} configurations")


def _mean_field_groups(neg_unary: torch.Tensor, terms: Sequence[PairwiseTerm], iterations: int, k: int,
                       memory_mb: float):
    """The loop of :func:`mean_field` on checked inputs: ``neg_unary`` float32 ``(N, k_in, C)``
    contiguous, ``k_in`` 1 (shared) or K. Yields ``(g0, Q)`` per group of configurations ``g0 ..
    g0 + kg - 1``, Q float32 ``(N, kg, C)`` (contiguous after an iteration)."""
    n, k_in, c = neg_unary.shape
    device = neg_unary.device
    shared = k_in == 1
    # a zero Potts weight adds exactly nothing (densecrf adds -0 * message)
    active = [t for t in terms if bool((t.weights != 0).any())]
    if iterations == 0 or not active:
        q = torch.softmax(neg_unary, dim=2)
        yield 0, q.expand(n, k, c)
        return

    # One gather slices every kernel: bags of sum(d_t + 1) rows of the concatenated lattice values,
    # weighted by barycentric weight x normalisation x alpha.
    row_offsets, rows = [], 0
    for t in active:
        row_offsets.append(rows)
        rows += t.lattice.num_lattice
    slice_index = torch.cat([t.lattice.offsets + off for t, off in zip(active, row_offsets)], dim=1)
    slice_weights = torch.cat([t.lattice.slice_weights(t.norm) for t in active], dim=1)
    per_group, chunk = _group_size(active, k, c, n, device, memory_mb)

    first = None
    if shared:
        # Q0 = softmax(-U) is the same for every configuration: filter it once per kernel.
        with Step("softmax", device):
            q0 = torch.softmax(neg_unary[:, 0], dim=1)
        first = []
        for t in active:
            with Step("splat", device):
                splatted = t.lattice.splat(q0, t.norm)
            with Step("blur", device):
                first.append(t.lattice.blur(splatted))

    for g0 in range(0, k, per_group):
        kg = min(per_group, k - g0)
        width = kg * c
        # per-channel weights of this group: configuration j's weight on its C channels
        channel_w = [t.weights[g0 : g0 + kg].repeat_interleave(c) for t in active]
        nu = neg_unary if shared else neg_unary[:, g0 : g0 + kg].contiguous()
        q: torch.Tensor | None = None
        for it in range(iterations):
            energy = torch.empty(n, width, dtype=torch.float32, device=device) if chunk < width else None
            for s in range(0, width, chunk):
                e = min(width, s + chunk)
                lats = []
                for ti, t in enumerate(active):
                    if q is None and first is not None:
                        with Step("compatibility", device):
                            lat = first[ti] if kg == 1 else first[ti].repeat(1, kg)
                            lat = lat[:, s:e] * channel_w[ti][s:e]
                    else:
                        if q is None:
                            with Step("softmax", device):
                                q = torch.softmax(nu, dim=2)
                        values = q.view(n, width)[:, s:e]
                        with Step("splat", device):
                            lat = t.lattice.splat(values.contiguous(), t.norm)
                        with Step("blur", device):
                            lat = t.lattice.blur(lat)
                        with Step("compatibility", device):
                            lat = lat.mul_(channel_w[ti][s:e])
                    lats.append(lat)
                with Step("slice", device):
                    rows_all = torch.cat(lats) if len(lats) > 1 else lats[0]
                    part = F.embedding_bag(slice_index, rows_all, mode="sum", per_sample_weights=slice_weights)
                if energy is None:
                    energy = part
                else:
                    energy[:, s:e] = part
            energy = energy.view(n, kg, c)
            with Step("compatibility", device):
                energy.add_(nu)
            with Step("softmax", device):
                q = torch.softmax(energy, dim=2)
        yield g0, q


# ---------------------------------------------------------------------- numpy entry points
def _checked(image: np.ndarray, probs: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The pydensecrf backend's input checks (``crf.inputs.check_inputs``), the message prefixed with
    ``where`` (e.g. ``images[1]``) for batches; returns C-contiguous uint8 image and float32 probs."""
    try:
        return check_inputs(image, probs)
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}: {exc}") from exc


def _check_params(params: object, name: str = "params") -> CRFParams:
    if not isinstance(params, CRFParams):
        raise CRFInputError(f"{name} must be a crf.params.CRFParams, got {type(params).__name__}")
    return params


def _params_list(params: CRFParams | Sequence[CRFParams], name: str) -> list[CRFParams]:
    """``[params]`` when ``name`` is ``"params"`` (one configuration), else the K >= 1 entries of the grid
    ``name`` (each checked, named by index)."""
    if name == "params":
        return [_check_params(params)]
    if isinstance(params, CRFParams) or len(params) == 0:
        raise CRFInputError(f"{name} must be a non-empty sequence of CRFParams")
    return [_check_params(p, f"{name}[{i}]") for i, p in enumerate(params)]


#: Gaussian (smoothness) lattices depend only on the image size and sigma_gamma, not on the image:
#: the last few are kept (with their normalisation) for the calls that follow, e.g. the grid search's
#: groups of one image, or images of one size. Their bytes count against each call's ``memory_mb``.
_GAUSSIAN_CACHE = LatticeCache(4)


def _gaussian_lattice(sizes: list[tuple[int, int]], sigma_gamma: float,
                      device: torch.device) -> tuple[PermutohedralLattice, torch.Tensor]:
    """The Gaussian lattice of images of these sizes and its symmetric normalisation (cached)."""

    def build() -> tuple[PermutohedralLattice, torch.Tensor]:
        features = torch.cat([gaussian_features(h, w, sigma_gamma, device) for h, w in sizes], dim=0)
        lattice = PermutohedralLattice(features, segments=[h * w for h, w in sizes] if len(sizes) > 1 else None)
        return lattice, symmetric_normalization(lattice)

    return _GAUSSIAN_CACHE.get((tuple(sizes), float(sigma_gamma), str(device)), build)


def _working_mb(memory_mb: float) -> float:
    """What is left of ``memory_mb`` for one call's working memory after the cached lattices (trimmed to
    at most half of it first), MiB."""
    _GAUSSIAN_CACHE.trim(memory_mb * 2**20 / 2)
    return max(memory_mb / 2, memory_mb - _GAUSSIAN_CACHE.nbytes() / 2**20)


def _run_configs(
    images: Sequence[torch.Tensor],
    unary: torch.Tensor,
    params_list: Sequence[CRFParams],
    memory_mb: float,
    labels_only: bool = False,
) -> torch.Tensor:
    """Core: images (each (H_b, W_b, 3) uint8 on the device), unary (1, C, sum N_b) shared by the
    configurations, K configurations -> Q (K, C, sum N_b), or labels (K, sum N_b) with ``labels_only``.
    Lattices are built once per distinct sigma_gamma / (sigma_alpha, sigma_beta) and dropped when no
    later configuration needs them."""
    device = unary.device
    c, n = unary.shape[1], unary.shape[2]
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    seg_arg = [h * w for h, w in sizes] if len(sizes) > 1 else None

    # Configurations that share every lattice and the iteration count run together.
    groups: dict[tuple, list[int]] = {}
    for index, p in enumerate(params_list):
        groups.setdefault((p.sigma_gamma, p.sigma_alpha, p.sigma_beta, p.iterations), []).append(index)
    out_shape = (len(params_list), n) if labels_only else (len(params_list), c, n)
    out = torch.empty(out_shape, dtype=torch.int64 if labels_only else torch.float32, device=device)
    for (sigma_gamma, sigma_alpha, sigma_beta, iterations), members in groups.items():
        with Step("lattice", device):
            gaussian_lattice, gaussian_norm = _gaussian_lattice(sizes, sigma_gamma, device)
            features = torch.cat([bilateral_features(im, sigma_alpha, sigma_beta) for im in images], dim=0)
            bilateral_lattice = PermutohedralLattice(features, segments=seg_arg)
            bilateral_norm = symmetric_normalization(bilateral_lattice)
        w2 = torch.tensor([params_list[i].w2 for i in members], dtype=torch.float32, device=device)
        w1 = torch.tensor([params_list[i].w1 for i in members], dtype=torch.float32, device=device)
        # densecrf's order: the Gaussian term is added first, then the bilateral one.
        terms = [
            PairwiseTerm(gaussian_lattice, w2, norm=gaussian_norm),
            PairwiseTerm(bilateral_lattice, w1, norm=bilateral_norm),
        ]
        with out_of_memory_hint(device, memory_mb):
            result = mean_field(unary, terms, iterations, num_configs=len(members), memory_mb=_working_mb(memory_mb),
                                labels_only=labels_only)
        out[torch.tensor(members, device=device)] = result
        del bilateral_lattice, bilateral_norm, terms
    return out


def _prepare(image: np.ndarray, probs: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image_t = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    unary = unary_from_probs(torch.from_numpy(np.ascontiguousarray(probs)).to(device))
    return image_t, unary.reshape(probs.shape[0], -1)


def _dense_crf_numpy(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    params: CRFParams | Sequence[CRFParams],
    device: str | torch.device,
    memory_mb: float,
    labels_only: bool,
    *,
    params_name: str = "params_list",
    checked: bool = False,
    name_entries: bool = True,
) -> list[np.ndarray]:
    """The one batched numpy entry every public one wraps: check, prepare, run, split.

    B images (sizes may differ) x K configurations (``params``, checked under ``params_name``, see
    :func:`_params_list`) through :func:`_run_configs`; an input error names ``images[b]/probs[b]`` when
    ``name_entries``. Returns B arrays: float32 ``(K, C, H_b, W_b)`` marginals, or int64 ``(K, H_b, W_b)``
    labels with ``labels_only``. Raises as the public entries say."""
    if len(images) != len(probs) or len(images) == 0:
        raise CRFInputError(f"images and probs must be non-empty and of equal length, got {len(images)} and {len(probs)}")
    if not checked:
        pairs = [_checked(image, prob, f"images[{b}]/probs[{b}]" if name_entries else "")
                 for b, (image, prob) in enumerate(zip(images, probs))]
        images, probs = [c[0] for c in pairs], [c[1] for c in pairs]
    for b, prob in enumerate(probs):
        if prob.shape[0] != probs[0].shape[0]:
            raise CRFInputError(f"probs[{b}] has C={prob.shape[0]} labels, probs[0] has C={probs[0].shape[0]}")
    params_list = _params_list(params, params_name)
    dev = resolve_device(device)
    prepared = [_prepare(image, prob, dev) for image, prob in zip(images, probs)]
    unary = torch.cat([u for _, u in prepared], dim=1).unsqueeze(0)
    with torch.no_grad():
        q = _run_configs([im for im, _ in prepared], unary, params_list, memory_mb, labels_only=labels_only)
    results, start = [], 0
    for prob in probs:
        size = prob.shape[1] * prob.shape[2]
        part = q[:, start : start + size] if labels_only else q[:, :, start : start + size]
        results.append(part.reshape(len(params_list), *(prob.shape[1:] if labels_only else prob.shape)).cpu().numpy())
        start += size
    return results


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
        CRFInputError (a ValueError): a wrong shape, dtype, non-finite value or a ``probs`` sum off 1 (the message names
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
    labels_only: bool = False,
) -> np.ndarray:
    """Dense CRF of one image under K parameter configurations (a cross-validation grid, paper Sec. 5).

    All configurations share the Gaussian lattice; those sharing ``(sigma_alpha, sigma_beta)`` share
    one bilateral lattice and run their Q's as K*C channels through it (their ``w1`` and ``w2`` only
    scale the messages). The first iteration's messages (from ``softmax(-U)``) are computed once per
    lattice. Each result equals :func:`dense_crf_torch` with that configuration.

    Args:
        image: RGB uint8 ``(H, W, 3)``. probs: float32 ``(C, H, W)`` summing to 1 over C.
        params_list: K >= 1 CRFParams. device, memory_mb: as in :func:`dense_crf_torch`.
        labels_only: return the labellings (argmax over C) instead of the marginals; the search needs
            only these, and they skip the copy of K x C planes.

    Returns:
        float32 ``(K, C, H, W)`` marginals, in the order of ``params_list``; with ``labels_only``,
        int64 ``(K, H, W)`` labels.

    Raises:
        CRFInputError (a ValueError): bad ``image``/``probs`` (as in :func:`dense_crf_torch`), an empty ``params_list``
            or an entry that is not a CRFParams (named by index).
        RuntimeError: ``device`` is CUDA and CUDA is not available.
    """
    return _dense_crf_numpy([image], [probs], params_list, device, memory_mb, labels_only, name_entries=False)[0]


def dense_crf_torch_grid_batch(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    params_list: Sequence[CRFParams],
    device: str | torch.device = "cpu",
    *,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checked: bool = False,
) -> list[np.ndarray]:
    """Labellings of B images (sizes may differ) under K configurations: the search's images x
    configurations in one call (issue #13 item 6, #14).

    The images' points go through one Gaussian and one bilateral lattice per (sigma_alpha, sigma_beta)
    whose point sets are kept apart (segments), and the configurations that share a lattice run as extra
    channels; each labelling equals :func:`dense_crf_torch_grid` of that image alone.

    Args:
        images: B RGB uint8 ``(H_b, W_b, 3)``. probs: B float32 ``(C, H_b, W_b)`` with the same C.
        params_list: K >= 1 CRFParams. device, memory_mb: as in :func:`dense_crf_torch`.
        checked: the inputs were already checked by ``crf.inputs.check_inputs`` (the search's cache).

    Returns:
        B int64 arrays ``(K, H_b, W_b)``, the labels of each configuration in the order of ``params_list``.

    Raises:
        CRFInputError (a ValueError): different lengths, an empty batch or grid, a different C, a bad entry.
        RuntimeError: CUDA requested but not available.
    """
    return _dense_crf_numpy(images, probs, params_list, device, memory_mb, True, checked=checked)


def dense_crf_torch_batch(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    params: CRFParams,
    device: str | torch.device = "cpu",
    *,
    memory_mb: float = DEFAULT_MEMORY_MB,
    labels_only: bool = False,
) -> list[np.ndarray]:
    """Dense CRF of several images at once (sizes may differ), one configuration.

    The images' points go through one Gaussian and one bilateral lattice whose point sets are kept
    apart, so each result equals :func:`dense_crf_torch` on that image alone.

    Args:
        images: B RGB uint8 ``(H_b, W_b, 3)`` arrays. probs: B float32 ``(C, H_b, W_b)`` arrays with
            the same C. params, device, memory_mb: as in :func:`dense_crf_torch`.
        labels_only: return the labellings (argmax over C) instead of the marginals.

    Returns:
        B float32 ``(C, H_b, W_b)`` arrays of marginals, or B int64 ``(H_b, W_b)`` labels with ``labels_only``.

    Raises:
        CRFInputError (a ValueError): different lengths, an empty batch, a different C, or a bad entry (named
            ``images[b]`` / ``probs[b]``). RuntimeError: CUDA requested but not available.
    """
    return [r[0] for r in _dense_crf_numpy(images, probs, params, device, memory_mb, labels_only, params_name="params")]


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
        CRFInputError (a ValueError): shapes that do not match, a non-finite unary, or a bad ``params``.
    """
    if images.dim() != 4 or images.shape[3] != 3:
        raise CRFInputError(f"images must be (B, H, W, 3), got {tuple(images.shape)}")
    if unary.dim() != 4 or unary.shape[0] != images.shape[0] or unary.shape[2:] != images.shape[1:3]:
        raise CRFInputError(
            f"unary must be (B, C, H, W) = ({images.shape[0]}, C, {images.shape[1]}, {images.shape[2]}), "
            f"got {tuple(unary.shape)}"
        )
    if not bool(torch.isfinite(unary).all()):
        raise CRFInputError("unary must be finite")
    single = isinstance(params, CRFParams)
    params_list = [params] if single else [_check_params(p, f"params[{i}]") for i, p in enumerate(params)]
    if not params_list:
        raise CRFInputError("params must be a CRFParams or a non-empty sequence of them")
    b, c, h, w = unary.shape
    flat = unary.to(torch.float32).permute(1, 0, 2, 3).reshape(1, c, b * h * w)
    with torch.no_grad():
        q = _run_configs(list(images.unbind(0)), flat, params_list, memory_mb)
    q = q.reshape(len(params_list), c, b, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return q[0] if single else q
