"""Tests of the PyTorch dense CRF backend (crf.permutohedral, crf.torch_backend).

Small-tensor tests check the lattice filter (constant signals, brute-force Gaussian filtering,
segments) and the API's consistency (grid == single calls, batched == unbatched, chunked ==
unchunked, input checks). The agreement tests compare with pydensecrf, on a small synthetic image and
on real VOC val images with the DIAGNOSTIC degraded-ground-truth probabilities of
deeplab_v1.data.degraded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crf.confusion import confusion, miou
from crf.params import CRFParams
from crf.permutohedral import PermutohedralLattice, bilateral_features, gaussian_features
from crf.torch_backend import (
    PairwiseTerm,
    dense_crf_tensor,
    dense_crf_torch,
    dense_crf_torch_batch,
    dense_crf_torch_grid,
    mean_field,
    resolve_device,
    symmetric_normalization,
    unary_from_probs,
)
from deeplab_v1.data.degraded import degraded_probs

PARAMS_A = CRFParams(w1=5, sigma_alpha=50, sigma_beta=5)
PARAMS_B = CRFParams(w1=4, sigma_alpha=49, sigma_beta=5)
PARAMS_C = CRFParams(w1=8, sigma_alpha=80, sigma_beta=3)  # the grid's smallest sigma_beta: the most lattice points


def _synthetic(height: int, width: int, labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A blocky RGB image with noise and smooth, blocky class probabilities."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3))
    image = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    logits = rng.normal(0, 2, size=(labels, height // 4 + 1, width // 4 + 1))
    logits = np.repeat(np.repeat(logits, 4, axis=1), 4, axis=2)[:, :height, :width]
    probs = np.exp(logits - logits.max(axis=0))
    probs = (probs / probs.sum(axis=0)).astype(np.float32)
    return np.ascontiguousarray(image), probs


# ---------------------------------------------------------------------------- lattice
def test_filter_of_constant_signal_is_constant_after_normalisation():
    features = torch.rand(500, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([6.0, 6.0, 20.0, 20.0, 20.0])
    lattice = PermutohedralLattice(features)
    assert torch.allclose(lattice.weights.sum(dim=1), torch.ones(500), atol=1e-5)
    assert bool((lattice.weights >= -1e-6).all())
    ones = lattice.filter(torch.ones(500, 1))
    assert bool((ones > 0.1).all())  # every point receives its own (and its neighbours') mass
    constant = lattice.filter(torch.full((500, 2), 3.5))
    assert torch.allclose(constant / ones, torch.full((500, 2), 3.5), rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_filter_approximates_brute_force_gaussian(dim):
    generator = torch.Generator().manual_seed(dim)
    features = torch.rand(300, dim, generator=generator) * 4.0
    # signals with structure in feature space (smooth, linear, a step), offset to stay positive
    values = torch.stack([torch.sin(features[:, 0]), features.sum(1), (features[:, -1] > 2).float()], 1) + 1.5
    lattice = PermutohedralLattice(features)
    exact_kernel = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
    exact = (exact_kernel @ values) / exact_kernel.sum(dim=1, keepdim=True)
    approx = lattice.filter(values) / lattice.filter(torch.ones(300, 1))
    # The permutohedral filter is an approximation (Adams et al. 2010): compare normalised outputs.
    for channel in range(3):
        corr = torch.corrcoef(torch.stack([approx[:, channel], exact[:, channel]]))[0, 1]
        assert corr > 0.98, (dim, channel, float(corr))
    relative = ((approx - exact).abs() / exact.abs()).mean()
    assert relative < 0.03, float(relative)


def test_segments_keep_point_sets_apart():
    a = torch.rand(200, 3, generator=torch.Generator().manual_seed(1)) * 3
    b = a[:150] + 0.01  # overlapping features: they would interact without segments
    values = torch.rand(350, 2, generator=torch.Generator().manual_seed(2))
    joint = PermutohedralLattice(torch.cat([a, b]), segments=[200, 150]).filter(values)
    separate = torch.cat([PermutohedralLattice(a).filter(values[:200]), PermutohedralLattice(b).filter(values[200:])])
    assert torch.allclose(joint, separate, atol=1e-5)
    mixed = PermutohedralLattice(torch.cat([a, b])).filter(values)
    assert not torch.allclose(mixed, separate, atol=1e-3)


def test_chunked_filter_equals_unchunked():
    image = torch.from_numpy(_synthetic(30, 40, 3, seed=3)[0])
    lattice = PermutohedralLattice(bilateral_features(image, 10.0, 8.0))
    values = torch.rand(1200, 7, generator=torch.Generator().manual_seed(4))
    scale = torch.rand(1200) + 0.5
    assert torch.allclose(lattice.filter(values, scale, max_channels=2), lattice.filter(values, scale), atol=1e-6)


def test_lattice_rejects_bad_features():
    with pytest.raises(ValueError, match="features"):
        PermutohedralLattice(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        PermutohedralLattice(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="segments"):
        PermutohedralLattice(torch.zeros(4, 2), segments=[1, 2])
    with pytest.raises(ValueError, match="values"):
        PermutohedralLattice(torch.zeros(4, 2)).filter(torch.zeros(3, 1))


# ---------------------------------------------------------------------------- mean field / API
@pytest.mark.slow
def test_grid_equals_single_calls():
    image, probs = _synthetic(36, 44, 4, seed=5)
    grid = [PARAMS_A, PARAMS_B, CRFParams(w1=8, sigma_alpha=50, sigma_beta=5), CRFParams(w1=0, sigma_alpha=20, sigma_beta=3, w2=1, iterations=3)]
    together = dense_crf_torch_grid(image, probs, grid)
    assert together.shape == (4, 4, 36, 44) and together.dtype == np.float32
    for k, params in enumerate(grid):
        np.testing.assert_allclose(together[k], dense_crf_torch(image, probs, params), atol=2e-5)


@pytest.mark.slow
def test_batched_equals_unbatched_and_chunked_equals_unchunked():
    first, second = _synthetic(30, 40, 5, seed=6), _synthetic(25, 33, 5, seed=7)
    batched = dense_crf_torch_batch([first[0], second[0]], [first[1], second[1]], PARAMS_A)
    for (image, probs), result in zip([first, second], batched):
        single = dense_crf_torch(image, probs, PARAMS_A)
        np.testing.assert_allclose(result, single, atol=2e-5)
        # a tiny memory bound forces one channel per filter pass and one configuration per batch
        np.testing.assert_allclose(dense_crf_torch(image, probs, PARAMS_A, memory_mb=1e-3), single, atol=2e-5)


def test_tensor_api_matches_numpy_api():
    pairs = [_synthetic(24, 30, 3, seed=s) for s in (8, 9)]
    images = torch.stack([torch.from_numpy(image) for image, _ in pairs])
    unary = torch.stack([unary_from_probs(torch.from_numpy(probs)) for _, probs in pairs])
    q = dense_crf_tensor(images, unary, PARAMS_B)
    assert q.shape == (2, 3, 24, 30)
    grid = dense_crf_tensor(images, unary, [PARAMS_A, PARAMS_B])
    assert grid.shape == (2, 2, 3, 24, 30)
    for b, (image, probs) in enumerate(pairs):
        np.testing.assert_allclose(q[b].numpy(), dense_crf_torch(image, probs, PARAMS_B), atol=2e-5)
        np.testing.assert_allclose(grid[0, b].numpy(), dense_crf_torch(image, probs, PARAMS_A), atol=2e-5)


def test_mean_field_zero_weight_and_zero_iterations():
    unary = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(10))
    lattice = PermutohedralLattice(torch.rand(50, 2) * 5)
    q0 = mean_field(unary, [PairwiseTerm(lattice, torch.zeros(2))], iterations=4)
    assert torch.allclose(q0, torch.softmax(-unary, dim=1), atol=1e-6)
    assert torch.allclose(mean_field(unary, [], iterations=0), torch.softmax(-unary, dim=1))
    q = mean_field(unary, [PairwiseTerm(lattice, torch.tensor([3.0, 3.0]))], iterations=4)
    assert torch.allclose(q.sum(dim=1), torch.ones(2, 50), atol=1e-5) and not torch.allclose(q, q0, atol=1e-3)


def test_labels_only_is_the_argmax_of_the_marginals():
    image, probs = _synthetic(30, 38, 5, seed=20)
    grid = [PARAMS_A, PARAMS_B, PARAMS_C]
    q = dense_crf_torch_grid(image, probs, grid)
    labels = dense_crf_torch_grid(image, probs, grid, labels_only=True)
    assert labels.shape == (3, 30, 38) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, q.argmax(axis=1))


def _terms(image: torch.Tensor, weights: list[tuple[float, float]]) -> list[PairwiseTerm]:
    gaussian = PermutohedralLattice(gaussian_features(image.shape[0], image.shape[1], 3.0))
    bilateral = PermutohedralLattice(bilateral_features(image, 50.0, 5.0))
    return [PairwiseTerm(gaussian, torch.tensor([w2 for w2, _ in weights])),
            PairwiseTerm(bilateral, torch.tensor([w1 for _, w1 in weights]))]


def test_mean_field_groups_chunks_and_shared_first_iteration_agree():
    """Every execution path of mean_field gives the same Q: configurations in one group or one per
    group, channels in chunks that split a configuration's labels, a shared unary (first iteration
    filtered once) or one unary per configuration."""
    image, probs = _synthetic(26, 31, 4, seed=21)
    image_t = torch.from_numpy(image)
    unary = unary_from_probs(torch.from_numpy(probs)).reshape(1, 4, -1)
    terms = _terms(image_t, [(3.0, 5.0), (3.0, 8.0), (1.0, 0.0)])
    reference = mean_field(unary, terms, 5, num_configs=3)
    per_config = mean_field(unary.expand(3, -1, -1).contiguous(), terms, 5)
    assert torch.allclose(per_config, reference, atol=1e-6)
    # a budget of 3 channels per pass: one configuration per group, its 4 labels in chunks of 3 and 1
    n = unary.shape[2]
    rows = sum(t.lattice.num_lattice for t in terms)
    three_channels = 3 * 4 * (5 * n + 4 * rows) / 2**20
    chunked = mean_field(unary, terms, 5, num_configs=3, memory_mb=three_channels)
    assert torch.allclose(chunked, reference, atol=1e-6)
    labels = mean_field(unary, terms, 5, num_configs=3, memory_mb=three_channels, labels_only=True)
    assert torch.equal(labels, reference.argmax(dim=1))


def test_mean_field_rejects_mismatched_terms():
    unary = torch.rand(2, 3, 40)
    lattice = PermutohedralLattice(torch.rand(40, 2) * 5)
    with pytest.raises(ValueError, match=r"terms\[0\]: 3 weights for 2 configurations"):
        mean_field(unary, [PairwiseTerm(lattice, torch.ones(3))], iterations=2)
    with pytest.raises(ValueError, match=r"terms\[0\]: lattice has N=30"):
        mean_field(unary, [PairwiseTerm(PermutohedralLattice(torch.rand(30, 2)), torch.ones(2))], iterations=2)
    with pytest.raises(ValueError, match="iterations"):
        mean_field(unary, [], iterations=-1)


def test_splat_blur_slice_compose_to_the_filter():
    features = torch.rand(120, 3, generator=torch.Generator().manual_seed(22)) * 4
    lattice = PermutohedralLattice(features)
    values = torch.rand(120, 5)
    scale = symmetric_normalization(lattice)
    lat = lattice.splat(values, scale)
    assert lat.shape == (lattice.num_lattice, 5)
    # splat conserves mass: each point's weights sum to 1
    assert torch.allclose(lat.sum(0), (values * scale[:, None]).sum(0), rtol=1e-5)
    composed = lattice.slice(lattice.blur(lat), scale)
    assert torch.allclose(composed, lattice.filter(values, scale), atol=1e-6)


def test_gaussian_lattice_cache_serves_each_size_its_own():
    first = _synthetic(20, 24, 3, seed=23)
    other = _synthetic(22, 19, 3, seed=24)
    a = dense_crf_torch(*first, PARAMS_A)
    dense_crf_torch(*other, PARAMS_A)
    dense_crf_torch(*other, CRFParams(w1=5, sigma_alpha=50, sigma_beta=5, sigma_gamma=2))
    np.testing.assert_array_equal(dense_crf_torch(*first, PARAMS_A), a)


def test_input_checks_name_the_argument():
    """The torch backend runs the pydensecrf backend's checks (crf.dense.check_inputs): same errors."""
    image, probs = _synthetic(10, 12, 3, seed=11)
    with pytest.raises(TypeError, match="image must be uint8"):
        dense_crf_torch(image.astype(np.float32), probs, PARAMS_A)
    with pytest.raises(ValueError, match=r"image must be \(H, W, 3\)"):
        dense_crf_torch(image[..., :2].copy(), probs, PARAMS_A)
    with pytest.raises(TypeError, match="probs must be floating point"):
        dense_crf_torch(image, (probs * 100).astype(np.int32), PARAMS_A)
    with pytest.raises(ValueError, match=r"\(3, 10, 11\).*differ in H, W"):
        dense_crf_torch(image, probs[:, :, :11].copy(), PARAMS_A)
    with pytest.raises(ValueError, match="probs must sum to 1"):
        dense_crf_torch(image, probs * 0.5, PARAMS_A)
    bad = probs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        dense_crf_torch(image, bad, PARAMS_A)
    with pytest.raises(ValueError, match="params must be a crf.params.CRFParams"):
        dense_crf_torch(image, probs, {"w1": 5})
    with pytest.raises(ValueError, match=r"params_list\[1\]"):
        dense_crf_torch_grid(image, probs, [PARAMS_A, None])
    with pytest.raises(ValueError, match=r"probs\[1\]"):
        dense_crf_torch_batch([image, image], [probs, probs[:2] / probs[:2].sum(0)], PARAMS_A)
    # float64 probabilities are accepted, as by the pydensecrf backend
    assert dense_crf_torch(image, probs.astype(np.float64), PARAMS_A).dtype == np.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_unavailable_is_a_clear_runtime_error():
    image, probs = _synthetic(10, 12, 3, seed=12)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        dense_crf_torch(image, probs, PARAMS_A, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_cpu():
    image, probs = _synthetic(40, 50, 4, seed=13)
    np.testing.assert_allclose(
        dense_crf_torch(image, probs, PARAMS_A, device="cuda"), dense_crf_torch(image, probs, PARAMS_A), atol=1e-4
    )


# ---------------------------------------------------------------------------- agreement with pydensecrf
def _pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    utils = pytest.importorskip("pydensecrf.utils")
    labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=params.sigma_gamma, compat=params.w2)
    crf.addPairwiseBilateral(sxy=params.sigma_alpha, srgb=params.sigma_beta, rgbim=np.ascontiguousarray(image), compat=params.w1)
    return np.asarray(crf.inference(params.iterations), np.float32).reshape(probs.shape)


def test_matches_pydensecrf_on_a_small_image():
    image, probs = _synthetic(60, 80, 5, seed=14)
    for params in (PARAMS_A, PARAMS_C, CRFParams(w1=10, sigma_alpha=20, sigma_beta=3, w2=3, sigma_gamma=3)):
        np.testing.assert_allclose(dense_crf_torch(image, probs, params), _pydensecrf(image, probs, params), atol=1e-4)


def _miou(conf: np.ndarray) -> float:
    """mIoU in percent (crf.confusion's rule)."""
    return 100.0 * miou(conf)


@pytest.mark.slow
def test_agrees_with_pydensecrf_on_voc_val(shared_voc):
    from PIL import Image

    names = (shared_voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:5]
    grid = [PARAMS_A, PARAMS_B, PARAMS_C]
    confusions = {(backend, k): np.zeros((21, 21), np.int64) for backend in ("torch", "pydensecrf") for k in range(3)}
    for name in names:
        image = np.array(Image.open(shared_voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        label = np.asarray(Image.open(shared_voc / "SegmentationClass" / f"{name}.png"))
        probs = degraded_probs(label)  # DIAGNOSTIC DCNN-like probabilities (deeplab_v1.data.degraded)
        torch_labels = dense_crf_torch_grid(image, probs, grid, labels_only=True)  # as the search takes them
        for k, params in enumerate(grid):
            ours, theirs = torch_labels[k], _pydensecrf(image, probs, params).argmax(0)
            agreement = float((ours == theirs).mean())
            assert agreement >= 0.99, (name, params, agreement)
            confusions["torch", k] += confusion(label, ours, 21)
            confusions["pydensecrf", k] += confusion(label, theirs, 21)
    for k in range(3):
        assert abs(_miou(confusions["torch", k]) - _miou(confusions["pydensecrf", k])) < 0.2
