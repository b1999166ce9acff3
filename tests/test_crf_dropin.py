"""crf.densecrf / crf.utils as a pydensecrf drop-in (issue #23 item 1): pydensecrf-style scripts run with
only their imports changed and give pydensecrf's labels and marginals on VOC val images; every option is
compared; pydensecrf's silent failures are errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crf.densecrf as dcrf
import crf.utils as dutils
from crf.errors import CRFInputError

pyd = pytest.importorskip("pydensecrf.densecrf")
pyd_utils = pytest.importorskip("pydensecrf.utils")

C = 21


def voc_pairs(voc, count: int = 2, step: int = 2) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(RGB uint8, label uint8 with void as 0, float32 (C, H, W) probabilities) of the first val images,
    every ``step``-th pixel: probabilities from the ground truth made noisy and coarse (stride-8 random
    logits, bilinear), so that the CRF has work to do."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for name in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]:
        rgb = np.array(Image.open(voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))[::step, ::step].copy()
        label = np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))[::step, ::step].copy()
        label[label == 255] = 0
        h, w = label.shape
        logits = rng.normal(size=(C, h // 8 + 1, w // 8 + 1)).astype(np.float32) * 2
        scores = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in logits])
        scores[label, np.arange(h)[:, None], np.arange(w)] += 2.5
        probs = np.exp(scores - scores.max(0))
        out.append((rgb, label, (probs / probs.sum(0)).astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def pairs(shared_voc):
    return voc_pairs(shared_voc)


# The three scripts of the issue, written once against "a pydensecrf": only the modules passed differ.
def script_softmax(densecrf, utils, rgb, label, probs, clip=1e-5):
    h, w = label.shape
    d = densecrf.DenseCRF2D(w, h, C)
    d.setUnaryEnergy(utils.unary_from_softmax(probs, clip=clip))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
    return np.array(d.inference(5))


def script_labels(densecrf, utils, rgb, label, probs):
    h, w = label.shape
    d = densecrf.DenseCRF(h * w, C)
    d.setUnaryEnergy(utils.unary_from_labels(label, C, gt_prob=0.7, zero_unsure=False))
    d.addPairwiseEnergy(utils.create_pairwise_gaussian(sdims=(3, 3), shape=(h, w)), compat=3)
    feats = utils.create_pairwise_bilateral(sdims=(50, 50), schan=(13, 13, 13), img=rgb, chdim=2)
    d.addPairwiseEnergy(feats, compat=5, kernel=densecrf.DIAG_KERNEL, normalization=densecrf.NORMALIZE_SYMMETRIC)
    return np.array(d.inference(5))


def script_matrix_steps(densecrf, utils, rgb, label, probs):
    h, w = label.shape
    compat = np.random.default_rng(1).normal(size=(C, C)).astype(np.float32) - 2 * np.eye(C, dtype=np.float32)
    d = densecrf.DenseCRF(h * w, C)
    d.setUnaryEnergy(utils.unary_from_softmax(probs, scale=0.9))
    d.addPairwiseEnergy(utils.create_pairwise_bilateral(sdims=(60, 60), schan=10, img=rgb, chdim=2), compat=compat)
    d.addPairwiseEnergy(utils.create_pairwise_gaussian(sdims=(3, 3), shape=(h, w)), compat=3)
    q, tmp1, tmp2 = d.startInference()
    kl = []
    for _ in range(4):
        d.stepInference(q, tmp1, tmp2)
        kl.append(d.klDivergence(q))
    return np.array(q), kl


def agree(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and b.dtype == np.float32
    assert (a.argmax(0) == b.argmax(0)).mean() >= 0.999
    assert np.abs(a - b).max() < 5e-3, np.abs(a - b).max()


@pytest.mark.parametrize("script", [script_softmax, script_labels])
def test_scripts_give_pydensecrf_labels(pairs, script):
    for rgb, label, probs in pairs:
        agree(script(pyd, pyd_utils, rgb, label, probs), script(dcrf, dutils, rgb, label, probs))


@pytest.mark.slow
def test_general_crf_matrix_compat_stepwise(pairs):
    for rgb, label, probs in pairs:
        q_ref, kl_ref = script_matrix_steps(pyd, pyd_utils, rgb, label, probs)
        q, kl = script_matrix_steps(dcrf, dutils, rgb, label, probs)
        agree(q_ref, q)
        np.testing.assert_allclose(kl, kl_ref, rtol=1e-3)
        assert kl[-1] < kl[0]  # mean field lowers the free energy


@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
@pytest.mark.parametrize("compat", ["potts", "diagonal", "matrix"])
def test_every_option_matches(pairs, normalization, compat):
    rgb, label, probs = pairs[0]
    rgb, label, probs = rgb[::2, ::2].copy(), label[::2, ::2], np.ascontiguousarray(probs[:, ::2, ::2])
    h, w = label.shape
    values = {"potts": 4.0, "diagonal": -np.linspace(1, 6, C, dtype=np.float32),
              "matrix": np.random.default_rng(2).normal(size=(C, C)).astype(np.float32)}[compat]
    out = []
    for module in (pyd, dcrf):
        d = module.DenseCRF2D(w, h, C)
        d.setUnaryEnergy(dutils.unary_from_softmax(probs))
        d.addPairwiseGaussian(sxy=(3, 4), compat=values, kernel=module.FULL_KERNEL, normalization=normalization)
        d.addPairwiseBilateral(sxy=(50, 60), srgb=(10, 12, 14), rgbim=rgb, compat=values,
                               kernel=module.CONST_KERNEL, normalization=normalization)
        out.append(np.array(d.inference(4)))
    agree(*out)


def test_utils_equal_pydensecrf(pairs):
    rgb, label, probs = pairs[0]
    for kwargs in ({}, {"scale": 0.8}, {"clip": None}, {"clip": 1e-3, "scale": 0.5}):
        np.testing.assert_array_equal(dutils.unary_from_softmax(probs, **kwargs), pyd_utils.unary_from_softmax(probs, **kwargs))
    for zero_unsure in (True, False):
        n = C - 1 if zero_unsure else C
        # pydensecrf needs a signed map here: its ``labels - 1`` wraps uint8 0 to 255 (an IndexError)
        np.testing.assert_array_equal(dutils.unary_from_labels(label, n, 0.6, zero_unsure),
                                      pyd_utils.unary_from_labels(label.astype(np.int32), n, 0.6, zero_unsure))
    np.testing.assert_array_equal(dutils.create_pairwise_gaussian((3, 5), label.shape),
                                  pyd_utils.create_pairwise_gaussian((3, 5), label.shape))
    for schan, chdim, img in (((10, 11, 12), 2, rgb), (7, -1, rgb[..., 0]), (9.0, 0, np.moveaxis(rgb, 2, 0))):
        np.testing.assert_array_equal(dutils.create_pairwise_bilateral((40, 50), schan, img, chdim),
                                      pyd_utils.create_pairwise_bilateral((40, 50), schan, img, chdim))


def test_constants_have_pydensecrf_values():
    for name in ("CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE",
                 "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"):
        assert int(getattr(dcrf, name)) == int(getattr(pyd, name)), name


def softmax_crfs(pairs, sxy: float, srgb: float, compat: float) -> list:
    """One DenseCRF2D per pair: the softmax script's model with the bilateral term's sxy, srgb, compat."""
    crfs = []
    for rgb, label, probs in pairs:
        h, w = label.shape
        d = dcrf.DenseCRF2D(w, h, C)
        d.setUnaryEnergy(dutils.unary_from_softmax(probs))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=rgb, compat=compat)
        crfs.append(d)
    return crfs


def test_batch_equals_one_by_one(pairs):
    crfs = softmax_crfs(pairs, 80, 13, 10)
    alone = [d.inference(5) for d in crfs]
    for one, batched in zip(alone, dcrf.inference_batch(crfs, 5)):
        assert (one.argmax(0) == batched.argmax(0)).mean() >= 0.999
        np.testing.assert_allclose(batched, one, atol=1e-4)


@pytest.mark.slow
def test_batch_on_worker_processes_equals_one_by_one(pairs):
    """inference_batch(workers=2): one task per CRF on a pool of two single-threaded processes (the every-core
    layout of a pipeline); each result is the CRF's own inference, in order, bit for bit."""
    crfs = softmax_crfs(pairs + pairs[:1], 50, 3, 5)
    alone = [d.inference(3) for d in crfs]  # built lattices stay here: a worker gets the model only
    try:
        pooled = dcrf.inference_batch(crfs, 3, workers=2)
        assert len(pooled) == len(alone)
        for one, other in zip(alone, pooled):
            assert other.shape == one.shape and other.dtype == np.float32
            np.testing.assert_array_equal(other, one)
        with pytest.raises(CRFInputError, match="workers"):
            dcrf.inference_batch(crfs, 3, workers=0)
    finally:
        while dcrf._POOL:
            dcrf._POOL.pop()[1].shutdown()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_equals_pydensecrf(pairs):
    rgb, label, probs = pairs[0]
    h, w = label.shape
    d = dcrf.DenseCRF2D(w, h, C, device="cuda")
    d.setUnaryEnergy(dutils.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
    agree(script_softmax(pyd, pyd_utils, rgb, label, probs), d.inference(5))


# ---------------------------------------------------------------- pydensecrf's silent failures: errors
def small():
    d = dcrf.DenseCRF2D(5, 4, 3)
    return d, np.zeros((4, 5, 3), np.uint8)


@pytest.mark.parametrize("call, words", [
    (lambda d, im: d.setUnaryEnergy(np.zeros((3, 20))), ["u (the unary energy)", "float32", "float64"]),
    (lambda d, im: d.setUnaryEnergy(np.zeros((20, 3), np.float32).T), ["C-contiguous", "ascontiguousarray"]),
    (lambda d, im: d.setUnaryEnergy(np.zeros((3, 21), np.float32)), ["(3, 20)", "(3, 21)"]),
    (lambda d, im: d.setUnaryEnergy(np.full((3, 20), np.nan, np.float32)), ["NaN"]),
    (lambda d, im: d.setUnaryEnergy(np.full((3, 20), np.inf, np.float32)), ["+inf for every label at 20 pixel"]),
    (lambda d, im: d.setUnaryEnergy(np.zeros((3, 20), np.float32), np.zeros((3, 20), np.float32)), ["not supported"]),
    (lambda d, im: d.setUnary(None), ["not supported"]),
    (lambda d, im: d.addPairwiseBilateral(3, 5, np.zeros((4, 5, 4), np.uint8), 3), ["rgbim", "(4, 5, 3)", "(4, 5, 4)"]),
    (lambda d, im: d.addPairwiseBilateral(3, 5, np.zeros((5, 4, 3), np.uint8), 3), ["rgbim", "(5, 4, 3)"]),
    (lambda d, im: d.addPairwiseBilateral(3, 5, im.astype(np.float32), 3), ["rgbim", "uint8"]),
    (lambda d, im: d.addPairwiseBilateral(3, 5, np.zeros((5, 4, 3), np.uint8).transpose(1, 0, 2), 3), ["rgbim", "C-contiguous"]),
    (lambda d, im: d.addPairwiseBilateral(3, (5, 5), im, 3), ["srgb", "3 of them"]),
    (lambda d, im: d.addPairwiseGaussian(0, 3), ["sxy", "> 0"]),
    (lambda d, im: d.addPairwiseGaussian(3, np.ones(4, np.float32)), ["compat", "(3,)", "(4,)"]),
    (lambda d, im: d.addPairwiseGaussian(3, np.ones((3, 2), np.float32)), ["compat", "(3, 2)"]),
    (lambda d, im: d.addPairwiseGaussian(3, 3, kernel=7), ["kernel", "DIAG_KERNEL"]),
    (lambda d, im: d.addPairwiseGaussian(3, 3, normalization=9), ["normalization", "NORMALIZE_SYMMETRIC"]),
    (lambda d, im: d.addPairwiseEnergy(np.zeros((2, 21), np.float32), 3), ["features", "(?, 20)", "(2, 21)"]),
    (lambda d, im: d.addPairwiseEnergy(np.zeros((2, 20), np.float64), 3), ["features", "float32"]),
    (lambda d, im: d.inference(-1), ["n_iterations"]),
    (lambda d, im: d.stepInference(*(np.zeros((3, 19), np.float32),) * 3), ["Q", "(3, 20)"]),
])
def test_errors_name_the_argument(call, words):
    d, im = small()
    with pytest.raises(CRFInputError) as info:
        call(d, im)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_utils_errors():
    with pytest.raises(CRFInputError, match=r"labels \[5\] are outside 0..4"):
        dutils.unary_from_labels(np.array([0, 5]), 4, 0.5)
    with pytest.raises(CRFInputError, match=r"labels \[-1\]"):
        dutils.unary_from_labels(np.array([0, -1]), 4, 0.5, zero_unsure=False)
    with pytest.raises(CRFInputError, match="sdims must be 2 numbers"):
        dutils.create_pairwise_gaussian((3,), (4, 5))
    with pytest.raises(CRFInputError, match="schan must be 3 numbers"):
        dutils.create_pairwise_bilateral((3, 3), (5, 5), np.zeros((4, 5, 3), np.uint8), chdim=2)
    with pytest.raises(CRFInputError, match="scale"):
        dutils.unary_from_softmax(np.full((2, 3), 0.5), scale=1.5)
    with pytest.raises(AttributeError, match="does not support pydensecrf's ConstUnary"):
        dcrf.ConstUnary  # noqa: B018
    with pytest.raises(CRFInputError, match="batch CRFs of one model"):
        a, b = small()[0], small()[0]
        a.addPairwiseGaussian(3, 3)
        b.addPairwiseGaussian(3, 4)
        dcrf.inference_batch([a, b], 1)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
def test_infinite_unary_forbids_a_label(pairs):
    """unary_from_softmax(clip=None) of probabilities with zeros: +inf energies, as pydensecrf takes them."""
    rgb, label, probs = pairs[0]
    probs = probs.copy()
    probs[1:4, :, :20] = 0  # labels 1..3 impossible in the first 20 columns
    probs /= probs.sum(0)
    out = [script_softmax(m, u, rgb, label, probs, clip=None) for m, u in ((pyd, pyd_utils), (dcrf, dutils))]
    assert np.isinf(dutils.unary_from_softmax(probs, clip=None)).any()
    agree(*out)


def test_read_only_arrays_are_taken(pairs):
    """pydensecrf refuses read-only buffers ("buffer source array is read-only", e.g. np.asarray of a PIL
    image); the drop-in takes them and gives pydensecrf's result on writable copies."""
    rgb, label, probs = pairs[0]
    reference = script_softmax(pyd, pyd_utils, rgb, label, probs)
    frozen = rgb.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        script_softmax(pyd, pyd_utils, frozen, label, probs)
    agree(reference, script_softmax(dcrf, dutils, frozen, label, probs))
