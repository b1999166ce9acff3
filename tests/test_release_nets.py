"""The v1 networks against the Caffe release's own nets: each ``test.prototxt`` and ``train.prototxt`` of
deeplab-public is run forward by an independent interpreter of its layers (``caffe_reference.py``: Caffe's
CONVOLUTION with hole, POOLING with the ceil rule, INTERP, PADDING, ELTWISE), on real VOC images, with the
same weights that reach our model through the public path: a ``.caffemodel`` with the release's layer names
-> ``deeplab convert`` -> checkpoint -> ``predict``. Also the MSc training multipliers (``blobs_lr``) of
the shipped experiments and the branch fillers against ``train.prototxt``.

DeepLab-7x7 and DeepLab-4x4 have no prototxt in the release; they share DeepLab's layers but for fc6.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from caffe_reference import CaffeReferenceNet, parse_prototxt, random_weights
from deeplab_v1.cli import main as cli_main
from deeplab_v1.config import load_config
from deeplab_v1.data.io import read_label
from deeplab_v1.data.transforms import shrink_label
from deeplab_v1.engine.checkpoint import load_checkpoint
from deeplab_v1.engine.inference import ScoreMap, predict
from deeplab_v1.engine.solver import caffe_param_groups, layer_name_of
from deeplab_v1.models import build_model
from deeplab_v1.models.vgg import MSC_FILLER_STD, SPECS
from deeplab_v1.weights.caffemodel import CaffeLayer, write_caffemodel

REPO = Path(__file__).resolve().parents[1]
MEAN = np.array([104.008, 116.669, 122.675], dtype=np.float32)

#: release folder -> (our model, experiment, real VOC val images it is checked on)
VARIANTS = {
    "DeepLab": ("deeplab", "voc12-deeplab.yaml", ["2007_000129"]),
    "DeepLab-LargeFOV": ("deeplab-largefov", "voc12-deeplab-largefov.yaml", ["2007_000033", "2007_000559"]),
    "DeepLab-MSc": ("deeplab-msc", "voc12-deeplab-msc.yaml", ["2007_000123"]),
    "DeepLab-MSc-LargeFOV": ("deeplab-msc-largefov", "voc12-deeplab-msc-largefov.yaml", ["2007_000491"]),
}

pytestmark = pytest.mark.slow


def _prototxt(shared_reference: Path, variant: str, phase: str) -> list[dict]:
    path = shared_reference / "deeplab-public" / "prototxt" / variant / f"{phase.lower()}.prototxt"
    return parse_prototxt(path)


def _output_of(net: CaffeReferenceNet, layer_type: str) -> str:
    """The blob the release saves (MAT_WRITE) or trains on (SOFTMAX_LOSS): that layer's first bottom."""
    for layer in net.layers:
        if layer.get("type") == layer_type:
            return str(layer["bottom"][0])
    raise AssertionError(f"no {layer_type} layer")


def _release_weights_as_caffemodel(net: CaffeReferenceNet, path: Path, seed: int) -> dict:
    """Random weights for every CONVOLUTION layer of the release net, written under the release's layer
    names (``fc8_pascal`` / ``fc8_voc12``) in the release's V1 layout."""
    weights = random_weights(net, seed=seed)
    layers = [CaffeLayer(name, "Convolution", [w.numpy(), b.numpy()]) for name, (w, b) in weights.items()]
    write_caffemodel(path, layers, format="V1", name="release")
    return weights


def _converted_model(tmp_path: Path, caffemodel: Path, model_name: str) -> torch.nn.Module:
    out = tmp_path / f"{model_name}.pth"
    assert cli_main(["convert", str(caffemodel), str(out), "--model", model_name]) == 0
    state = load_checkpoint(out)
    model = build_model(model_name)
    model.load_state_dict(state["state_dict"])
    return model.eval()


def _data_blob(image_bgr: np.ndarray, size: int) -> torch.Tensor:
    """The release's data layer, written out here: float BGR minus the mean, zero-padded bottom/right."""
    h, w = image_bgr.shape[:2]
    x = np.zeros((size, size, 3), dtype=np.float32)
    x[:h, :w] = image_bgr.astype(np.float32) - MEAN
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def _agreement(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |diff| / score scale, arg-max agreement) of two (C, H, W) score maps."""
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item() / scale
    agree = (ours.argmax(0) == ref.argmax(0)).float().mean().item()
    return diff, agree


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_test_net_matches_release_test_prototxt(variant, shared_reference, shared_voc, tmp_path):
    """Every release test net (DeepLab's pool4 pad 1 + fc8_crop, LargeFOV, the MSc full-resolution
    fusion) is reproduced by convert -> load -> predict: max |diff| <= 1e-3 of the score scale and >= 99.9 %
    arg-max agreement, in memory and through the float16 score cache."""
    model_name, _, ids = VARIANTS[variant]
    ref_net = CaffeReferenceNet(_prototxt(shared_reference, variant, "TEST"), "TEST")
    weights = _release_weights_as_caffemodel(ref_net, tmp_path / "release.caffemodel", seed=len(variant))
    ref_net.weights = weights
    saved = _output_of(ref_net, "MAT_WRITE")
    size = int(ref_net.layers[0]["transform_param"]["crop_size"])
    assert size == SPECS[model_name].test_size
    model = _converted_model(tmp_path, tmp_path / "release.caffemodel", model_name)
    for image_id in ids:
        image = cv2.imread(str(shared_voc / "JPEGImages" / f"{image_id}.jpg"), cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        with torch.no_grad():
            ref = ref_net.forward(_data_blob(image, size))[saved][0, :, :h, :w]
            sm = predict(model, image, size=size)
        ours = sm.upsampled()
        assert ours.shape == ref.shape == (21, h, w)
        diff, agree = _agreement(ours, ref)
        assert diff <= 1e-3 and agree >= 0.999, f"{variant} {image_id}: max|diff| {diff:.2e} of the scale, {agree:.4%} labels"
        sm.save(tmp_path / f"{image_id}.npz")
        cached = ScoreMap.load(tmp_path / f"{image_id}.npz").upsampled()
        diff, agree = _agreement(cached, ref)
        assert diff <= 1e-3 and agree >= 0.999, f"{variant} {image_id} (cache): {diff:.2e}, {agree:.4%}"
        if variant.startswith("DeepLab-MSc"):
            # the fused scores are kept at the release's (full) resolution: the fine branches matter there
            assert sm.stride == 1 and sm.scores.shape == (21, h, w)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_net_matches_release_train_prototxt(variant, shared_reference, shared_voc, tmp_path):
    """The training net (``model(x)``, dropout off) gives train.prototxt's loss input on a real crop (306
    or 321), and our label shrink gives its ``label_shrink`` INTERP output (pad_beg -1 for DeepLab)."""
    model_name, _, ids = VARIANTS[variant]
    ref_net = CaffeReferenceNet(_prototxt(shared_reference, variant, "TRAIN"), "TRAIN")
    weights = _release_weights_as_caffemodel(ref_net, tmp_path / "release.caffemodel", seed=7)
    ref_net.weights = weights
    data_layer = next(l for l in ref_net.layers if l.get("type") == "IMAGE_SEG_DATA")
    crop = int(data_layer["transform_param"]["crop_size"])
    spec = SPECS[model_name]
    assert crop == spec.train_crop
    loss = next(l for l in ref_net.layers if l.get("type") == "SOFTMAX_LOSS")
    scores_blob, label_blob = str(loss["bottom"][0]), str(loss["bottom"][1])
    model = _converted_model(tmp_path, tmp_path / "release.caffemodel", model_name)
    image_id = ids[0]
    image = cv2.imread(str(shared_voc / "JPEGImages" / f"{image_id}.jpg"), cv2.IMREAD_COLOR)
    label = read_label(shared_voc / "SegmentationClass" / f"{image_id}.png", 21)
    top, left = 17, 30  # a fixed crop window inside the (padded) image
    x = _data_blob(image[top:top + crop, left:left + crop], crop)
    lab = np.full((crop, crop), 255, dtype=np.uint8)
    part = label[top:top + crop, left:left + crop]
    lab[: part.shape[0], : part.shape[1]] = part
    with torch.no_grad():
        blobs = ref_net.forward(x, torch.from_numpy(lab.astype(np.float32))[None, None])
        ours = model(x)[0]
    ref = blobs[scores_blob][0]
    assert ours.shape == ref.shape
    diff, agree = _agreement(ours, ref)
    assert diff <= 1e-3 and agree >= 0.999, f"{variant}: {diff:.2e}, {agree:.4%}"
    ref_label = blobs[label_blob][0, 0].round().to(torch.uint8).numpy()
    assert np.array_equal(shrink_label(lab, 8, spec.train_label_pad_beg), ref_label)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_experiment_lr_multipliers_match_train_prototxt(variant, shared_reference):
    """Each shipped experiment trains with its train.prototxt's ``blobs_lr`` per layer: the MSc ones
    freeze conv1_1 ... fc7 (and fc8 in MSc-LargeFOV) and train the branches x1 / x2."""
    model_name, experiment, _ = VARIANTS[variant]
    net = CaffeReferenceNet(_prototxt(shared_reference, variant, "TRAIN"), "TRAIN")
    cfg = load_config(REPO / "experiments" / experiment, check_paths=False)
    with torch.device("meta"):
        model = build_model(model_name)
    groups = caffe_param_groups(model, 1.0, 0.0005, cfg.train.classifier_lr_mult,
                                lr_mult=cfg.train.lr_mult)
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    layer_of = layer_name_of(model)
    ours: dict[str, list[float]] = {}
    for pname, p in model.named_parameters():
        ours.setdefault(layer_of[pname], [0.0, 0.0])[1 if pname.endswith("bias") else 0] = mult.get(id(p), 0.0)
    release = {}
    for name, *_ in net.param_layers():
        release["fc8" if name.startswith("fc8_") else name] = [float(v) for v in net.lr_mults(name)]
    assert ours == release


@pytest.mark.parametrize("variant", ["DeepLab-MSc", "DeepLab-MSc-LargeFOV"])
def test_msc_fillers_match_train_prototxt(variant, shared_reference):
    net = CaffeReferenceNet(_prototxt(shared_reference, variant, "TRAIN"), "TRAIN")
    torch.manual_seed(0)
    model = build_model(VARIANTS[variant][0])
    for name, *_ in net.param_layers():
        fillers = net.fillers(name)
        if name.startswith(("conv", "fc6", "fc7")):
            continue  # loaded from the trained single-scale net
        wf = fillers.get("weight_filler", {})
        expect = float(wf["std"]) if wf else 0.0  # no filler: Caffe's default constant 0
        assert (not wf) or wf.get("type") == "gaussian"
        ours_name = "fc8" if name.startswith("fc8_") else name
        if ours_name != "fc8":
            assert MSC_FILLER_STD[ours_name] == expect, name
        layer = model.caffe_layer(ours_name)
        std = layer.weight.detach().std().item()
        assert abs(std - expect) <= 0.1 * expect if expect else (layer.weight == 0).all(), (name, std)
        assert (layer.bias == 0).all() and fillers.get("bias_filler", {}).get("value", 0) == 0
