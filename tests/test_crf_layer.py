"""crf.DenseCRFLayer (issue #24 item 1): the post-hoc CRF at its initial parameters, exact gradients
(the filter's backward is its transpose), learnable parameters, backward memory per iteration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import crf
from crf import CRFParams, RELEASE_LARGEFOV, dense_crf
from crf._adjoint import NormalisedFilter, filter_with_adjoint
from crf.errors import CRFInputError
from crf.layer import DenseCRFLayer
from crf.permutohedral import PermutohedralLattice, bilateral_features
from crf.torch_backend import symmetric_normalization

SMALL = CRFParams(w1=4.0, sigma_alpha=3.0, sigma_beta=20.0, w2=3.0, sigma_gamma=1.0, iterations=2)


def voc_samples(voc, count: int = 2, step: int = 2) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(RGB uint8 (H, W, 3), label uint8 (H, W) with 255 void, float32 (21, H, W) DIAGNOSTIC probabilities
    from degraded ground truth) of the first ``count`` val images, every ``step``-th pixel."""
    from PIL import Image

    from deeplab_v1.data.degraded import degraded_probs

    out = []
    for name in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]:
        rgb = np.array(Image.open(voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))[::step, ::step].copy()
        label = np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))[::step, ::step].copy()
        out.append((rgb, label, degraded_probs(label)))
    return out


def log_probs(probs: np.ndarray) -> torch.Tensor:
    """The scores whose softmax gives the post-hoc CRF's unary: ``log(max(P, PROB_EPSILON))``, (1, C, H, W)."""
    return torch.from_numpy(np.log(np.maximum(probs, crf.dense.PROB_EPSILON)))[None]


def small_problem(seed: int = 0, classes: int = 3, height: int = 5, width: int = 6):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (1, 3, height, width), generator=g, dtype=torch.uint8)
    scores = torch.randn(1, classes, height, width, generator=g, dtype=torch.float64)
    return images, scores


# ---------------------------------------------------------------------------- the adjoint
def test_backward_filter_is_the_exact_transpose_and_differs_from_the_forward_filter():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (5, 6, 3), generator=g, dtype=torch.uint8)
    lattice = PermutohedralLattice(bilateral_features(image, 3.0, 20.0))
    op = NormalisedFilter(lattice, symmetric_normalization(lattice), torch.float64)
    eye = torch.eye(30, dtype=torch.float64)
    k = op.apply(eye)
    torch.testing.assert_close(op.apply(eye, transpose=True), k.T, rtol=0, atol=1e-14)
    # the blurs along the lattice directions do not commute on a sparse lattice: the normalised filter
    # is not symmetric, so "the same filter" would not be its adjoint
    assert float((k - k.T).abs().max()) > 1e-3
    # float32 forward: the torch backend's filter, bit for bit
    values = torch.rand(30, 4, generator=g)
    f32 = NormalisedFilter(lattice, symmetric_normalization(lattice))
    assert torch.equal(f32.apply(values), lattice.filter(values, scale=symmetric_normalization(lattice)))


def test_filter_function_gradcheck_in_float64():
    g = torch.Generator().manual_seed(4)
    image = torch.randint(0, 256, (4, 5, 3), generator=g, dtype=torch.uint8)
    lattice = PermutohedralLattice(bilateral_features(image, 2.0, 30.0))
    op = NormalisedFilter(lattice, symmetric_normalization(lattice), torch.float64)
    values = torch.randn(20, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v: filter_with_adjoint(v, op), (values,))


# ---------------------------------------------------------------------------- gradients of the layer
@pytest.mark.slow
def test_gradcheck_of_scores_and_every_learnable_parameter():
    layer = DenseCRFLayer(3, SMALL).double()
    names = [name for name, _ in layer.named_parameters()]
    assert sorted(names) == ["compatibility_raw", "w1_log_gain", "w2_log_gain"]
    images, scores = small_problem()
    g = torch.Generator().manual_seed(1)
    # away from the initial values (Potts, gain 0) so that every entry's gradient is generic
    values = [(p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)).requires_grad_(True)
              for _, p in layer.named_parameters()]

    def run(s, *params):
        return functional_call(layer, dict(zip(names, params)), (images, s))

    assert gradcheck(run, (scores.requires_grad_(True), *values))
    # a batch of two images: one lattice, the images kept apart as segments
    images2, scores2 = small_problem(seed=7, height=4, width=3)
    images2 = torch.cat([images2, images2.flip(-1)])
    scores2 = torch.cat([scores2, scores2.flip(-2)]).requires_grad_(True)
    assert gradcheck(lambda s, *params: functional_call(layer, dict(zip(names, params)), (images2, s)),
                     (scores2, *values))


def test_learned_weights_stay_positive_and_the_compatibility_symmetric():
    layer = DenseCRFLayer(3, SMALL)
    with torch.no_grad():
        layer.w1_log_gain.fill_(-30.0)
        layer.compatibility_raw[0, 1] = 2.0
    assert 0 < layer.current_params().w1 < 1e-10
    mu = layer.compatibility()
    assert torch.equal(mu, mu.T) and float(mu.detach()[0, 1]) == 1.0


def test_an_optimizer_step_changes_the_learned_parameters_only():
    images, scores = small_problem(classes=4, height=8, width=7)
    labels = torch.randint(0, 4, (1, 8, 7), generator=torch.Generator().manual_seed(2))
    for learn in (("w1", "w2", "compatibility"), ("w2",)):
        layer = DenseCRFLayer(4, SMALL, learn=learn)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        loss = torch.nn.functional.cross_entropy(layer(images, scores.float()), labels)
        loss.backward()
        optimizer.step()
        changed = {k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])}
        expected = {"compatibility": "compatibility_raw"}
        assert changed == {expected.get(name, f"{name}_log_gain") for name in learn}, (learn, changed)
    assert layer.current_params().w1 == SMALL.w1 and layer.current_params().w2 != SMALL.w2


def test_backward_keeps_a_few_pixel_by_class_tensors_per_iteration_and_no_lattice_values(monkeypatch):
    """Saved-for-backward bytes grow by at most 4 (P, C) tensors per iteration (Q, the two filtered Q, the
    message), independent of the lattices' size and of their d + 1 blur passes."""
    images, scores = small_problem(classes=5, height=24, width=20)
    layer = DenseCRFLayer(5, SMALL)
    lattices = layer.prepare(images)
    rows = {lat.num_lattice for lat, _ in (lattices.bilateral, lattices.gaussian)}
    pixels_by_classes = 24 * 20 * 5

    def saved_bytes(iterations: int) -> tuple[int, set]:
        seen: dict[int, torch.Tensor] = {}

        def pack(t):
            seen.setdefault(id(t), t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(None, scores.float().requires_grad_(True), lattices=lattices, iterations=iterations)
        return sum(t.numel() * t.element_size() for t in seen.values()), {t.shape[0] for t in seen.values() if t.dim()}

    (b2, shapes2), (b6, shapes6) = saved_bytes(2), saved_bytes(6)
    per_iteration = (b6 - b2) / 4
    assert 0 < per_iteration <= 4 * pixels_by_classes * 4 + 1024, per_iteration
    assert not (rows & (shapes2 | shapes6)), "a lattice-sized tensor was saved for backward"
    # the measure sees the difference: autograd through the lattice passes saves lattice-sized tensors
    monkeypatch.setattr("crf.layer.filter_with_adjoint", lambda values, op: op.apply(values))
    (n2, naive2), (n6, _) = saved_bytes(2), saved_bytes(6)
    assert rows <= naive2 and (n6 - n2) / 4 > 10 * per_iteration


# ---------------------------------------------------------------------------- equals the post-hoc CRF
@pytest.fixture(scope="module")
def voc(shared_voc):
    return voc_samples(shared_voc, count=2, step=2)


@pytest.mark.slow
def test_initial_layer_gives_dense_crf_and_pydensecrf_labels_on_voc(voc):
    pytest.importorskip("pydensecrf.densecrf")
    params = RELEASE_LARGEFOV
    layer = DenseCRFLayer(21, params)
    for rgb, _, probs in voc:
        with torch.no_grad():
            energy = layer(torch.from_numpy(rgb).permute(2, 0, 1)[None], log_probs(probs))
        q = torch.softmax(energy, dim=1)[0].numpy()
        ours = q.argmax(0)
        torch_q = dense_crf(rgb, probs, params, backend="torch")
        np.testing.assert_allclose(q, torch_q, atol=1e-4)
        assert np.array_equal(ours, torch_q.argmax(0))
        theirs = dense_crf(rgb, probs, params, backend="pydensecrf").argmax(0)
        assert float((ours == theirs).mean()) >= 0.999
        # and the CRF changed something (the comparison is not between unchanged unaries)
        assert float((ours != probs.argmax(0)).mean()) > 0.01


def test_batch_of_two_equals_each_image_alone_and_autocast_runs_in_float32(voc):
    (rgb, _, probs), _ = voc
    h, w = 60, 70
    images = torch.from_numpy(np.stack([rgb[:h, :w], rgb[-h:, -w:]])).permute(0, 3, 1, 2).float()
    scores = torch.cat([log_probs(probs[:, :h, :w]), log_probs(probs[:, -h:, -w:])])
    layer = DenseCRFLayer(21, RELEASE_LARGEFOV, iterations=3)
    with torch.no_grad():
        batch = layer(images, scores)
        alone = torch.cat([layer(images[i : i + 1], scores[i : i + 1]) for i in range(2)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = layer(images, scores.bfloat16())
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, layer(images, scores.bfloat16().float()).detach())


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(learn=("w1", "sigma_alpha")), "learn"),
        (dict(learn="w1"), "learn"),
        (dict(iterations=-1), "iterations"),
        (dict(params=CRFParams(w1=0.0, sigma_alpha=3, sigma_beta=3)), "w1"),
    ],
)
def test_bad_construction_is_a_named_error(kwargs, message):
    args = dict(num_classes=3, params=SMALL) | kwargs
    with pytest.raises(CRFInputError, match=message):
        DenseCRFLayer(**args)


def test_bad_forward_inputs_are_named_errors():
    layer = DenseCRFLayer(3, SMALL)
    images, scores = small_problem()
    with pytest.raises(CRFInputError, match="C=4"):
        layer(images, torch.zeros(1, 4, 5, 6))
    with pytest.raises(CRFInputError, match="do not match"):
        layer(images, torch.zeros(1, 3, 6, 6))
    with pytest.raises(CRFInputError, match="0..255"):
        layer(images.float() / 255 - 0.5, scores)
    with pytest.raises(CRFInputError, match="finite"):
        layer(images, torch.full((1, 3, 5, 6), float("-inf")))
    # a weight of 0 that is not learned drops its kernel, as in the post-hoc CRF
    fixed = DenseCRFLayer(3, CRFParams(w1=0.0, sigma_alpha=3, sigma_beta=3, iterations=2), learn=("w2",))
    assert fixed.prepare(images).bilateral is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_gives_the_cpu_values_and_gradients():
    images, scores = small_problem(classes=4, height=20, width=24)
    results = []
    for device in ("cpu", "cuda"):
        layer = DenseCRFLayer(4, SMALL).to(device)
        s = scores.float().to(device).requires_grad_(True)
        out = layer(images.to(device), s)
        out.square().sum().backward()
        results.append([t.detach().cpu() for t in (out, s.grad, *(p.grad for p in layer.parameters()))])
    for cpu_value, cuda_value in zip(*results):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=1e-4, atol=1e-4)
