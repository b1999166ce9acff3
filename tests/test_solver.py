"""Caffe solver semantics: lr policies, lr/decay multipliers, Caffe's momentum form, the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deeplab_v1.engine.solver import CaffeSGD, caffe_param_groups, learning_rate
from deeplab_v1.engine.trainer import segmentation_loss
from deeplab_v1.models import build_model


def test_step_and_poly_policies():
    assert learning_rate(0, base_lr=1e-3, policy="step") == pytest.approx(1e-3)
    assert learning_rate(1999, base_lr=1e-3, policy="step") == pytest.approx(1e-3)
    assert learning_rate(2000, base_lr=1e-3, policy="step") == pytest.approx(1e-4)
    assert learning_rate(5999, base_lr=1e-3, policy="step") == pytest.approx(1e-5)
    assert learning_rate(50, base_lr=0.007, policy="poly", power=0.9, max_iter=100) == pytest.approx(0.007 * 0.5 ** 0.9)
    with pytest.raises(ValueError, match="policy"):
        learning_rate(0, base_lr=1, policy="exp")


def test_multipliers_follow_train_prototxt():
    with torch.device("meta"):
        model = build_model("deeplab-msc-largefov")
    groups = caffe_param_groups(model, base_lr=0.001, weight_decay=0.0005)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expect = {
        "conv1_1.weight": (0.001, 0.0005), "conv1_1.bias": (0.002, 0.0),
        "fc7.weight": (0.001, 0.0005), "fc8.weight": (0.01, 0.0005), "fc8.bias": (0.02, 0.0),
        "msc.pool3.ms.weight": (0.01, 0.0005), "msc.data.conv.bias": (0.02, 0.0),
    }
    for name, (lr, decay) in expect.items():
        g = by_param[id(named[name])]
        assert g["lr"] == pytest.approx(lr) and g["weight_decay"] == pytest.approx(decay), name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_lr_mult_patterns_override_freeze_and_first_match_wins():
    model = build_model("deeplab-msc")
    lr_mult = {"conv*": [0, 0], "fc8": [1, 2], "pool4_fc": [3, 0], "*_fc": [1, 2], "*": [0.5, 0]}
    groups = caffe_param_groups(model, base_lr=0.001, weight_decay=0.0005, lr_mult=lr_mult)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expect = {"fc8.weight": 0.001, "fc8.bias": 0.002, "msc.pool4.fc.weight": 0.003, "msc.pool1.fc.bias": 0.002,
              "fc6.weight": 0.0005, "msc.data.ms.weight": 0.0005}
    for name, lr in expect.items():
        assert by_param[id(named[name])]["lr"] == pytest.approx(lr), name
    # multiplier 0: out of the optimizer and no gradient (Caffe blobs_lr 0), both blobs of conv*; pool4_fc's bias
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert frozen == {f"conv{b}_{i}.{k}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)
                      for k in ("weight", "bias")} | {"msc.pool4.fc.bias", "fc6.bias", "fc7.bias",
                                                      "msc.data.conv.bias", "msc.pool1.conv.bias",
                                                      "msc.pool2.conv.bias", "msc.pool3.conv.bias",
                                                      "msc.pool4.conv.bias", "msc.data.ms.bias",
                                                      "msc.pool1.ms.bias", "msc.pool2.ms.bias",
                                                      "msc.pool3.ms.bias", "msc.pool4.ms.bias"}
    assert not any(id(named[n]) in by_param for n in frozen)
    # the decay multipliers stay Caffe's: weights x1, biases 0
    assert by_param[id(named["msc.pool4.fc.weight"])]["weight_decay"] == pytest.approx(0.0005)


def test_caffe_momentum_form_differs_from_torch_at_lr_change():
    w0 = torch.tensor([1.0, -2.0])
    grads = [torch.tensor([0.5, 0.25]), torch.tensor([-1.0, 0.5]), torch.tensor([0.2, 0.2])]
    lrs = [0.1, 0.1, 0.01]
    p = nn.Parameter(w0.clone())
    opt = CaffeSGD([{"params": [p], "lr": 0.0, "lr_mult": 1.0, "weight_decay": 0.1}], momentum=0.9)
    w, v = w0.clone(), torch.zeros(2)
    for g, lr in zip(grads, lrs):
        opt.set_lr(lr)
        p.grad = g.clone()
        opt.step()
        v = 0.9 * v + lr * (g + 0.1 * w)  # Caffe: SGDSolver::ComputeUpdateValue
        w = w - v
    assert torch.allclose(p.data, w)
    q = nn.Parameter(w0.clone())
    topt = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.1)
    for g, lr in zip(grads, lrs):
        for group in topt.param_groups:
            group["lr"] = lr
        q.grad = g.clone()
        topt.step()
    assert not torch.allclose(q.data, w)  # the forms differ once the lr steps


def test_loss_normalised_by_valid_positions():
    scores = torch.zeros(2, 3, 2, 2)
    scores[:, 1] = 2.0
    labels = torch.tensor([[[1, 255], [255, 255]], [[0, 255], [255, 255]]])
    import math

    p1 = math.exp(2) / (math.exp(2) + 2)
    p0 = 1 / (math.exp(2) + 2)
    expected = (-math.log(p1) - math.log(p0)) / 2  # 2 valid positions, not 8
    assert segmentation_loss(scores, labels).item() == pytest.approx(expected, rel=1e-5)
    assert segmentation_loss(scores, torch.full((2, 2, 2), 255)).item() == 0.0
    with pytest.raises(ValueError, match="do not match"):
        segmentation_loss(scores, labels[:, :1])


@pytest.mark.slow
def test_iter_size_equals_the_larger_batch(tmp_path):
    """Caffe's iter_size: batch 1 x iter_size 2 accumulates the same gradient as batch 2 (here every label
    is valid, so both normalise by the same count; dropout off so that the masks cannot differ)."""
    import cv2
    import numpy as np

    from deeplab_v1.config import TrainConfig
    from deeplab_v1.data.io import write_label
    from deeplab_v1.data.lists import Sample
    from deeplab_v1.engine.checkpoint import load_checkpoint
    from deeplab_v1.engine.trainer import train

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        img, lab = tmp_path / f"{i}.png", tmp_path / f"{i}_label.png"
        cv2.imwrite(str(img), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        write_label(lab, rng.integers(0, 3, (40, 40), dtype=np.uint8))
        samples.append(Sample(str(i), img, lab))
    results = {}
    for name, batch, iter_size in (("batch2", 2, 1), ("iter2", 1, 2)):
        torch.manual_seed(0)
        model = build_model("deeplab-largefov", num_classes=3)
        model.drop6.p = model.drop7.p = 0.0
        cfg = TrainConfig(iterations=3, batch_size=batch, iter_size=iter_size, base_lr=0.01, checkpoint_every=3,
                          mirror=False)
        train(model, samples, cfg, tmp_path / name, crop_size=33, seed=1, num_classes=3, progress=False,
              log=lambda _: None)
        results[name] = load_checkpoint(tmp_path / name / "final.pth")["state_dict"]
    a, b = results["batch2"], results["iter2"]
    assert any(not torch.equal(a[k], build_model("deeplab-largefov", num_classes=3).state_dict()[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
