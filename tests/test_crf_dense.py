"""crf.dense (pydensecrf backend, input checks) and crf.parallel (resumable multi-process CRF runs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crf import CRFParams, dense_crf, scores_to_probs
from crf.input_files import write_crf_input
from crf.parallel import CRFTask, load_crf_input, run_crf_many

PARAMS = CRFParams(w1=10.0, sigma_alpha=20.0, sigma_beta=10.0)


def two_regions(h: int = 48, w: int = 64, seed: int = 0, flip: float = 0.25):
    """A dark left half and a bright right half, and a unary that is wrong on ``flip`` of the pixels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    image = np.where(truth[..., None] == 1, [220, 200, 180], [30, 40, 30]).astype(np.int16)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < flip, 1 - truth, truth)
    probs = np.empty((3, h, w), np.float32)
    probs[2] = 0.05  # a third class nobody has
    probs[0] = np.where(noisy == 0, 0.6, 0.35)
    probs[1] = 1.0 - probs[0] - probs[2]
    return image, probs, truth


def test_q_is_a_distribution_and_smooths_noisy_unary_toward_image_regions():
    image, probs, truth = two_regions()
    q = dense_crf(image, probs, PARAMS)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    before = (probs.argmax(0) != truth).mean()
    after = (q.argmax(0) != truth).mean()
    assert before > 0.2
    assert after < before / 5, (before, after)


def test_without_pairwise_weights_crf_keeps_the_unary_labelling():
    image, probs, _ = two_regions(seed=1)
    q = dense_crf(image, probs, CRFParams(w1=0.0, sigma_alpha=20.0, sigma_beta=10.0, w2=0.0))
    np.testing.assert_array_equal(q.argmax(0), probs.argmax(0))
    # no pairwise term: mean field returns softmax(-unary) = the probabilities themselves
    np.testing.assert_allclose(q, probs, atol=1e-5)


def test_non_contiguous_and_float16_inputs_give_the_same_result():
    image, probs, _ = two_regions(seed=2)
    ref = dense_crf(image, probs, PARAMS)
    # views with negative / non-unit strides (a mirrored image and its mirrored probabilities)
    img_view = image[:, ::-1]
    probs_view = probs[:, :, ::-1]
    assert not img_view.flags.c_contiguous and not probs_view.flags.c_contiguous
    q = dense_crf(img_view, probs_view, PARAMS)
    np.testing.assert_allclose(q, dense_crf(img_view.copy(), probs_view.copy(), PARAMS), atol=1e-6)
    # channel-last probabilities transposed to (C, H, W)
    q2 = dense_crf(image, np.moveaxis(np.ascontiguousarray(np.moveaxis(probs, 0, -1)), -1, 0), PARAMS)
    np.testing.assert_allclose(q2, ref, atol=1e-6)
    q16 = dense_crf(image, probs.astype(np.float16), PARAMS)
    assert (q16.argmax(0) == ref.argmax(0)).mean() > 0.99


def _bad_inputs():
    image, probs, _ = two_regions(h=8, w=10)
    unnorm = probs.copy()
    unnorm[0, 0, 0] += 0.1
    neg = probs.copy()
    neg[0, 0, 0], neg[1, 0, 0] = -0.1, neg[1, 0, 0] + 0.1
    nan = probs.copy()
    nan[1, 2, 3] = np.nan
    return [
        ("image_float", image.astype(np.float32), probs, TypeError, r"image must be uint8.*float32"),
        ("image_gray", image[..., 0], probs, ValueError, r"image must be \(H, W, 3\).*\(8, 10\)"),
        ("image_rgba", np.dstack([image, image[..., :1]]), probs, ValueError, r"image must be \(H, W, 3\).*\(8, 10, 4\)"),
        ("probs_2d", image, probs[0], ValueError, r"probs must be \(C, H, W\).*\(8, 10\)"),
        ("probs_int", image, (probs * 100).astype(np.int32), TypeError, r"probs must be floating.*int32"),
        ("probs_hw", image, probs[:, :7], ValueError, r"probs .*\(3, 7, 10\).*image .*\(8, 10, 3\)"),
        ("probs_hwc", image, np.moveaxis(probs, 0, -1), ValueError, r"probs .*\(8, 10, 3\).*image"),
        ("one_class", image, np.ones((1, 8, 10), np.float32), ValueError, r"C >= 2.*\(1, 8, 10\)"),
        ("nan", image, nan, ValueError, r"NaN or inf"),
        ("negative", image, neg, ValueError, r"non-negative.*-0\.1"),
        ("not_normalised", image, unnorm, ValueError, r"sum to 1 over C.*0\.1"),
        ("raw_scores", image, np.log(probs) * 3, ValueError, r"(non-negative|sum to 1)"),
    ]


@pytest.mark.parametrize("name,image,probs,exc,match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise_naming_the_problem(name, image, probs, exc, match):
    with pytest.raises(exc, match=match):
        dense_crf(image, probs, PARAMS)


def test_bad_backend_device_and_params():
    image, probs, _ = two_regions(h=8, w=10)
    with pytest.raises(ValueError, match=r"backend must be one of .*'caffe'"):
        dense_crf(image, probs, PARAMS, backend="caffe")
    with pytest.raises(ValueError, match=r"device 'cuda' .*pydensecrf"):
        dense_crf(image, probs, PARAMS, device="cuda")
    with pytest.raises(ValueError, match=r"device must be .*'tpu'"):
        dense_crf(image, probs, PARAMS, backend="torch", device="tpu")
    with pytest.raises(ValueError, match=r"params must be a crf.CRFParams, got dict"):
        dense_crf(image, probs, PARAMS.to_dict())


def test_scores_to_probs_is_a_stable_softmax():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 5, 6)) * 3
    p = scores_to_probs(scores)
    ref = np.exp(scores) / np.exp(scores).sum(0)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-7)
    # huge scores (exp would overflow) and a per-pixel shift (the unary constant mean field ignores)
    big = scores_to_probs(scores + 1000.0)
    np.testing.assert_allclose(big, p, atol=1e-4)  # float32 keeps ~7 digits of 1000 + x
    assert np.isfinite(scores_to_probs(np.array([[[1e4]], [[-1e4]]]))).all()
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        scores_to_probs(scores[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        scores_to_probs(np.full((2, 1, 1), np.inf))


def test_crf_of_softmax_is_invariant_to_a_per_pixel_score_offset():
    """-log softmax(fc8) = -fc8 + const(pixel): the release's raw-score unary gives the same CRF."""
    image, probs, _ = two_regions(seed=3)
    scores = np.log(probs)
    offset = np.random.default_rng(1).normal(size=probs.shape[1:]) * 50
    a = dense_crf(image, scores_to_probs(scores), PARAMS)
    b = dense_crf(image, scores_to_probs(scores + offset), PARAMS)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_torch_backend_agrees_with_pydensecrf():
    image, probs, truth = two_regions(seed=4)
    q = dense_crf(image, probs, PARAMS, backend="torch")
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    ref = dense_crf(image, probs, PARAMS)
    assert (q.argmax(0) == ref.argmax(0)).mean() > 0.95
    assert (q.argmax(0) != truth).mean() < (probs.argmax(0) != truth).mean() / 3


# --- crf.parallel -------------------------------------------------------------------------------------


def _write_crf_inputs(folder, n=3):
    paths = []
    for i in range(n):
        image, probs, _ = two_regions(h=24, w=32, seed=10 + i)
        p = folder / f"img{i}.npz"
        write_crf_input(p, image, probs.astype(np.float16))
        paths.append(p)
    return paths


def test_run_crf_many_in_process_and_in_workers_agree_and_resume(tmp_path):
    samples = _write_crf_inputs(tmp_path)
    one = [CRFTask(s, tmp_path / "one" / f"{s.stem}.png") for s in samples]
    two = [CRFTask(str(s), str(tmp_path / "two" / f"{s.stem}.npy")) for s in samples]
    s1 = run_crf_many(one, PARAMS, workers=1, progress=False)
    s2 = run_crf_many(two, PARAMS, workers=2, progress=False)
    assert (s1.done, s1.skipped, s2.done, s2.skipped) == (3, 0, 3, 0)
    for s, t1, t2 in zip(samples, one, two):
        a = np.array(Image.open(t1.out))
        b = np.load(t2.out)
        assert a.dtype == np.uint8 and b.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        arr = load_crf_input(s)
        np.testing.assert_array_equal(a, dense_crf(arr["image"], arr["probs"], PARAMS).argmax(0))
    # no temporary files left behind; a rerun skips everything, a deleted output is redone
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    (tmp_path / "one" / "img1.png").unlink()
    s3 = run_crf_many(one, PARAMS, workers=1, progress=False)
    assert (s3.done, s3.skipped) == (1, 2)


def test_run_crf_many_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(RuntimeError, match=r"bad\.npz.*lacks key\(s\) \['probs'\]"):
        run_crf_many([CRFTask(bad, tmp_path / "out.png")], PARAMS, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"\.png or \.npy.*out\.jpg"):
        CRFTask(bad, tmp_path / "out.jpg")
    with pytest.raises(ValueError, match=r"workers must be .*0"):
        run_crf_many([], PARAMS, workers=0, progress=False)
    missing = tmp_path / "missing.npz"
    with pytest.raises(RuntimeError, match=r"missing\.npz does not exist"):
        run_crf_many([CRFTask(missing, tmp_path / "m.png")], PARAMS, workers=1, progress=False)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "m.png").exists()


# --- what crf and deeplab_v1.evaluation share is public --------------------------------------------


def test_no_private_name_is_imported_across_modules():
    """Shared pieces are public and documented: no ``from x import _name`` of a project module, anywhere in a
    file of crf or deeplab_v1.evaluation (cycles and crf -> deeplab_v1 are tests/test_architecture.py's)."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted(p for pkg in ("crf", "deeplab_v1/evaluation") for p in (repo / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            project = isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").split(".")[0] in ("crf", "deeplab_v1"))
            if project:
                found += [f"{path.relative_to(repo)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []
