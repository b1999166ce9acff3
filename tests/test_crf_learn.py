"""crf.fit_crf (issue #24 item 2, the library part): CRF parameters fitted by gradient on cached scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crf import RELEASE_LARGEFOV, CRFParams, FitResult, fit_crf
from crf.errors import CRFInputError
from test_crf_layer import voc_samples


@pytest.fixture(scope="module")
def small_voc(shared_voc):
    return voc_samples(shared_voc, count=4, step=4)


@pytest.mark.slow
def test_fit_on_voc_lowers_the_fit_objective_reports_the_held_out_share_and_is_json(small_voc):
    images, probs, labels = ([s[i] for s in small_voc] for i in (0, 2, 1))
    start = CRFParams.from_dict({**RELEASE_LARGEFOV.to_dict(), "iterations": 3})
    seen = []
    result = fit_crf(images, probs, labels, start, epochs=3, batch=2, held_out=0.25, lr=0.1, seed=0,
                     patience=3, progress=seen.append)
    assert len(result.held_out_images) == 1 and len(result.fit_images) == 3
    assert not set(result.held_out_images) & set(result.fit_images)
    fit, held = result.objective["fit"], result.objective["held_out"]
    assert fit["after"] < fit["before"], result.objective
    assert held is not None and all(np.isfinite([held["before"], held["after"]]))
    # the returned parameters are the held-out best: never worse there than the start
    assert held["after"] <= held["before"]
    assert result.params.w1 != start.w1 and result.params.w2 != start.w2
    mu = np.array(result.compatibility)
    assert mu.shape == (21, 21) and np.allclose(mu, mu.T) and not np.allclose(mu, -np.eye(21))
    assert (result.params.sigma_alpha, result.params.sigma_beta, result.params.sigma_gamma) == (49.0, 5.0, 3.0)
    assert len(seen) == result.epochs_run and seen[-1]["held_out"] is not None
    text = json.dumps(result.to_dict())
    back = FitResult.from_dict(json.loads(text))
    assert back.params == result.params and back.compatibility == result.compatibility


def _synthetic(count: int = 3, size: int = 12, classes: int = 3):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    labels = [rng.integers(0, classes, (size, size)) for _ in range(count)]
    scores = [rng.normal(size=(classes, size, size)).astype(np.float32) for _ in range(count)]
    return images, scores, labels


def test_only_the_listed_parameters_are_fitted_and_no_held_out_share_is_allowed():
    images, scores, labels = _synthetic()
    labels[0][:] = 255  # void pixels are ignored
    params = CRFParams(w1=3.0, sigma_alpha=4.0, sigma_beta=30.0, w2=2.0, sigma_gamma=2.0, iterations=2)
    result = fit_crf(images, scores, labels, params, learn=["w2"], inputs_are="scores", epochs=2, batch=3,
                     held_out=0.0)
    assert result.params.w1 == params.w1 and result.params.w2 != params.w2
    assert np.array_equal(np.array(result.compatibility), -np.eye(3))
    assert result.objective["held_out"] is None and result.held_out_images == [] and result.steps == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels_value=7), "item 0: label values \\[7\\]"),
        (dict(held_out=1.0), "held_out"),
        (dict(learn=["sigma_beta"]), "learn"),
        (dict(inputs_are="logits"), "inputs_are"),
        (dict(epochs=0), "epochs"),
        (dict(drop_label=True), "equal length"),
    ],
)
def test_bad_input_is_a_named_error(change, message):
    images, scores, labels = _synthetic()
    if "labels_value" in change:
        labels[0][0, 0] = change.pop("labels_value")
    if change.pop("drop_label", False):
        labels = labels[:-1]
    kwargs = dict(inputs_are="scores") | change
    with pytest.raises(CRFInputError, match=message):
        fit_crf(images, scores, labels, CRFParams(w1=3, sigma_alpha=4, sigma_beta=30), **kwargs)


def test_the_same_seed_gives_the_same_fit_and_another_seed_another_split():
    images, scores, labels = _synthetic(count=4)
    params = CRFParams(w1=3.0, sigma_alpha=4.0, sigma_beta=30.0, w2=2.0, sigma_gamma=2.0, iterations=2)
    runs = [fit_crf(images, scores, labels, params, inputs_are="scores", epochs=2, batch=2, held_out=0.25, seed=seed)
            for seed in (3, 3, 6)]
    first, again, other = (r.to_dict() for r in runs)
    for d in (first, again, other):
        d.pop("seconds")
    assert first == again
    assert first["held_out_images"] != other["held_out_images"]
