"""DeepLab v1 networks: parameter counts (paper Table 2), score-map sizes (release prototxts), and the
hole algorithm's exactness (paper Sec. 3.1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from deeplab_v1.models import MODEL_NAMES, build_model
from deeplab_v1.models.vgg import SPECS, DeepLabVGG, score_size

V1 = ["deeplab", "deeplab-7x7", "deeplab-4x4", "deeplab-largefov", "deeplab-msc", "deeplab-msc-largefov"]


def _count(name: str) -> float:
    with torch.device("meta"):
        model = build_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name,millions", [("deeplab-7x7", 134.3), ("deeplab", 65.1), ("deeplab-4x4", 65.1),
                                           ("deeplab-largefov", 20.5)])
def test_parameter_counts_match_paper_table2(name, millions):
    assert abs(_count(name) - millions) < 0.1 / 2 + 1e-9 or round(_count(name), 1) == millions


def test_every_v1_variant_is_registered():
    assert set(V1) <= set(MODEL_NAMES)
    with pytest.raises(KeyError, match="unknown model"):
        build_model("deeplab-9x9")


def test_caffe_layer_names():
    m = build_model("deeplab-msc", num_classes=3)
    names = m.caffe_layer_names()
    assert names[:2] == ["conv1_1", "conv1_2"] and "fc8" in names and "pool4_ms" in names and "data_conv" in names
    assert m.caffe_layer("pool2_fc").weight.shape == (128, 128, 1, 1)
    assert m.caffe_layer("data_conv").stride == (8, 8)
    with pytest.raises(KeyError):
        m.caffe_layer("fc9")


@pytest.mark.slow
@pytest.mark.parametrize("name,size,out", [("deeplab", 306, 39), ("deeplab", 514, 65), ("deeplab-largefov", 321, 41),
                                           ("deeplab-largefov", 513, 65), ("deeplab-msc", 321, 41)])
def test_score_map_sizes_match_release(name, size, out):
    assert score_size(name, size) == out
    spec = dataclasses.replace(SPECS[name], fc_channels=8)  # same geometry, cheap
    model = DeepLabVGG(spec, num_classes=2).eval()
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, size, size)).shape) == (1, 2, out, out)


# ------------------------------------------------------------------------------ hole algorithm exactness


def _dense_maxpool(x, pool, d):
    k, p = pool.kernel_size, pool.padding
    x = F.pad(x, (p * d, p * d + k * d, p * d, p * d + k * d), value=float("-inf"))
    return F.max_pool2d(x, k, stride=1, dilation=d)


def _dense_conv(x, conv, d):
    return F.conv2d(x, conv.weight, conv.bias, stride=1, padding=conv.padding[0] * d, dilation=conv.dilation[0] * d)


def _crop(x, ref, d):
    """Trim the dense map to the span of the strided map ``ref``: (n - 1) * d + 1 positions."""
    return x[..., : (ref.shape[-2] - 1) * d + 1, : (ref.shape[-1] - 1) * d + 1]


def _dense_forward(model: DeepLabVGG, x: torch.Tensor):
    """Evaluate ``model`` at EVERY input pixel (output_stride 1) with the same weights: each layer of
    stride s on a grid of step d becomes a stride-1 layer dilated by d (the hole algorithm), d *= s.
    Returns the dense scores and the strided ones, computed side by side."""
    d = 1
    hs, hd = x, x
    taps = {"data": (hs, hd, 1)}
    for b, n in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, n + 1):
            conv = getattr(model, f"conv{b}_{i}")
            hs = F.relu(conv(hs))
            hd = F.relu(_dense_conv(hd, conv, d))
        pool = getattr(model, f"pool{b}")
        hs = pool(hs)
        hd = _dense_maxpool(hd, pool, d)
        d *= pool.stride
        hd = _crop(hd, hs, d)
        taps[f"pool{b}"] = (hs, hd, d)
        assert torch.allclose(hd[..., ::d, ::d], hs, atol=1e-5 * hs.abs().max().item(), rtol=1e-4), f"pool{b}"
    if model.pool5a is not None:
        hs = model.pool5a(hs)
        c = hd.shape[1]
        hd = F.conv2d(hd, torch.full((c, 1, 3, 3), 1 / 9), padding=d, dilation=d, groups=c)
    hs = F.relu(model.fc6(hs))
    hd = F.relu(_dense_conv(hd, model.fc6, d))
    hs = F.relu(model.fc7(hs))
    hd = F.relu(_dense_conv(hd, model.fc7, d))
    hs, hd = model.fc8(hs), _dense_conv(hd, model.fc8, d)
    for name, branch in model.msc.items():
        ts, td, dt = taps[name]
        bs = branch(ts)
        y = F.relu(_dense_conv(td, branch.conv, dt))  # stride s conv on a step-dt grid -> step dt*s
        y = F.relu(_dense_conv(y, branch.fc, dt * branch.conv.stride[0]))
        y = _dense_conv(y, branch.ms, dt * branch.conv.stride[0])
        hs, hd = hs + bs, hd + _crop(y, bs, d)
    return hd, hs


@pytest.mark.parametrize("base", ["deeplab", "deeplab-msc-largefov"])
def test_hole_algorithm_is_exact(base):
    """Paper Sec. 3.1: the hole algorithm computes dense responses "without introducing any
    approximations": the stride-1 dilated network's output sampled every 8 pixels equals the output of the
    stride-8 network (the release's), with the same weights."""
    torch.manual_seed(0)
    spec = dataclasses.replace(SPECS[base], fc_channels=16)
    model = DeepLabVGG(spec, num_classes=3).eval()
    for m in model.modules():  # larger weights keep activations alive through 16 ReLU layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=(2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5)
            torch.nn.init.normal_(m.bias, std=0.1)
    # MSc branch outputs align with fc8 for sides of 8k + 1 (321, 513 in the release)
    x = torch.randn(1, 3, *((41, 49) if spec.msc else (43, 37))) * 50
    with torch.no_grad():
        dense, strided = _dense_forward(model, x)
        assert torch.equal(strided, model(x))
    sampled = dense[..., ::8, ::8]
    assert sampled.shape == strided.shape
    assert strided.abs().max() > 1e-3  # not a trivially zero network
    assert torch.allclose(sampled, strided, atol=1e-4 * strided.abs().max().item(), rtol=1e-4)
    # and the dense map really is denser: positions between the samples carry other values
    assert not torch.allclose(dense[..., 4::8, 4::8][..., : strided.shape[-2] - 1, : strided.shape[-1] - 1],
                              strided[..., :-1, :-1])


@pytest.mark.slow
@pytest.mark.parametrize("name,size,out,stride,offset", [("deeplab", 514, 67, 8, 7), ("deeplab-4x4", 514, 67, 8, 7),
                                                         ("deeplab-largefov", 513, 65, 8, 0),
                                                         ("deeplab-msc", 513, 513, 1, 0)])
def test_test_net_sizes_match_test_prototxt(name, size, out, stride, offset):
    """test.prototxt: DeepLab pads pool4 by 1 (514 -> 67 cells, the training net gives 65), the MSc nets
    fuse their branches at full resolution."""
    spec = dataclasses.replace(SPECS[name], fc_channels=8)
    model = DeepLabVGG(spec, num_classes=2).eval()
    with torch.no_grad():
        assert tuple(model.test_net(torch.zeros(1, 3, size, size)).shape) == (1, 2, out, out)
        train_out = model(torch.zeros(1, 3, size, size)).shape[-1]
    assert (model.test_stride, model.test_offset) == (stride, offset)
    assert train_out == (65 if spec.pool_kernel == 2 else score_size(name, size))


def test_msc_branch_fillers_follow_train_prototxt():
    """DeepLab-MSc*/train.prototxt: *_conv and *_fc std 0.001, pool4_fc 0.005, *_ms 0.01, pool3_ms no
    filler (constant 0); biases constant 0; fc8 std 0.01."""
    torch.manual_seed(0)
    model = build_model("deeplab-msc-largefov")
    for branch in ("data", "pool1", "pool2", "pool3", "pool4"):
        for part in ("conv", "fc", "ms"):
            layer = model.caffe_layer(f"{branch}_{part}")
            expect = {"conv": 0.001, "fc": 0.005 if branch == "pool4" else 0.001, "ms": 0.0 if branch == "pool3" else 0.01}[part]
            std = layer.weight.std().item()
            assert abs(std - expect) <= 0.1 * expect + (0 if expect else 0.0), (branch, part, std)
            assert (layer.bias == 0).all()
    assert (model.caffe_layer("pool3_ms").weight == 0).all()
    assert abs(model.fc8.weight.std().item() - 0.01) < 0.001
