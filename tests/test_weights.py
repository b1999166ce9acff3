"""Weights: the .caffemodel reader/writer (both Caffe layouts, real files written by Caffe), conversion onto
the DeepLab v1 networks, ImageNet VGG-16 decimation (paper Sec. 3.2, Table 2) and the checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab_v1.models import build_model
from deeplab_v1.models.vgg import SPECS, DeepLabVGG
from deeplab_v1.weights.caffemodel import (
    CaffeLayer,
    CaffeModelError,
    canonical_shape,
    read_caffemodel,
    write_caffemodel,
)
from deeplab_v1.weights.convert import (
    CONVERTER_VERSION,
    WeightsError,
    convert_caffemodel,
    export_caffemodel,
    load_checkpoint,
    load_init,
    main,
    model_to_caffe_layers,
)
from deeplab_v1.weights.imagenet import (
    TORCHVISION_MEAN_RGB,
    TORCHVISION_STD_RGB,
    VGG16_FEATURE_INDICES,
    decimation_indices,
    imagenet_to_deeplab,
    torchvision_conv1_1_to_caffe,
)
from deeplab_v1.data.transforms import MEAN_BGR


def _small(name: str, fc_channels: int = 16, num_classes: int = 3, seed: int = 0) -> DeepLabVGG:
    """The variant's geometry with narrow fc6/fc7 (cheap); random weights, every one distinct."""
    torch.manual_seed(seed)
    model = DeepLabVGG(dataclasses.replace(SPECS[name], fc_channels=fc_channels), num_classes=num_classes)
    for p in model.parameters():  # biases are zero after reset_parameters: make them informative
        p.data.normal_()
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------- real Caffe files


def _parse_prototxt(text: str) -> list:
    """Protobuf text format -> nested [(key, value)] (value: str or nested list). Enough for prototxts."""
    tokens = re.findall(r'"[^"]*"|[{}:]|[^\s{}:"]+', re.sub(r"#.*", "", text))
    pos = 0

    def block() -> list:
        nonlocal pos
        items = []
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                value = block()
                pos += 1  # "}"
            else:
                value = tokens[pos].strip('"')
                pos += 1
            items.append((key, value))
        return items

    return block()


def _get(items: list, key: str, default=None):
    return next((v for k, v in items if k == key), default)


def _expected_param_shapes(prototxt: str) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(name, type, blob shapes) of the parameter layers, derived from the prototxt by propagating the
    input size through the layers (Caffe: convolution rounds down, pooling up)."""
    items = _parse_prototxt(prototxt)
    v1_types = {"CONVOLUTION": "Convolution", "INNER_PRODUCT": "InnerProduct", "POOLING": "Pooling"}
    dims = [int(v) for k, v in items if k == "input_dim"]
    shapes: dict[str, tuple[int, int, int]] = {}
    if dims:
        shapes[_get(items, "input")] = tuple(dims[1:])
    out = []
    for key, layer in items:
        if key not in ("layer", "layers"):
            continue
        name, ltype = _get(layer, "name"), _get(layer, "type")
        ltype = v1_types.get(ltype, ltype)
        tops = [v for k, v in layer if k == "top"]
        bottom = _get(layer, "bottom")
        if ltype == "Input":
            shapes[tops[0]] = tuple(int(v) for k, v in _get(_get(layer, "input_param"), "shape") if k == "dim")[1:]
            continue
        c, h, w = shapes[bottom]
        if ltype == "Convolution":
            p = _get(layer, "convolution_param")
            n, k = int(_get(p, "num_output")), int(_get(p, "kernel_size"))
            s, pad = int(_get(p, "stride", 1)), int(_get(p, "pad", 0))
            out.append((name, ltype, [(n, c, k, k), (n,)]))
            new = (n, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
        elif ltype == "Pooling":
            p = _get(layer, "pooling_param")
            k, s, pad = int(_get(p, "kernel_size")), int(_get(p, "stride", 1)), int(_get(p, "pad", 0))
            new = (c, -(-(h + 2 * pad - k) // s) + 1, -(-(w + 2 * pad - k) // s) + 1)
        elif ltype == "InnerProduct":
            n = int(_get(_get(layer, "inner_product_param"), "num_output"))
            out.append((name, ltype, [(n, c * h * w), (n,)]))
            new = (n, 1, 1)
        elif ltype == "PReLU":
            out.append((name, ltype, [(c,)]))
            new = (c, h, w)
        else:
            new = (c, h, w)
        for t in tops:
            shapes[t] = new
    return out


REAL = [
    ("old-format", "lenet_iter_10000.caffemodel", "lenet.prototxt", "V1", "LeNet"),
    ("old-format", "cifar10_quick_iter_4000.caffemodel", "cifar10_quick.prototxt", "V1", "CIFAR10_quick"),
    ("new-format", "lenet_iter_10000.caffemodel", "lenet.prototxt", "V2", "LeNet"),
    ("new-format", "det1.caffemodel", "det1.prototxt", "V2", "12Net"),
]


@pytest.mark.parametrize("folder,model,prototxt,fmt,net_name", REAL)
def test_real_caffemodels_match_their_prototxt(shared_reference, folder, model, prototxt, fmt, net_name):
    base = shared_reference / "caffemodels" / folder
    net = read_caffemodel(base / model)
    assert net.format == fmt and net.name == net_name
    expected = _expected_param_shapes((base / prototxt).read_text())
    got = [(layer.name, layer.type, layer.shapes) for layer in net.layers if layer.blobs]
    assert got == expected
    for layer in net.layers:
        for blob in layer.blobs:
            assert blob.dtype == np.float32 and np.isfinite(blob).all()
        if layer.type in ("Convolution", "InnerProduct"):  # trained weights, not a zero/garbage decode
            assert 1e-3 < float(np.abs(layer.blobs[0]).mean()) < 10
    if fmt == "V1":  # legacy 4-D storage, canonicalised
        conv1 = net.layer("conv1")
        assert conv1.stored_shapes[1] == (1, 1, 1, conv1.shapes[1][0])
        ip1 = net.layer("ip1")
        assert ip1.stored_shapes[0] == (1, 1) + ip1.shapes[0]


def test_real_v1_file_layer_types_and_graph(shared_reference):
    net = read_caffemodel(shared_reference / "caffemodels" / "old-format" / "lenet_iter_10000.caffemodel")
    types = {layer.name: layer.type for layer in net.layers}
    # the training net Caffe saved: data layer, loss layer, and the deploy prototxt's layers
    assert types == {"mnist": "Data", "conv1": "Convolution", "pool1": "Pooling", "conv2": "Convolution",
                     "pool2": "Pooling", "ip1": "InnerProduct", "relu1": "ReLU", "ip2": "InnerProduct",
                     "loss": "SoftmaxWithLoss"}
    assert net.layer("ip2").bottom == ["ip1"] and net.layer("loss").bottom == ["ip2", "label"]


@pytest.mark.parametrize("folder,model,formats", [("old-format", "lenet_iter_10000.caffemodel", ("V1", "V2")),
                                                  ("new-format", "det1.caffemodel", ("V2",))])  # PReLU: no V1 type
def test_real_file_rewritten_reads_back_identically(shared_reference, tmp_path, folder, model, formats):
    net = read_caffemodel(shared_reference / "caffemodels" / folder / model)
    for fmt in formats:
        out = write_caffemodel(tmp_path / f"{fmt}.caffemodel", net.layers, format=fmt, name=net.name)
        again = read_caffemodel(out)
        assert again.format == fmt and again.name == net.name
        assert [(a.name, a.type, a.bottom, a.top) for a in again.layers] == [
            (a.name, a.type, a.bottom, a.top) for a in net.layers
        ]
        for a, b in zip(again.layers, net.layers):
            assert all(np.array_equal(x, y) for x, y in zip(a.blobs, b.blobs)) and len(a.blobs) == len(b.blobs)


# ----------------------------------------------------------------------------------- reader / writer


def test_canonical_shapes_of_legacy_blobs():
    assert canonical_shape("Convolution", 0, (1, 1, 3, 3)) == (1, 1, 3, 3)
    assert canonical_shape("Convolution", 1, (1, 1, 1, 20)) == (20,)
    assert canonical_shape("InnerProduct", 0, (1, 1, 1, 800)) == (1, 800)
    assert canonical_shape("InnerProduct", 1, (1, 1, 1, 1)) == (1,)
    assert canonical_shape("PReLU", 0, (1, 1, 1, 10)) == (10,)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    head = _varint(number << 3 | wire)
    return head + (_varint(len(payload)) + payload if wire == 2 else payload)


def test_writer_bytes_equal_an_independent_encoding_and_unpacked_data_is_read(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    packed = values.astype("<f4").tobytes()
    blob = _field(1, 0, _varint(1)) + _field(2, 0, _varint(1)) + _field(3, 0, _varint(2)) + _field(4, 0, _varint(3))
    layer = _field(4, 2, b"ip") + _field(5, 0, _varint(14)) + _field(6, 2, blob + _field(5, 2, packed))
    expected = _field(1, 2, b"net") + _field(2, 2, layer)
    path = write_caffemodel(tmp_path / "a.caffemodel", [("ip", "InnerProduct", [values])], format="V1", name="net")
    assert path.read_bytes() == expected
    # the same blob with ``data`` not packed (one fixed32 field per value), as a writer may emit it
    unpacked = b"".join(_field(5, 5, struct.pack("<f", v)) for v in values.ravel())
    layer = _field(4, 2, b"ip") + _field(5, 0, _varint(14)) + _field(6, 2, blob + unpacked)
    (tmp_path / "b.caffemodel").write_bytes(_field(1, 2, b"net") + _field(2, 2, layer))
    got = read_caffemodel(tmp_path / "b.caffemodel").layer("ip").blobs[0]
    assert np.array_equal(got, values)


def test_v1_type_names_roundtrip(tmp_path):
    layers = [("up", "Interp", []), ("crf", "DenseCRF", []), ("odd", "V1:99", []), ("drop", "Dropout", [])]
    net = read_caffemodel(write_caffemodel(tmp_path / "t.caffemodel", layers, format="V1"))
    assert [(layer.name, layer.type) for layer in net.layers] == [(n, t) for n, t, _ in layers]
    with pytest.raises(CaffeModelError, match="no V1 enum value"):
        write_caffemodel(tmp_path / "u.caffemodel", [("x", "PReLU", [])], format="V1")


def test_double_data_is_read_as_float32(tmp_path):
    values = np.array([1.5, -2.25, 3.0], dtype=np.float64)
    shape = _field(7, 2, _field(1, 2, _varint(3)))
    blob = shape + _field(8, 2, values.astype("<f8").tobytes())
    layer = _field(1, 2, b"s") + _field(2, 2, b"Scale") + _field(7, 2, blob)
    (tmp_path / "d.caffemodel").write_bytes(_field(100, 2, layer))
    got = read_caffemodel(tmp_path / "d.caffemodel").layer("s").blobs[0]
    assert got.dtype == np.float32 and np.array_equal(got, values.astype(np.float32))


# ------------------------------------------------------------------------------------------ bad files


def test_missing_truncated_random_text_and_empty_files(shared_reference, tmp_path):
    with pytest.raises(CaffeModelError, match="not found"):
        read_caffemodel(tmp_path / "nope.caffemodel")
    real = (shared_reference / "caffemodels" / "old-format" / "lenet_iter_10000.caffemodel").read_bytes()
    half = tmp_path / "half.caffemodel"
    half.write_bytes(real[: len(real) // 2])
    with pytest.raises(CaffeModelError, match=r"half\.caffemodel.*truncated"):
        read_caffemodel(half)
    rnd = tmp_path / "random.caffemodel"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CaffeModelError, match=r"random\.caffemodel"):
        read_caffemodel(rnd)
    text = tmp_path / "text.caffemodel"
    text.write_text((shared_reference / "caffemodels" / "old-format" / "lenet.prototxt").read_text())
    with pytest.raises(CaffeModelError, match="text file"):
        read_caffemodel(text)
    empty = write_caffemodel(tmp_path / "empty.caffemodel", [], name="nothing")
    with pytest.raises(CaffeModelError, match="no layer"):
        read_caffemodel(empty)
    v0_layer = _field(1, 2, _field(1, 2, b"conv1") + _field(2, 2, b"conv"))  # nested old-style layer
    (tmp_path / "v0.caffemodel").write_bytes(_field(2, 2, v0_layer))
    with pytest.raises(CaffeModelError, match="layer #0 has no name, type or blobs.*V0"):
        read_caffemodel(tmp_path / "v0.caffemodel")
    (tmp_path / "zero.caffemodel").write_bytes(b"")
    with pytest.raises(CaffeModelError, match="empty"):
        read_caffemodel(tmp_path / "zero.caffemodel")


def test_blob_whose_data_disagrees_with_its_shape(tmp_path):
    shape = _field(7, 2, _field(1, 2, _varint(2) + _varint(3)))
    blob = shape + _field(5, 2, np.zeros(5, dtype="<f4").tobytes())
    layer = _field(1, 2, b"conv9") + _field(2, 2, b"Convolution") + _field(7, 2, blob)
    (tmp_path / "bad.caffemodel").write_bytes(_field(100, 2, layer))
    with pytest.raises(CaffeModelError, match=r"bad\.caffemodel: layer 'conv9' blob 0: shape \(2, 3\) needs 6 values but the file holds 5"):
        read_caffemodel(tmp_path / "bad.caffemodel")


# ------------------------------------------------------------------------------- conversion, full size


@pytest.fixture(scope="module")
def largefov(tmp_path_factory):
    """A whole deeplab-largefov (3 classes) with known random weights, written in both layouts."""
    folder = tmp_path_factory.mktemp("largefov")
    torch.manual_seed(1)
    model = build_model("deeplab-largefov", num_classes=3)
    for p in model.parameters():
        p.data.normal_(0, 0.01)
    files = {fmt: export_caffemodel(model, folder / f"largefov_{fmt}.caffemodel", format=fmt, name="vgg16")
             for fmt in ("V1", "V2")}
    return model, files


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["V1", "V2"])
def test_whole_largefov_roundtrips_exactly(largefov, fmt, tmp_path):
    model, files = largefov
    src = files[fmt]
    net = read_caffemodel(src)
    assert net.format == fmt and net.names()[-1] == "fc8_voc12"
    assert net.layer("fc6").stored_shapes[0] == (1024, 512, 3, 3)
    assert net.layer("fc8_voc12").stored_shapes[1] == ((1, 1, 1, 3) if fmt == "V1" else (3,))
    report = convert_caffemodel(src, tmp_path / "out.pth", "deeplab-largefov", num_classes=3)
    assert report.loaded == model.caffe_layer_names() and not report.new and not report.unused
    assert report.notes["fc8"] == "from fc8_voc12" and report.source_kind == f"caffemodel-{fmt}"
    ckpt = torch.load(tmp_path / "out.pth", weights_only=True)  # plain types only
    assert ckpt["model"] == "deeplab-largefov" and ckpt["num_classes"] == 3
    assert ckpt["meta"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert ckpt["meta"]["source"] == src.name and ckpt["meta"]["converter_version"] == CONVERTER_VERSION
    assert ckpt["meta"]["report"]["loaded"] == report.loaded
    converted = build_model("deeplab-largefov", num_classes=3)
    converted.load_state_dict(load_checkpoint(tmp_path / "out.pth")["state_dict"])
    assert _same_weights(converted, model)
    if fmt == "V1":  # the converted network scores exactly like the original one
        x = torch.randn(1, 3, 25, 25)
        with torch.no_grad():
            assert torch.equal(converted.eval()(x), model.eval()(x))


def test_cli_convert(largefov, tmp_path, capsys):
    _, files = largefov
    out = tmp_path / "cli.pth"
    assert main([str(files["V1"]), str(out), "--model", "deeplab-largefov", "--num-classes", "3"]) == 0
    assert "loaded (16)" in capsys.readouterr().out and out.is_file()
    # 21 classes asked, 3 in the file: refused, naming fc8 and both shapes
    assert main([str(files["V1"]), str(tmp_path / "x.pth"), "--model", "deeplab-largefov"]) == 1
    err = capsys.readouterr().err
    assert "fc8 (file layer 'fc8_voc12')" in err and "(3, 1024, 1, 1)" in err and "(21, 1024, 1, 1)" in err
    assert not (tmp_path / "x.pth").exists()
    assert main([str(files["V1"]), str(tmp_path / "y.pth"), "--model", "deeplab-largefov", "--reinit-fc8"]) == 0
    assert load_checkpoint(tmp_path / "y.pth")["meta"]["report"]["new"] == ["fc8"]


def test_make_caffemodel_tool_exports_a_checkpoint(largefov, repo_root, tmp_path, capsys):
    model, files = largefov
    convert_caffemodel(files["V1"], tmp_path / "c.pth", "deeplab-largefov", num_classes=3)
    spec = importlib.util.spec_from_file_location("make_caffemodel", repo_root / "tools" / "make_caffemodel.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "again.caffemodel"
    argv = [str(out), "--model", "deeplab-largefov", "--num-classes", "3", "--from", str(tmp_path / "c.pth"),
            "--format", "V2", "--fc8-name", "fc8_pascal"]
    assert tool.main(argv) == 0 and "V2, 16 layers, 20.5M parameters" in capsys.readouterr().out
    net = read_caffemodel(out)
    assert net.format == "V2" and net.layer("fc8_pascal").shapes == [(3, 1024, 1, 1), (3,)]
    assert np.array_equal(net.layer("fc6").blobs[0], model.fc6.weight.detach().numpy())
    assert tool.main(argv[:4] + ["21"] + argv[5:]) == 1  # 3-class checkpoint, 21-class model
    assert "fc8.weight" in capsys.readouterr().err


# ------------------------------------------------------------------------------- conversion, narrow fc


@pytest.mark.parametrize("fmt,fc8_name", [("V1", "fc8_pascal"), ("V2", "fc8")])
def test_msc_branches_roundtrip(tmp_path, fmt, fc8_name):
    src = _small("deeplab-msc", seed=2)
    path = export_caffemodel(src, tmp_path / "msc.caffemodel", format=fmt, fc8_name=fc8_name)
    assert {"data_conv", "pool4_ms", fc8_name} <= set(read_caffemodel(path).names(with_blobs=True))
    dst = _small("deeplab-msc", seed=3)
    report = load_init(dst, "deeplab-msc", path, num_classes=3)
    assert _same_weights(dst, src) and len(report.loaded) == 16 + 15 and not report.new
    if fmt == "V1":  # scores too (17 = 8k + 1 pixels, the smallest side the MSc branches align on)
        x = torch.randn(1, 3, 17, 17)
        with torch.no_grad():
            assert torch.equal(dst.eval()(x), src.eval()(x))


@pytest.mark.slow  # ~3-5 s on 2 cores: eight VGG-16 trunks built, six .caffemodel files written and read
def test_shape_mismatch_missing_layer_and_class_count(tmp_path):
    src = _small("deeplab-largefov", num_classes=5)
    layers = model_to_caffe_layers(src)
    good = write_caffemodel(tmp_path / "good.caffemodel", layers)
    # a blob of the wrong shape
    bad = [CaffeLayer(l.name, l.type, [b[:, :-1] if l.name == "conv3_2" and i == 0 else b for i, b in enumerate(l.blobs)])
           for l in layers]
    path = write_caffemodel(tmp_path / "wrong.caffemodel", bad)
    with pytest.raises(WeightsError, match=r"(?s)wrong\.caffemodel.*conv3_2: file weight \(256, 255, 3, 3\) bias \(256,\) vs model weight \(256, 256, 3, 3\)"):
        load_init(_small("deeplab-largefov", num_classes=5), "deeplab-largefov", path, num_classes=5)
    # a missing layer
    path = write_caffemodel(tmp_path / "missing.caffemodel", [l for l in layers if l.name != "conv4_1"], format="V2")
    with pytest.raises(WeightsError, match=r"missing from the file: \['conv4_1'\]"):
        load_init(_small("deeplab-largefov", num_classes=5), "deeplab-largefov", path, num_classes=5)
    # a different class count in fc8 (5 in the file, 3 in the model)
    with pytest.raises(WeightsError, match=r"fc8 \(file layer 'fc8_voc12'\): file weight \(5, 16, 1, 1\).*model weight \(3, 16, 1, 1\).*5 classes, the model 3"):
        load_init(_small("deeplab-largefov"), "deeplab-largefov", good, num_classes=3)
    dst = _small("deeplab-largefov", seed=4)
    fc8_before = dst.fc8.weight.clone()
    report = load_init(dst, "deeplab-largefov", good, num_classes=3, reinit_fc8=True)
    assert report.new == ["fc8"] and report.unused == ["fc8_voc12"] and torch.equal(dst.fc8.weight, fc8_before)
    assert torch.equal(dst.fc7.weight, src.fc7.weight)
    # a trained LargeFOV as init of MSc-LargeFOV (the release's MSc protocol): the branches start new with no
    # flag, keeping their fillers, and every trunk layer comes from the file
    msc = _small("deeplab-msc-largefov", num_classes=5)
    branch_before = msc.caffe_layer("pool2_fc").weight.clone()
    report = load_init(msc, "deeplab-msc-largefov", good, num_classes=5)
    assert len(report.new) == 15 and set(report.new) == {f"{b}_{p}" for b in ("data", "pool1", "pool2", "pool3", "pool4")
                                                         for p in ("conv", "fc", "ms")}
    assert "msc" in report.notes and torch.equal(msc.conv5_3.weight, src.conv5_3.weight)
    assert torch.equal(msc.fc8.weight, src.fc8.weight) and torch.equal(msc.caffe_layer("pool2_fc").weight, branch_before)
    # a file with some branch layers but not all is not a single-scale net: the missing ones are an error
    partial = write_caffemodel(tmp_path / "partial.caffemodel", model_to_caffe_layers(msc)[:-1])
    with pytest.raises(WeightsError, match=r"missing from the file: \['pool4_ms'\]"):
        load_init(_small("deeplab-msc-largefov", num_classes=5), "deeplab-msc-largefov", partial, num_classes=5)
    report = load_init(msc, "deeplab-msc-largefov", good, num_classes=5, allow_new=["msc"])
    assert len(report.new) == 15 and torch.equal(msc.conv5_3.weight, src.conv5_3.weight)
    with pytest.raises(WeightsError, match="is not a layer"):
        load_init(msc, "deeplab-msc-largefov", good, num_classes=5, allow_new=["fc9"])
    # an init model saved without any classifier (a decimated VGG-16): fc8 and the branches start new
    path = write_caffemodel(tmp_path / "init.caffemodel", [l for l in layers if l.name != "fc8_voc12"])
    report = load_init(msc, "deeplab-msc-largefov", path, num_classes=5)
    assert report.source_kind == "caffemodel-V1+imagenet" and report.new[0] == "fc8" and len(report.new) == 16


@pytest.mark.slow
def test_checkpoints_of_ours_and_of_the_trainer(tmp_path):
    src = _small("deeplab-largefov")
    torch.save({"model_state": src.state_dict(), "optimizer_state": {}, "iteration": 7}, tmp_path / "iter_7.pth")
    torch.save({"model": "deeplab-largefov", "state_dict": src.state_dict()}, tmp_path / "final.pth")
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "bare.pth")
    for name in ("iter_7.pth", "final.pth", "bare.pth"):
        dst = _small("deeplab-largefov", seed=5)
        report = load_init(dst, "deeplab-largefov", tmp_path / name, num_classes=3)
        assert _same_weights(dst, src) and report.source_kind == "checkpoint" and len(report.loaded) == 16
    with pytest.raises(WeightsError, match="fc8.*3 classes, the model 4"):
        load_init(_small("deeplab-largefov", num_classes=4), "deeplab-largefov", tmp_path / "final.pth", num_classes=4)
    (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 10)
    with pytest.raises(WeightsError, match=r"junk\.pth: neither a PyTorch checkpoint"):
        load_init(_small("deeplab-largefov"), "deeplab-largefov", tmp_path / "junk.pth", num_classes=3)
    with pytest.raises(WeightsError, match="not a checkpoint of ours"):
        load_checkpoint(tmp_path / "bare.pth")


def test_one_checkpoint_reader_under_every_name(tmp_path):
    """``weights.checkpoint`` is the one reader; the engine's and ``convert``'s names are the same functions.
    Its errors name the file and are ``CheckpointError`` (a ``WeightsError``, ``DeepLabError``, ``ValueError``)."""
    from deeplab_v1 import weights
    from deeplab_v1.engine import checkpoint as engine_checkpoint
    from deeplab_v1.errors import DeepLabError
    from deeplab_v1.weights import checkpoint as weights_checkpoint, convert
    from deeplab_v1.weights.checkpoint import CheckpointError, checkpoint_state_dict, read_checkpoint

    assert (convert.load_checkpoint is weights.load_checkpoint is weights_checkpoint.load_checkpoint
            is engine_checkpoint.load_checkpoint)
    assert engine_checkpoint.read_checkpoint is read_checkpoint  # any dict (a bare state dict too)
    assert engine_checkpoint.save_checkpoint is weights_checkpoint.save_checkpoint
    for cls in (WeightsError, CaffeModelError, CheckpointError):
        assert issubclass(cls, DeepLabError) and issubclass(cls, ValueError)
    sd = {"w": torch.ones(2)}
    engine_checkpoint.save_checkpoint(tmp_path / "bare.pth", sd)
    assert read_checkpoint(tmp_path / "bare.pth").keys() == {"w"} and checkpoint_state_dict(sd) is None
    with pytest.raises(CheckpointError, match=r"bare\.pth: not a checkpoint of ours"):
        load_checkpoint(tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"nothing\.pth: checkpoint not found"):
        read_checkpoint(tmp_path / "nothing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a checkpoint dict, got list"):
        read_checkpoint(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a checkpoint: not a file torch.save wrote"):
        read_checkpoint(tmp_path / "junk.pth")
    ckpt = {"model_state": sd, "iteration": 3}
    assert checkpoint_state_dict(ckpt) is sd and checkpoint_state_dict({"state_dict": 1, "model_state": 2}) == 1


def test_strip_module_prefix_only_when_every_key_has_it():
    from deeplab_v1.models.state_dict import strip_module_prefix

    assert strip_module_prefix({"module.a": 1, "module.b.c": 2}) == {"a": 1, "b.c": 2}
    assert strip_module_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}
    assert strip_module_prefix({}) == {}


# ------------------------------------------------------------------------------------ ImageNet VGG-16

_VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _imagenet_state_dict(fc: int = 4096, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A VGG-16 in the PyTorch layout with fc6/fc7 ``fc`` wide (4096 is the real one)."""
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.empty(s, device="meta")) if device == "meta" else (lambda *s: torch.randn(s, generator=g))
    sd, cin = {}, 3
    for i, c in zip(VGG16_FEATURE_INDICES, _VGG_CHANNELS):
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = make(c, cin, 3, 3), make(c)
        cin = c
    for i, (o, n) in {0: (fc, 512 * 7 * 7), 3: (fc, fc), 6: (1000, fc)}.items():
        sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = make(o, n), make(o)
    return sd


def test_decimation_indices():
    assert decimation_indices(7, 4, spatial=True) == [0, 2, 4, 6]
    assert decimation_indices(7, 3, spatial=True) == [0, 3, 6]
    assert decimation_indices(7, 7, spatial=True) == list(range(7))
    assert decimation_indices(4096, 1024, spatial=False) == list(range(0, 4096, 4))
    with pytest.raises(ValueError):
        decimation_indices(7, 5, spatial=True)


@pytest.mark.parametrize("name,millions", [("deeplab-7x7", 134.3), ("deeplab", 65.1), ("deeplab-4x4", 65.1),
                                           ("deeplab-largefov", 20.5)])
def test_imagenet_init_parameter_counts_match_table2(name, millions):
    out = imagenet_to_deeplab(_imagenet_state_dict(device="meta"), name)  # shapes only, no memory
    assert round(sum(v.numel() for v in out.values()) / 1e6, 1) == millions
    with torch.device("meta"):
        ref = build_model(name)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name,fc,kept_rows,step", [("deeplab-largefov", 8, [0, 3, 6], 4), ("deeplab", 32, [0, 2, 4, 6], 1)])
def test_imagenet_decimation_takes_the_right_slices(name, fc, kept_rows, step):
    sd = _imagenet_state_dict(fc=32)
    model = _small(name, fc_channels=fc)
    out = imagenet_to_deeplab(sd, name, num_classes=3, input_space="caffe", model=model,
                              generator=torch.Generator().manual_seed(0))
    rows = torch.tensor(kept_rows)
    w6 = sd["classifier.0.weight"].reshape(32, 512, 7, 7)[::step][:, :, rows][:, :, :, rows]
    assert torch.equal(out["fc6.weight"], w6) and torch.equal(out["fc6.bias"], sd["classifier.0.bias"][::step])
    assert torch.equal(out["fc7.weight"], sd["classifier.3.weight"][::step, ::step].reshape(fc, fc, 1, 1))
    assert torch.equal(out["fc7.bias"], sd["classifier.3.bias"][::step])
    assert torch.equal(out["conv1_1.weight"], sd["features.0.weight"])  # caffe input space: unchanged
    assert torch.equal(out["conv5_3.weight"], sd["features.28.weight"])
    assert out["fc8.weight"].shape == (3, fc, 1, 1) and not out["fc8.bias"].any()
    assert 0.005 < float(out["fc8.weight"].std()) < 0.02  # the release's gaussian std 0.01
    model.load_state_dict(out)


def test_torchvision_conv1_1_becomes_a_bgr_0_255_conv1_1():
    torch.manual_seed(0)
    w, b = torch.randn(64, 3, 3, 3, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    pixels_bgr = torch.rand(1, 3, 12, 12, dtype=torch.float64) * 255
    mean = torch.tensor(TORCHVISION_MEAN_RGB, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(TORCHVISION_STD_RGB, dtype=torch.float64).view(1, 3, 1, 1)
    x_tv = (pixels_bgr.flip(1) / 255 - mean) / std
    x_ours = pixels_bgr - torch.tensor(MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    w2, b2 = torchvision_conv1_1_to_caffe(w, b)
    y_tv, y_ours = F.conv2d(x_tv, w, b, padding=1), F.conv2d(x_ours, w2, b2, padding=1)
    assert torch.allclose(y_ours[..., 1:-1, 1:-1], y_tv[..., 1:-1, 1:-1], atol=1e-9)  # exact inside
    assert (y_ours - y_tv).abs().max() < 0.02 * w.abs().sum(dim=(1, 2, 3)).max()  # padding colours differ


def test_imagenet_sources_pth_and_caffemodel_agree(tmp_path):
    """A PyTorch-layout ImageNet VGG-16 (.pth) and the same weights as a Caffe VGG-16 (InnerProduct
    fc6/fc7/fc8, V1 layout) give the same DeepLab init; fc8/MSc start new, the 1000-way fc8 is dropped."""
    sd = _imagenet_state_dict(fc=32, seed=1)
    torch.save(sd, tmp_path / "vgg16.pth")
    from deeplab_v1.weights.imagenet import VGG16_CONV_NAMES

    layers = [(n, "Convolution", [sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]])
              for n, i in zip(VGG16_CONV_NAMES, VGG16_FEATURE_INDICES)]
    layers += [(n, "InnerProduct", [sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"]])
               for n, i in (("fc6", 0), ("fc7", 3), ("fc8", 6))]
    caffe = write_caffemodel(tmp_path / "VGG_ILSVRC_16_layers.caffemodel", layers, format="V1")
    a, b = _small("deeplab-msc-largefov", fc_channels=8, seed=6), _small("deeplab-msc-largefov", fc_channels=8, seed=6)
    fc8_before = a.fc8.weight.clone()
    ra = load_init(a, "deeplab-msc-largefov", tmp_path / "vgg16.pth", num_classes=3, input_space="caffe")
    rb = load_init(b, "deeplab-msc-largefov", caffe, num_classes=3)
    assert _same_weights(a, b) and torch.equal(a.fc8.weight, fc8_before)
    assert ra.source_kind == "imagenet-caffe" and rb.source_kind == "caffemodel-V1+imagenet"
    assert rb.new == ["fc8"] + [f"{br}_{p}" for br in ("data", "pool1", "pool2", "pool3", "pool4") for p in ("conv", "fc", "ms")]
    assert rb.unused == ["fc8"] and "rows/cols [0, 3, 6]" in rb.notes["fc6"]
    # torchvision input space (the default) changes conv1_1 only
    c = _small("deeplab-msc-largefov", fc_channels=8, seed=6)
    load_init(c, "deeplab-msc-largefov", tmp_path / "vgg16.pth", num_classes=3)
    assert not torch.equal(c.conv1_1.weight, a.conv1_1.weight) and torch.equal(c.conv1_2.weight, a.conv1_2.weight)
    bn = dict(sd, **{"features.1.running_mean": torch.zeros(64)})
    torch.save(bn, tmp_path / "vgg16_bn.pth")
    with pytest.raises(WeightsError, match="batch normalisation"):
        load_init(c, "deeplab-msc-largefov", tmp_path / "vgg16_bn.pth", num_classes=3)
