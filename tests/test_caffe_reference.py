"""Tests of the independent Caffe reference interpreter (tests/caffe_reference.py).

Every expected number below is worked by hand from Caffe's formulas (pooling_layer.cpp, conv_layer.cpp,
deeplab-public interp_layer.cpp / caffe_cpu_interp2, padding_layer.cpp) or read off the release's
prototxts, never produced by running the interpreter twice. Cases that read the release's prototxts use
the ``shared_reference`` fixture and skip where ../shared/reference is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caffe_reference import (
    CaffeReferenceNet,
    Unresolved,
    caffe_conv,
    caffe_interp,
    caffe_padding,
    caffe_pool,
    conv_output_size,
    interp_output_size,
    parse_prototxt,
    pool_output_size,
    random_weights,
)

VARIANTS = ["DeepLab", "DeepLab-LargeFOV", "DeepLab-MSc", "DeepLab-MSc-LargeFOV"]


@pytest.fixture(scope="module")
def proto(shared_reference) -> Path:
    return shared_reference / "deeplab-public" / "prototxt"


def _net(proto: Path, variant: str, which: str, phase: str, **variables) -> CaffeReferenceNet:
    return CaffeReferenceNet(parse_prototxt(proto / variant / f"{which}.prototxt", variables or None), phase)


def _by_name(layers: list[dict], name: str) -> list[dict]:
    return [layer for layer in layers if layer.get("name") == name]


# ============================================================================ size rules (hand-worked)


@pytest.mark.parametrize("size,k,s,p,out", [
    # DeepLab train.prototxt, 306 crop: pool1-3 kernel 2 stride 2 pad 1, pool4 kernel 2 stride 1 pad 0
    (306, 2, 2, 1, 154), (154, 2, 2, 1, 78), (78, 2, 2, 1, 40), (40, 2, 1, 0, 39),
    # DeepLab test.prototxt, 514: same pool1-3; pool4 kernel 2 stride 1 *pad 1*
    (514, 2, 2, 1, 258), (258, 2, 2, 1, 130), (130, 2, 2, 1, 66), (66, 2, 1, 1, 67),
    # LargeFOV, 513: kernel 3 stride 2 pad 1, pool4 kernel 3 stride 1 pad 1
    (513, 3, 2, 1, 257), (257, 3, 2, 1, 129), (129, 3, 2, 1, 65), (65, 3, 1, 1, 65),
    # ceil((5 + 2 - 2) / 2) + 1 = 4, but window 3 would start at 3*2 - 1 = 5 >= 5 + 1 - 1: Caffe drops it
    (5, 2, 2, 1, 3),
    # no pad: ceil((7 - 2) / 2) + 1 = 4 (ceil, where convolution would floor to 3)
    (7, 2, 2, 0, 4),
])
def test_pool_output_size_is_caffes_ceil_rule(size, k, s, p, out):
    assert pool_output_size(size, k, s, p) == out


@pytest.mark.parametrize("size,k,s,p,hole,out", [
    (67, 4, 1, 6, 4, 67),    # DeepLab fc6: k_eff = 4 + 3*3 = 13; 67 + 12 - 13 + 1
    (65, 3, 1, 12, 12, 65),  # LargeFOV fc6: k_eff = 25; 65 + 24 - 25 + 1
    (321, 3, 8, 1, 1, 41),   # MSc data_conv: (321 + 2 - 3) // 8 + 1 = 40 + 1
    (7, 2, 2, 0, 1, 3),      # floor((7 - 2) / 2) + 1
])
def test_conv_output_size_floors(size, k, s, p, hole, out):
    assert conv_output_size(size, k, s, p, hole) == out


@pytest.mark.parametrize("kwargs,out", [
    (dict(size=65, zoom_factor=8), 513),                            # 65 + 64 * 7
    (dict(size=67, zoom_factor=8), 529),                            # 67 + 66 * 7
    (dict(size=306, shrink_factor=8, pad_beg=-1), 39),              # (305 - 1) // 8 + 1
    (dict(size=321, shrink_factor=8), 41),                          # 320 // 8 + 1
    (dict(size=9, shrink_factor=4, zoom_factor=2), 5),              # shrink: 8 // 4 + 1 = 3; zoom: 3 + 2
    (dict(size=10, explicit=4), 4),
    (dict(size=12, zoom_factor=2, pad_beg=-1, pad_end=-2), 17),     # eff 9: 9 + 8
])
def test_interp_output_size(kwargs, out):
    assert interp_output_size(**kwargs) == out


# ============================================================================ layer values (hand-worked)


def test_max_pool_never_takes_the_padding():
    # 4x4 of -1 .. -16; kernel 2 stride 2 pad 1 -> 3x3 (ceil(4 / 2) + 1; (3-1)*2 = 4 < 4 + 1).
    x = -torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)
    y = caffe_pool(x, "MAX", (2, 2), (2, 2), (1, 1))
    expect = torch.tensor([[-1., -2., -4.],      # windows rows {0} x cols {0}, {1,2}, {3}
                           [-5., -6., -8.],      # rows {1,2}: max of the upper row wins
                           [-13., -14., -16.]])  # rows {3}
    assert torch.equal(y[0, 0], expect)  # zero padding would have given 0 on the border


def test_ave_pool_divisor_counts_padding_inside_h_plus_pad_only():
    # 3x3 of 1..9, kernel 3 stride 1 pad 1: every window spans 3 rows of [-1, 4) -> divisor 9 everywhere.
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3)
    y = caffe_pool(x, "AVE", (3, 3), (1, 1), (1, 1))
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 0, 0].item() == pytest.approx((1 + 2 + 4 + 5) / 9)
    assert y[0, 0, 0, 1].item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 9)
    assert y[0, 0, 1, 1].item() == pytest.approx(45 / 9)
    assert y[0, 0, 2, 2].item() == pytest.approx((5 + 6 + 8 + 9) / 9)

    # 4x4 of 1..16 (x[i, j] = 4 i + j + 1), kernel 3 stride 2 pad 1 -> 3x3 (ceil(3 / 2) + 1).
    # Rows of output 0: hstart -1, hend min(2, 5) = 2 -> 3 in the divisor, rows {0, 1} summed.
    # Output 1: 1..4 -> 3, rows {1, 2, 3}. Output 2: hstart 3, hend min(6, 5) = 5 -> 2, rows {3}.
    x = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)
    y = caffe_pool(x, "AVE", (3, 3), (2, 2), (1, 1))[0, 0]
    assert y[0, 0].item() == pytest.approx((1 + 2 + 5 + 6) / 9)
    assert y[1, 1].item() == pytest.approx(99 / 9)          # rows 1-3 x cols 1-3
    assert y[0, 2].item() == pytest.approx((4 + 8) / (3 * 2))
    assert y[2, 0].item() == pytest.approx((13 + 14) / (2 * 3))
    assert y[2, 2].item() == pytest.approx(16 / (2 * 2))    # not 16 / 1 (no pad) nor 16 / 9 (whole kernel)


def test_hole_convolution():
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)  # x[i, j] = 5 i + j
    w = torch.ones(1, 1, 3, 3)
    y = caffe_conv(x, w, torch.zeros(1), pad=(2, 2), hole=(2, 2))
    assert y.shape == (1, 1, 5, 5)                   # k_eff 5: 5 + 4 - 5 + 1
    assert y[0, 0, 2, 2].item() == 108               # i, j in {0, 2, 4}: 3 * 5 * 6 + 3 * 6
    assert y[0, 0, 0, 0].item() == 0 + 2 + 10 + 12   # i, j in {0, 2} (the -2 taps are padding)
    y = caffe_conv(x, w, torch.tensor([0.5]), stride=(2, 2), hole=(2, 2))
    assert y.shape == (1, 1, 1, 1) and y.item() == 108.5


def test_interp_is_corner_aligned_bilinear():
    x = torch.tensor([[0., 8.], [16., 24.]]).reshape(1, 1, 2, 2)
    y = caffe_interp(x, zoom_factor=4)[0, 0]         # 2 + 1 * 3 = 5; r = 1 / 4
    assert y.shape == (5, 5)
    assert torch.allclose(y[0], torch.tensor([0., 2., 4., 6., 8.]))
    assert torch.allclose(y[4], torch.tensor([16., 18., 20., 22., 24.]))  # last row: h1 = 1, h1p = 0
    assert y[2, 2].item() == pytest.approx(12.0)
    # Non-integer ratio via explicit height: r = 2 / 3, positions 0, 2/3, 4/3, 2 over [0, 3, 9].
    x = torch.tensor([0., 3., 9.]).reshape(1, 1, 3, 1)
    y = caffe_interp(x, height=4, width=1)[0, 0, :, 0]
    assert torch.allclose(y, torch.tensor([0., 2., 5., 9.]), atol=1e-5)


def test_interp_zoom_8_from_65_keeps_grid_values():
    x = torch.randn(1, 2, 65, 65, generator=torch.Generator().manual_seed(0))
    y = caffe_interp(x, zoom_factor=8)
    assert y.shape == (1, 2, 513, 513)
    assert torch.equal(y[..., ::8, ::8], x)  # r = 64 / 512 = 0.125 exactly: lambda = 0 on the grid
    # Half way between two grid rows/columns: the mean of the four neighbours.
    assert torch.allclose(y[..., 4, 4], x[..., :2, :2].mean(dim=(-2, -1)), atol=1e-5)


def test_interp_shrink_8_with_pad_beg_samples_rows_1_9_to_305():
    idx = torch.arange(306, dtype=torch.float32)
    x = (idx[:, None] * 1000 + idx[None, :]).reshape(1, 1, 306, 306)  # exact in float32 (< 2**24)
    y = caffe_interp(x, shrink_factor=8, pad_beg=-1, pad_end=0)
    assert y.shape == (1, 1, 39, 39)
    rows = torch.arange(1, 306, 8, dtype=torch.float32)               # 1, 9, ..., 305
    assert len(rows) == 39 and rows[-1] == 305
    assert torch.equal(y[0, 0], rows[:, None] * 1000 + rows[None, :])
    # LargeFOV label_shrink: 321 -> 41 samples 0, 8, ..., 320; on labels that is a copy.
    label = torch.randint(0, 21, (1, 1, 321, 321)).float()
    label[0, 0, ::7, ::5] = 255
    assert torch.equal(caffe_interp(label, shrink_factor=8), label[..., ::8, ::8])


def test_interp_rejects_positive_pad():
    with pytest.raises(ValueError):
        caffe_interp(torch.zeros(1, 1, 4, 4), zoom_factor=2, pad_beg=1)


def test_padding_crops_529_to_514_and_pads_with_zeros():
    idx = torch.arange(529, dtype=torch.float32)
    x = (idx[:, None] * 1000 + idx[None, :]).reshape(1, 1, 529, 529)
    y = caffe_padding(x, -7, -8)
    assert y.shape == (1, 1, 514, 514)
    assert y[0, 0, 0, 0].item() == 7 * 1000 + 7 and y[0, 0, -1, -1].item() == 520 * 1000 + 520
    y = caffe_padding(torch.ones(1, 1, 2, 2), 1, 2)
    assert y.shape == (1, 1, 5, 5) and y.sum().item() == 4 and torch.all(y[0, 0, 1:3, 1:3] == 1)
    with pytest.raises(ValueError):
        caffe_padding(x, -1, 1)  # Caffe: "Padding must either be both positive or negative"


# ============================================================================ parser and net on synthetic text

TINY = """
name: "${NET_ID}"   # top-level name, dropped
layers {
  name: "data"  type: IMAGE_SEG_DATA  top: "data"  top: "label"
  image_data_param { source: "${EXP}/list/${TRAIN_SET}.txt" }
  include: { phase: TRAIN }
}
layers { name: "data" type: IMAGE_SEG_DATA top: "data" include { phase: TEST } }
layers {
  bottom: "data" top: "a" name: "a" type: CONVOLUTION
  blobs_lr: 1 blobs_lr: 2 #blobs_lr: 3
  convolution_param { num_output: 1 kernel_size:1 }
}
layers { bottom: "a" top: "a" name: "relu_a" type: RELU }
layers {
  bottom: "data" top: "b" name: "b" type: CONVOLUTION
  convolution_param { num_output: 1 kernel_size: 1 bias_term: false
    weight_filler { type: "gaussian" std: 0.01 } }
}
layers { bottom: "a" bottom: "b" top: "s" name: "s" type: ELTWISE eltwise_param { operation: SUM coeff: 2 coeff: -1 } }
layers { bottom: "a" bottom: "b" top: "p" name: "p" type: ELTWISE eltwise_param { operation: PROD } }
layers { bottom: "s" top: "s" name: "drop" type: DROPOUT dropout_param { dropout_ratio: 0.5 } }
layers { name: "w" type: MAT_WRITE bottom: "s" mat_write_param { prefix: "${FEATURE_DIR}/fc8/" } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "s" bottom: "label" include: { phase: TRAIN } }
"""


def test_parser_on_synthetic_text():
    layers = parse_prototxt(TINY)
    assert [layer["name"] for layer in layers] == ["data", "data", "a", "relu_a", "b", "s", "p", "drop", "w", "loss"]
    assert layers[0]["include"] == [{"phase": "TRAIN"}] and layers[1]["include"] == [{"phase": "TEST"}]
    assert layers[0]["top"] == ["data", "label"] and layers[3]["bottom"] == ["a"]
    assert layers[2]["blobs_lr"] == [1, 2]                     # the commented third one is gone
    assert layers[2]["convolution_param"] == {"num_output": 1, "kernel_size": 1}
    assert layers[4]["convolution_param"]["bias_term"] is False
    assert layers[4]["convolution_param"]["weight_filler"] == {"type": "gaussian", "std": 0.01}
    assert layers[5]["eltwise_param"] == {"operation": "SUM", "coeff": [2, -1]}
    src = layers[0]["image_data_param"]["source"]
    assert src == "voc12/list/${TRAIN_SET}.txt" and isinstance(src, Unresolved) and src.placeholders == ("TRAIN_SET",)
    resolved = parse_prototxt(TINY, {"TRAIN_SET": "train_aug"})[0]["image_data_param"]["source"]
    assert resolved == "voc12/list/train_aug.txt" and not isinstance(resolved, Unresolved)


def test_tiny_net_forward_by_hand():
    # a = relu(x0 - 1), b = x1, s = 2 a - b, p = a * b
    weights = {"a": (torch.tensor([1., 0., 0.]).reshape(1, 3, 1, 1), torch.tensor([-1.])),
               "b": (torch.tensor([0., 1., 0.]).reshape(1, 3, 1, 1), None)}
    x = torch.tensor([[0., 3.], [5., 7.], [100., 100.]]).reshape(1, 3, 1, 2)
    for phase in ("TRAIN", "TEST"):
        net = CaffeReferenceNet(parse_prototxt(TINY), phase, weights)
        assert [layer["name"] for layer in net.layers if layer["type"] == "IMAGE_SEG_DATA"] == ["data"]
        out = net.forward(x)
        assert torch.equal(out["a"].flatten(), torch.tensor([0., 2.]))
        assert torch.equal(out["b"].flatten(), torch.tensor([5., 7.]))
        assert torch.equal(out["s"].flatten(), torch.tensor([-5., -3.]))  # dropout: identity
        assert torch.equal(out["p"].flatten(), torch.tensor([0., 14.]))
        assert "label" not in out and "loss" not in out
    net = CaffeReferenceNet(parse_prototxt(TINY), "TRAIN")
    assert net.param_layers() == [("a", 3, 1, 1), ("b", 3, 1, 1)]
    assert net.lr_mults("a") == [1.0, 2.0] and net.lr_mults("b") == [1.0, 1.0]
    assert net.fillers("a") == {"weight_filler": {}, "bias_filler": {}}
    assert net.fillers("b")["weight_filler"]["std"] == 0.01


def test_unresolved_placeholder_raises_only_where_used():
    text = TINY.replace("num_output: 1 kernel_size:1", "num_output: ${WIDTH} kernel_size:1")
    layers = parse_prototxt(text)  # parsing is fine
    with pytest.raises(ValueError, match="WIDTH"):
        CaffeReferenceNet(layers, "TEST")
    # ${FEATURE_DIR} (MAT_WRITE) and ${TRAIN_SET} (data layer) are never needed: the net builds.
    CaffeReferenceNet(parse_prototxt(TINY), "TRAIN")
    assert parse_prototxt(text, {"WIDTH": "4"})[2]["convolution_param"]["num_output"] == 4


def test_unknown_layer_type_names_the_layer():
    text = TINY + 'layers { name: "norm1" type: LRN bottom: "s" top: "n" }\n'
    with pytest.raises(NotImplementedError, match="norm1"):
        CaffeReferenceNet(parse_prototxt(text), "TEST")


def test_parser_reports_syntax_errors():
    with pytest.raises(ValueError):
        parse_prototxt('layers { name: "x" type: RELU ')
    with pytest.raises(ValueError):
        parse_prototxt('layers { name: "x" } }')


# ============================================================================ the release's prototxts

LAYER_COUNTS = {  # uncommented `layers {` blocks per file
    ("DeepLab", "train"): 44, ("DeepLab", "test"): 44,
    ("DeepLab-LargeFOV", "train"): 43, ("DeepLab-LargeFOV", "test"): 43,
    ("DeepLab-MSc", "train"): 78, ("DeepLab-MSc", "test"): 81,
    ("DeepLab-MSc-LargeFOV", "train"): 79, ("DeepLab-MSc-LargeFOV", "test"): 83,
}


@pytest.mark.parametrize("variant,which", sorted(LAYER_COUNTS))
def test_parses_every_release_prototxt(proto, variant, which):
    layers = parse_prototxt(proto / variant / f"{which}.prototxt")
    assert len(layers) == LAYER_COUNTS[variant, which]
    assert all("name" in layer and "type" in layer for layer in layers)
    fc8 = [layer for layer in layers if str(layer["name"]).startswith("fc8_") and layer["type"] == "CONVOLUTION"]
    assert len(fc8) == 1 and fc8[0]["name"] in ("fc8_pascal", "fc8_voc12")
    assert fc8[0]["convolution_param"]["num_output"] == 21  # ${NUM_LABELS} or a literal 21
    for phase in ("TRAIN", "TEST"):
        CaffeReferenceNet(layers, phase)  # every layer used in either phase is interpretable


def test_deeplab_pool4_pad_differs_between_train_and_test(proto):
    train = _by_name(parse_prototxt(proto / "DeepLab" / "train.prototxt"), "pool4")[0]["pooling_param"]
    test = _by_name(parse_prototxt(proto / "DeepLab" / "test.prototxt"), "pool4")[0]["pooling_param"]
    assert train == {"pool": "MAX", "kernel_size": 2, "stride": 1}          # `#pad: 1` commented out
    assert test == {"pool": "MAX", "kernel_size": 2, "pad": 1, "stride": 1}


def test_msc_largefov_train_multipliers_and_fillers(proto):
    layers = parse_prototxt(proto / "DeepLab-MSc-LargeFOV" / "train.prototxt")
    assert _by_name(layers, "conv1_1")[0]["blobs_lr"] == [0, 0]
    assert "pad" not in _by_name(layers, "pool3_ms")[0]["convolution_param"]
    net = CaffeReferenceNet(layers, "TRAIN")
    assert net.lr_mults("conv1_1") == [0.0, 0.0] and net.lr_mults("fc8_voc12") == [0.0, 0.0]
    assert net.lr_mults("data_ms") == [1.0, 2.0] and net.decay_mults("data_ms") == [1.0, 0.0]
    assert net.fillers("pool4_fc")["weight_filler"] == {"type": "gaussian", "std": 0.005}
    assert net.fillers("pool3_fc")["weight_filler"] == {"type": "gaussian", "std": 0.001}
    assert net.fillers("pool3_ms") == {"weight_filler": {}, "bias_filler": {}}
    assert net.fillers("conv1_1") == {"weight_filler": {}, "bias_filler": {}}
    assert net.conv_geometry("pool1_conv")["stride"] == (4, 4)


def test_phase_filtering_of_deeplab_train(proto):
    layers = parse_prototxt(proto / "DeepLab" / "train.prototxt")
    crops = {phase: [layer["transform_param"]["crop_size"] for layer in CaffeReferenceNet(layers, phase).layers
                     if layer["type"] == "IMAGE_SEG_DATA"] for phase in ("TRAIN", "TEST")}
    assert crops == {"TRAIN": [306], "TEST": [514]}
    assert "loss" in [layer["name"] for layer in CaffeReferenceNet(layers, "TRAIN").layers]
    assert "loss" not in [layer["name"] for layer in CaffeReferenceNet(layers, "TEST").layers]


@pytest.mark.parametrize("variant,which,phase,size,expect", [
    ("DeepLab", "train", "TRAIN", 306,
     {"pool1": 154, "pool2": 78, "pool3": 40, "pool4": 39, "fc8_pascal": 39, "label_shrink": 39}),
    ("DeepLab", "test", "TEST", 514,
     {"pool1": 258, "pool2": 130, "pool3": 66, "pool4": 67, "fc7": 67, "fc8_interp": 529, "fc8_crop": 514}),
    ("DeepLab-LargeFOV", "train", "TRAIN", 321,
     {"pool1": 161, "pool2": 81, "pool3": 41, "pool4": 41, "pool5a": 41, "fc8_voc12": 41, "label_shrink": 41}),
    ("DeepLab-LargeFOV", "test", "TEST", 513,
     {"pool1": 257, "pool2": 129, "pool3": 65, "pool4": 65, "fc8_voc12": 65, "fc8_interp": 513}),
    ("DeepLab-MSc", "train", "TRAIN", 321,
     {"data_ms": 41, "pool1_ms": 41, "pool2_ms": 41, "pool3_ms": 41, "fc_fusion": 41, "label_shrink": 41}),
    ("DeepLab-MSc-LargeFOV", "test", "TEST", 513,
     {"data_ms": 513, "pool1_ms": 257, "pool1_interp": 513, "pool2_interp": 513, "fc8_interp": 513,
      "fc_fusion": 513}),
])
def test_blob_sizes_at_release_crops(proto, variant, which, phase, size, expect):
    shapes = _net(proto, variant, which, phase).blob_shapes(size)
    assert {name: shapes[name][1] for name in expect} == expect
    assert all(shapes[name][1] == shapes[name][2] for name in expect)


def test_param_layers_channels(proto):
    net = _net(proto, "DeepLab-LargeFOV", "test", "TEST")
    params = net.param_layers()
    assert len(params) == 16
    assert params[0] == ("conv1_1", 3, 64, 3) and params[4] == ("conv3_1", 128, 256, 3)
    assert params[-3:] == [("fc6", 512, 1024, 3), ("fc7", 1024, 1024, 1), ("fc8_voc12", 1024, 21, 1)]
    msc = {p[0]: p[1:] for p in _net(proto, "DeepLab-MSc", "train", "TRAIN").param_layers()}
    assert len(msc) == 16 + 15
    assert msc["data_conv"] == (3, 128, 3) and msc["pool3_conv"] == (256, 128, 3) and msc["pool4_conv"] == (512, 128, 3)
    assert msc["fc6"] == (512, 4096, 4) and msc["pool2_ms"] == (128, 21, 1)
    three = _net(proto, "DeepLab-LargeFOV", "test", "TEST", NUM_LABELS="3").param_layers()
    assert three[-1] == ("fc8_voc12", 1024, 3, 1)


def test_random_weights_shapes_and_scale(proto):
    net = _net(proto, "DeepLab-LargeFOV", "test", "TEST")
    w = random_weights(net, seed=0)
    assert list(w) == [p[0] for p in net.param_layers()]
    assert tuple(w["conv1_1"][0].shape) == (64, 3, 3, 3) and tuple(w["fc8_voc12"][1].shape) == (21,)
    assert w["conv1_1"][0].std().item() == pytest.approx((2 / 27) ** 0.5 / 64, rel=0.2)
    assert w["conv1_2"][0].std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.1)
    assert torch.equal(random_weights(net, seed=0)["fc7"][0], w["fc7"][0])
    assert not torch.equal(random_weights(net, seed=1)["fc7"][0], w["fc7"][0])


def _image(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 50


def test_forward_largefov_test_at_65(proto):
    net = _net(proto, "DeepLab-LargeFOV", "test", "TEST")
    net.weights = random_weights(net, seed=0)
    out = net.forward(_image(65))
    # 65 -> pool1 33 -> pool2 17 -> pool3 9 -> pool4 9 -> fc8 9 -> x8 zoom: 9 + 8 * 7 = 65
    assert {k: tuple(out[k].shape) for k in ("pool1", "pool3", "pool5a", "fc7", "fc8_voc12", "fc8_interp")} == {
        "pool1": (1, 64, 33, 33), "pool3": (1, 256, 9, 9), "pool5a": (1, 512, 9, 9), "fc7": (1, 1024, 9, 9),
        "fc8_voc12": (1, 21, 9, 9), "fc8_interp": (1, 21, 65, 65)}
    assert torch.allclose(out["fc8_interp"][..., ::8, ::8], out["fc8_voc12"], atol=1e-5)
    for layer in net.layers:  # non-degenerate: every ReLU output is partly on, partly off
        if layer["type"] == "RELU":
            on = (out[layer["top"][0]] > 0).float().mean().item()
            assert 0.05 < on < 0.95, layer["name"]
    assert 0.1 < out["fc8_voc12"].std().item() < 10


@pytest.mark.slow
def test_forward_msc_largefov_test_fuses_at_full_resolution(proto):
    net = _net(proto, "DeepLab-MSc-LargeFOV", "test", "TEST")
    net.weights = random_weights(net, seed=0)
    out = net.forward(_image(65))
    parts = ["data_ms", "pool1_interp", "pool2_interp", "pool3_interp", "pool4_interp", "fc8_interp"]
    assert all(tuple(out[p].shape) == (1, 21, 65, 65) for p in parts)
    assert tuple(out["pool1_ms"].shape) == (1, 21, 33, 33)   # branches keep stride 1 at test time
    assert torch.allclose(out["fc_fusion"], sum(out[p] for p in parts), atol=1e-4)


@pytest.fixture(scope="module")
def deeplab_weights(proto):
    net = _net(proto, "DeepLab", "test", "TEST")
    return random_weights(net, seed=0)


def test_forward_deeplab_test_crops_the_zoomed_scores(proto, deeplab_weights):
    net = _net(proto, "DeepLab", "test", "TEST")
    net.weights = deeplab_weights
    out = net.forward(_image(34))
    # 34 -> 18 -> 10 -> 6 -> pool4 (k2 s1 p1) 7 -> fc8 7 -> zoom 7 + 6 * 7 = 49 -> crop 7 / 8 -> 34
    assert tuple(out["pool4"].shape[-2:]) == (7, 7) and tuple(out["fc8_interp"].shape[-2:]) == (49, 49)
    assert tuple(out["fc8_crop"].shape) == (1, 21, 34, 34)
    assert torch.equal(out["fc8_crop"], out["fc8_interp"][..., 7:-8, 7:-8])


def test_forward_deeplab_train_shrinks_labels(proto, deeplab_weights):
    net = _net(proto, "DeepLab", "train", "TRAIN")
    net.weights = deeplab_weights  # same layer names and shapes as test.prototxt
    label = torch.randint(0, 21, (1, 1, 50, 50), generator=torch.Generator().manual_seed(2)).float()
    label[..., 3::4, :] = 255
    out = net.forward(_image(50), label)
    # 50 -> 26 -> 14 -> 8 -> pool4 (k2 s1 p0) 7; label: crop 1 -> 49 -> 48 // 8 + 1 = 7, rows 1, 9, ..., 49
    assert tuple(out["fc8_pascal"].shape) == (1, 21, 7, 7)
    assert torch.equal(out["label_shrink"], label[..., 1::8, 1::8])
    with pytest.raises(ValueError, match="label"):
        net.forward(_image(50))
