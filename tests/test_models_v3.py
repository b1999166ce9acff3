"""DeepLab v3 / v3+ models: shapes, atrous rates, output_stride switching, BN freezing, checkpoint loading,
input space and the Multiply-Adds claimed in docs/v3_models.md. Real widths, tiny spatial sizes."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from deeplab_v1.models import MODEL_NAMES, build_model
from deeplab_v1.models.aspp import ASPP, AtrousSeparableConv2d
from deeplab_v1.models.deeplabv3 import CAFFE_MEAN_BGR, InputSpace, freeze_batchnorm
from deeplab_v1.models.flops import count_multiply_adds
from deeplab_v1.models.resnet import ResNetBackbone, load_resnet_checkpoint
from deeplab_v1.models.xception import XceptionBackbone

V3_NAMES = ["deeplabv3-resnet101", "deeplabv3-resnet50", "deeplabv3-cascade-resnet101",
            "deeplabv3plus-resnet101", "deeplabv3plus-xception65"]


@pytest.fixture(scope="module")
def r50() -> nn.Module:
    torch.manual_seed(0)
    return build_model("deeplabv3-resnet50", num_classes=5)


_BUILT: dict[str, nn.Module] = {}


def named(name: str) -> nn.Module:
    """Each named model built once per test session with 7 classes (building ResNet-101 costs ~1 s)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = build_model(name, num_classes=7)
    model = _BUILT[name]
    model.set_output_stride(16)
    return model.eval()


def unit_rates(layer: nn.Sequential) -> list[int]:
    return [unit.conv2.dilation[0] for unit in layer]


@pytest.mark.slow
@pytest.mark.parametrize("name", V3_NAMES)
def test_every_named_model_builds_and_runs(name: str) -> None:
    assert name in MODEL_NAMES
    model = named(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65) * 50)
    stride = 4 if name.startswith("deeplabv3plus") else 16
    assert model.output_stride == stride
    assert out.shape == (1, 7, math.ceil(65 / stride), math.ceil(65 / stride))
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_output_shapes_for_each_output_stride(r50: nn.Module) -> None:
    r50.eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        for os_, side in ((8, 9), (16, 5), (32, 3)):
            r50.set_output_stride(os_)
            assert r50.output_stride == os_ == r50.encoder_output_stride
            assert r50(x).shape == (1, 5, side, side)
    r50.set_output_stride(16)


def test_v3plus_logits_stay_at_stride_4_for_every_encoder_stride() -> None:
    model = named("deeplabv3plus-resnet101")
    with torch.no_grad():
        for os_ in (32, 8):
            model.set_output_stride(os_)
            assert model.encoder_output_stride == os_
            assert model(torch.randn(1, 3, 33, 33)).shape == (1, 7, 9, 9)
    assert model.output_stride == 4


def test_resnet_dilations_multi_grid_and_strides() -> None:
    b = ResNetBackbone(101, output_stride=16, multi_grid=(1, 2, 4))
    assert unit_rates(b.layer3) == [1] * 23 and b.layer3[0].conv2.stride == (2, 2)
    # v3 Sec. 3.2.1: output_stride 16, Multi_Grid (1, 2, 4) -> block4 rates (2, 4, 8)
    assert unit_rates(b.layer4) == [2, 4, 8]
    assert b.layer4[0].conv2.stride == (1, 1) and b.layer4[0].downsample[0].stride == (1, 1)
    assert all(u.conv2.padding == u.conv2.dilation for u in b.layer4)
    b.set_output_stride(8)  # v3 Sec. 4: block3 rate 2, block4 rate 4 (x Multi-Grid)
    assert unit_rates(b.layer3) == [2] * 23 and b.layer3[0].conv2.stride == (1, 1)
    assert unit_rates(b.layer4) == [4, 8, 16]
    assert b.layer2[0].conv2.stride == (2, 2)
    b.set_output_stride(32)
    assert unit_rates(b.layer4) == [1, 2, 4] and b.layer4[0].conv2.stride == (2, 2)
    assert b.layer4[0].downsample[0].stride == (2, 2)


def test_cascade_rates_double_block_after_block() -> None:
    model = named("deeplabv3-cascade-resnet101")  # block7, Multi-Grid (1, 2, 1), output_stride 16
    b = model.backbone
    assert model.aspp is None and model.classifier.in_channels == 2048
    assert [unit_rates(getattr(b, f"layer{i}")) for i in (4, 5, 6, 7)] == [[2, 4, 2], [4, 8, 4], [8, 16, 8], [16, 32, 16]]
    assert all(getattr(b, f"layer{i}")[0].conv2.stride == (1, 1) for i in (4, 5, 6, 7))
    model.set_output_stride(32)
    assert [unit_rates(getattr(b, f"layer{i}")) for i in (4, 5, 6, 7)] == [[1, 2, 1], [2, 4, 2], [4, 8, 4], [8, 16, 8]]
    with pytest.raises(ValueError, match="no ASPP|none"):
        build_model("deeplabv3-cascade-resnet101", separable=True)


def test_aspp_rates_follow_output_stride(r50: nn.Module) -> None:
    r50.set_output_stride(16)
    assert r50.aspp.rates == (6, 12, 18)
    r50.set_output_stride(8)
    assert r50.aspp.rates == (12, 24, 36)
    convs = [br[0] for br in list(r50.aspp.branches)[1:]]
    assert [c.padding[0] for c in convs] == [12, 24, 36]
    r50.set_output_stride(16)
    with pytest.raises(ValueError, match="output_stride"):
        r50.set_output_stride(4)
    assert r50.aspp.rates == (6, 12, 18) and r50.output_stride == 16  # a bad value changes nothing


def test_separable_aspp_and_decoder() -> None:
    aspp = ASPP(64, (6, 12, 18), out_channels=16, separable=True)
    sep = list(aspp.branches)[1:]
    assert all(isinstance(b, AtrousSeparableConv2d) for b in sep)
    assert [b.depthwise.dilation[0] for b in sep] == [6, 12, 18]
    assert all(b.depthwise.groups == 64 for b in sep)
    aspp.set_rates((12, 24, 36))
    assert aspp.rates == (12, 24, 36)
    model = named("deeplabv3plus-xception65")
    assert all(isinstance(m, AtrousSeparableConv2d) for m in model.decoder.refine)
    assert model.decoder.reduce[0].out_channels == 48


@pytest.mark.slow
def test_set_output_stride_round_trip_gives_the_same_function(r50: nn.Module) -> None:
    r50.eval()
    x = torch.randn(1, 3, 49, 49) * 40
    with torch.no_grad():
        before = r50(x)
        r50.set_output_stride(8)
        mid = r50(x)
        r50.set_output_stride(16)
        after = r50(x)
    assert mid.shape[-1] == 7 and before.shape[-1] == 4
    torch.testing.assert_close(before, after)


def test_xception_strides_rates_and_low_level_features() -> None:
    b = named("deeplabv3plus-xception65").backbone
    assert isinstance(b, XceptionBackbone) and b.output_stride == 16
    ef, xf = b.entry_flow, b.exit_flow
    assert ef.block3.sepconv3.depthwise.stride == (2, 2)
    assert xf.block1.sepconv3.depthwise.stride == (1, 1) and xf.block1.shortcut[0].stride == (1, 1)
    assert [getattr(xf.block2, f"sepconv{i}").depthwise.dilation[0] for i in (1, 2, 3)] == [2, 2, 2]
    assert len(b.middle_flow) == 16
    b.set_output_stride(8)
    assert ef.block3.sepconv3.depthwise.stride == (1, 1)
    assert b.middle_flow[0].sepconv1.depthwise.dilation == (2, 2)
    assert xf.block2.sepconv1.depthwise.dilation == (4, 4)
    with torch.no_grad():
        feats = b(torch.randn(1, 3, 65, 65))
    b.set_output_stride(16)
    assert feats["low_level"].shape == (1, 256, 17, 17)
    assert feats["out"].shape == (1, 2048, 9, 9)


def test_freeze_bn_keeps_running_stats_and_stops_gradients(r50: nn.Module) -> None:
    r50.train()
    r50.freeze_bn(True)
    r50.train()  # the freeze must survive a later train()
    bns = [m for m in r50.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    out = r50(torch.randn(2, 3, 33, 33) * 50)
    out.mean().backward()
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad and p.grad is None for m in bns for p in m.parameters())
    assert all(torch.equal(m.running_mean, a) and torch.equal(m.running_var, v) for m, (a, v) in zip(bns, stats))
    assert r50.classifier.weight.grad is not None  # the rest still trains
    r50.freeze_bn(False)
    r50.zero_grad(set_to_none=True)
    assert all(m.training and m.weight.requires_grad for m in bns)
    r50(torch.randn(2, 3, 33, 33) * 50)
    assert not torch.equal(bns[0].running_mean, stats[0][0])  # unfrozen: statistics move again
    r50.eval()


def test_freeze_batchnorm_helper_and_bn_momentum() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert freeze_batchnorm(model) == 1 and not model[1].training and not model[1].weight.requires_grad
    m = build_model("deeplabv3-resnet50", bn_momentum=0.01)
    assert {bn.momentum for bn in m.modules() if isinstance(bn, nn.BatchNorm2d)} == {0.01}
    default = named("deeplabv3plus-xception65")
    assert {bn.momentum for bn in default.modules() if isinstance(bn, nn.BatchNorm2d)} == {0.0003}


@pytest.mark.slow
def test_load_resnet_checkpoint_common_layout(tmp_path) -> None:
    torch.manual_seed(1)
    src = ResNetBackbone(50, root="7x7")
    state = dict(src.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
            "layer4.2.conv3.weight", "layer4.2.bn3.bias"} <= set(state)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    torch.manual_seed(2)
    dst = build_model("deeplabv3-resnet50").backbone
    report = load_resnet_checkpoint(dst, path)
    assert report.ignored == ["fc.weight", "fc.bias"] and report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # A cascade backbone gets layer1-4 and reports the new blocks as missing.
    rep = load_resnet_checkpoint(ResNetBackbone(50, num_cascade=1), state)
    assert rep.missing and all(k.startswith("layer5.") for k in rep.missing)
    with pytest.raises(ValueError, match="missing.*layer3.6"):  # ResNet-50 weights for a ResNet-101
        load_resnet_checkpoint(ResNetBackbone(101), state)
    # Unexpected keys and shape mismatches are reported by name.
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        load_resnet_checkpoint(dst, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="conv1.weight"):
        load_resnet_checkpoint(ResNetBackbone(50, root="3x3-conv"), state)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_resnet_checkpoint(dst, tmp_path / "nope.pth")


def test_deep_stem_names() -> None:
    b = ResNetBackbone(50, root="3x3-conv")
    names = set(b.state_dict())
    assert {"conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight",
            "bn1.weight"} <= names
    assert b.conv1[6].out_channels == 128 and b.layer1[0].conv1.in_channels == 128


def test_input_space_torchvision_matches_imagenet_normalisation() -> None:
    from deeplab_v1.data.transforms import MEAN_BGR

    assert tuple(CAFFE_MEAN_BGR) == tuple(MEAN_BGR)
    rgb = torch.randint(0, 256, (1, 3, 5, 7)).float()
    caffe = rgb.flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    expected = (rgb / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(InputSpace("torchvision")(caffe), expected)
    torch.testing.assert_close(InputSpace("inception")(caffe), rgb / 127.5 - 1)
    assert InputSpace("caffe")(caffe) is caffe
    assert not InputSpace("torchvision").state_dict()  # constants are not checkpoint entries
    with pytest.raises(ValueError, match="input_space"):
        build_model("deeplabv3-resnet50", input_space="rgb")


@pytest.mark.parametrize("options, error", [
    ({"output_stride": 4}, ValueError), ({"root": "5x5"}, ValueError), ({"multi_grid": (1, 2)}, ValueError),
    ({"bn_momentum": 0.0}, ValueError), ({"no_such_option": 1}, TypeError),
])
def test_bad_options_raise(options: dict, error: type) -> None:
    with pytest.raises(error):
        build_model("deeplabv3-resnet50", **options)


def test_multiply_adds_counting_convention() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    r = count_multiply_adds(conv, 10, 10, device="cpu")
    assert r.total == 3 * 8 * 9 * 100 + 8 * 9 * 100  # MACs = FLOPs / 2, depthwise by groups
    s2b = count_multiply_adds(conv, 9, 9, device="cpu", atrous="space_to_batch")
    assert s2b.atrous_extra == 3 * 8 * 9 * (10 * 10 - 9 * 9)  # rate 2 on 9x9 computes 10x10 positions


# The Multiply-Adds claimed in docs/v3_models.md, against DeepLab v3+ Table 5 and Table 3 (513x513).
@pytest.mark.parametrize("factory, atrous, paper, tolerance", [
    (partial(build_model, "deeplabv3plus-xception65", output_stride=16), "exact", 54.17, 0.01),
    (partial(build_model, "deeplabv3-resnet101", root="3x3-conv", output_stride=16), "space_to_batch", 81.02, 0.03),
    (partial(build_model, "deeplabv3-resnet101", root="3x3-conv", output_stride=16), "exact", 81.02, 0.05),
])
def test_multiply_adds_match_the_paper(factory, atrous: str, paper: float, tolerance: float) -> None:
    macs = count_multiply_adds(factory, 513, 513, atrous=atrous)  # meta device: shapes only
    assert abs(macs.billions - paper) / paper < tolerance, f"{macs.billions:.2f}B vs paper {paper}B"
