"""DeepLab trained end to end (CRF-as-RNN, issue #24 item 3): ``model.crf_rnn`` appends ``crf.DenseCRFLayer``
to a model; the run trains the CRF's parameters with the network, resumes bit for bit, tests with the
refined scores and skips the post-hoc CRF stages; a plain checkpoint fills the network; bad keys are named.

All on ``tiny-test`` (the pipeline, not a network's numbers), small crops and few mean-field iterations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from crf.layer import DenseCRFLayer
from crf.params import RELEASE_LARGEFOV
from deeplab_v1.config import ConfigError, TrainConfig, load_config, to_dict
from deeplab_v1.data.io import read_image
from deeplab_v1.data.transforms import image_to_tensor
from deeplab_v1.engine.checkpoint import load_checkpoint
from deeplab_v1.engine.inference import ScoreMap
from deeplab_v1.engine.solver import caffe_param_groups, layer_name_of
from deeplab_v1.engine.trainer import train
from deeplab_v1.fingerprints import stage_inputs
from deeplab_v1 import models
from deeplab_v1.models import build_model
from deeplab_v1.runner import Runner
from deeplab_v1.stages.network import initial_model
from test_distributed import _free_port, make_samples

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"
SAMPLE = REPO / "experiments" / "sample" / "VOC2012"
LAYER = {"params": RELEASE_LARGEFOV, "learn": ("w1", "w2", "compatibility"), "iterations_train": 2,
         "iterations_test": 3}
#: the pipeline on the sample: tiny-test with the CRF layer, 65 crops, 2 / 1 mean-field iterations
QUICK = ["model.name=tiny-test", "model.crf_rnn.enabled=true", "model.crf_rnn.iterations_train=2",
         "model.crf_rnn.iterations_test=1", "train.iterations=4", "train.batch_size=2", "train.crop_size=65",
         "train.checkpoint_every=2", "train.log_every=2", "train.base_lr=0.01", "data.max_test_images=1",
         "train.lr_mult={crf: [10, 10]}"]


def _crf_state(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("crf.")}


@pytest.mark.slow
def test_end_to_end_run_trains_the_crf_tests_with_it_and_skips_the_crf_stages(tmp_path):
    """``deeplab run`` on the shipped sample: the CRF parameters change, the score cache holds the refined
    full-resolution scores, crf_search and crf are skipped (even with the search asked for), evaluate reports."""
    cfg = load_config(DEFAULT, QUICK + ["crf_search.enabled=true", f"output_dir={tmp_path}"])
    metrics = Runner(cfg, progress=False).run()
    final = load_checkpoint(tmp_path / "checkpoints" / "final.pth")["state_dict"]
    assert {k for k in final if k.startswith("crf.")} >= {"crf.w1_log_gain", "crf.w2_log_gain", "crf.compatibility_raw"}
    assert float(final["crf.w1_log_gain"]) != 0.0 and float(final["crf.w2_log_gain"]) != 0.0  # trained from 0
    assert not torch.equal(final["crf.compatibility_raw"], -torch.eye(21))  # from Potts
    record = json.loads((tmp_path / "stages" / "train.json").read_text())
    assert record["crf_layer"]["w1"] == pytest.approx(4.0 * float(torch.exp(final["crf.w1_log_gain"])), rel=1e-5)
    for stage in ("crf_search", "crf"):
        rec = json.loads((tmp_path / "stages" / f"{stage}.json").read_text())
        assert rec["skipped"] and "CRF-as-RNN" in rec["reason"]
    assert not (tmp_path / "predictions" / "crf").exists() and not (tmp_path / "crf_search" / "best.json").exists()
    assert "dcnn" in metrics and "crf" not in metrics and metrics["dcnn"]["miou"] is not None
    assert "the CRF is inside the net (CRF-as-RNN" in (tmp_path / "report.md").read_text()
    # the cache: the refined scores at stride 1, image size, readable as any cache
    (cache,) = sorted((tmp_path / "scores").glob("*.npz"))
    sm = ScoreMap.load(cache)
    image = read_image(SAMPLE / "JPEGImages" / f"{cache.stem}.jpg")
    assert sm.stride == 1 and sm.offset == 0 and sm.scores.shape == (21, *image.shape[:2])
    # ... and they are the trained net's test net on the image (padded as the test stage pads)
    model = build_model("tiny-test", 21, crf_rnn={**LAYER, "iterations_test": 1}).eval()
    model.load_state_dict(final)
    from deeplab_v1.engine.inference import predict

    again = predict(model, image, size=513)
    assert again.stride == 1
    assert np.abs(again.scores - sm.scores.astype(np.float32)).max() <= 2e-3 * np.abs(again.scores).max()
    # `deeplab predict` rebuilds the same net from the checkpoint (its crf_rnn record)
    from deeplab_v1.predict import load_predictor

    pred = load_predictor(tmp_path / "checkpoints" / "final.pth", device="cpu")
    assert isinstance(pred.model, models.CRFasRNN) and pred.model.iterations_test == 1


@pytest.mark.slow
def test_killed_training_resumes_bit_for_bit(tmp_path):
    """Killed after the iteration-2 checkpoint, the rerun ends with the uninterrupted run's weights, the CRF
    layer's included (its momentum is in the optimiser state)."""
    common = QUICK + ["stages=[train]"]
    full = load_config(DEFAULT, common + [f"output_dir={tmp_path / 'full'}"])
    Runner(full, progress=False).run()
    part = load_config(DEFAULT, common + [f"output_dir={tmp_path / 'part'}"])
    Runner(part, progress=False).run()
    for f in ("iter_4.pth", "final.pth"):  # the kill: only the iteration-2 checkpoint is left
        (tmp_path / "part" / "checkpoints" / f).unlink()
    (tmp_path / "part" / "stages" / "train.json").unlink()
    Runner(part, progress=False).run()
    assert "resuming from iter_2.pth" in (tmp_path / "part" / "run.log").read_text()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "final.pth")["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "final.pth")["state_dict"]
    assert a.keys() == b.keys() and _crf_state(a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    mid = load_checkpoint(tmp_path / "part" / "checkpoints" / "iter_2.pth")["model_state"]
    assert not torch.equal(mid["crf.compatibility_raw"], a["crf.compatibility_raw"])  # it trained after the resume


def test_forward_is_the_network_upsampled_then_the_layer():
    """Training: ``model(x)`` resized to the crop (corner-aligned), ``iterations_train`` steps on the RGB image
    the input came from; test: the test net's zoom, ``iterations_test`` steps."""
    torch.manual_seed(0)
    model = build_model("tiny-test", 21, crf_rnn=LAYER)
    assert isinstance(model, models.CRFasRNN)
    with torch.no_grad():
        model.crf.w1_log_gain.fill_(0.3)  # not at the start values: the layer's parameters are the ones used
        model.crf.compatibility_raw.add_(0.1 * torch.randn(21, 21))
    bgr = read_image(SAMPLE / "JPEGImages" / "2007_000648.jpg")[100:165, 100:165]
    x = image_to_tensor(bgr)[None]
    rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float()
    layer = DenseCRFLayer(21, RELEASE_LARGEFOV)
    layer.load_state_dict(model.crf.state_dict())
    model.train()
    out = model(x)
    up = F.interpolate(model.dcnn(x), size=(65, 65), mode="bilinear", align_corners=True)
    ref = layer(rgb, up, iterations=2)
    assert out.shape == (1, 21, 65, 65)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, layer(rgb, up, iterations=3), atol=1e-3)  # the iterations count
    model.eval()
    with torch.no_grad():
        test = model.test_net(x)
        zoomed = F.interpolate(model.dcnn(x), size=(65, 65), mode="bilinear", align_corners=True)  # 9 -> 65
        assert torch.allclose(test, layer(rgb, zoomed, iterations=3), atol=1e-4, rtol=1e-4)
    # gradients reach the network and every learned layer parameter
    model.train()
    model(x).logsumexp(1).mean().backward()
    assert model.dcnn.fc8.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.crf.parameters())


def _save(path: Path, state: dict, name: str = "tiny-test") -> Path:
    torch.save({"state_dict": state, "model": name}, path)
    return path


def test_a_plain_checkpoint_fills_the_network_and_leaves_the_crf_at_its_start(tmp_path):
    torch.manual_seed(1)
    plain = build_model("tiny-test", 21).state_dict()
    init = _save(tmp_path / "plain.pth", plain)
    ctx = Runner(load_config(DEFAULT, QUICK + [f"model.init={init}", "model.crf_rnn.params={w1: 5}",
                                               f"output_dir={tmp_path / 'run'}"]), progress=False).ctx
    model, desc = initial_model(ctx)
    assert isinstance(model, models.CRFasRNN) and "CRF layer at its initial parameters" in desc
    assert all(torch.equal(model.dcnn.state_dict()[k], v) for k, v in plain.items())
    assert model.crf.current_params().w1 == 5.0 and model.crf.current_params().w2 == 3.0
    assert torch.equal(model.crf.compatibility(), -torch.eye(21))
    # an end-to-end checkpoint as the init: the whole model (its trained CRF) ...
    trained = {**{f"dcnn.{k}": v for k, v in plain.items()}, **_crf_state(model.state_dict())}
    trained["crf.w1_log_gain"] = torch.tensor(0.5)
    init2 = _save(tmp_path / "e2e.pth", trained)
    ctx2 = Runner(load_config(DEFAULT, QUICK + [f"model.init={init2}", f"output_dir={tmp_path / 'run2'}"]),
                  progress=False).ctx
    model2, desc2 = initial_model(ctx2)
    assert "whole CRF-as-RNN model" in desc2 and float(model2.crf.w1_log_gain.detach()) == 0.5
    # ... and into a plain net, its network part
    ctx3 = Runner(load_config(DEFAULT, ["model.name=tiny-test", f"model.init={init2}",
                                        f"output_dir={tmp_path / 'run3'}"]), progress=False).ctx
    model3, _ = initial_model(ctx3)
    assert not isinstance(model3, models.CRFasRNN)
    assert all(torch.equal(model3.state_dict()[k], v) for k, v in plain.items())


def test_a_release_network_checkpoint_fills_the_largefov_inside_the_wrapper(tmp_path):
    """v1 (``weights.load_init``, the shipped experiment's path): a plain LargeFOV ``.pth`` of ours."""
    torch.manual_seed(2)
    plain = build_model("deeplab-largefov", 21).state_dict()
    init = _save(tmp_path / "largefov.pth", plain, "deeplab-largefov")
    ctx = Runner(load_config(DEFAULT, ["model.name=deeplab-largefov", "model.crf_rnn.enabled=true",
                                       f"model.init={init}", f"output_dir={tmp_path / 'run'}"]), progress=False).ctx
    model, desc = initial_model(ctx)
    assert isinstance(model, models.CRFasRNN) and "CRF layer at its initial parameters" in desc
    assert all(torch.equal(model.dcnn.state_dict()[k], v) for k, v in plain.items())
    assert float(model.crf.w1_log_gain.detach()) == 0.0 and torch.equal(model.crf.compatibility(), -torch.eye(21))


@pytest.mark.parametrize("override, said", [
    ("model.crf_rnn.iters=3", "unknown key 'model.crf_rnn.iters'; known keys here: enabled, iterations_test"),
    ("model.crf_rnn.iterations_train=0", "key 'model.crf_rnn.iterations_train' must be >= 1"),
    ("model.crf_rnn.iterations_test=ten", "key 'model.crf_rnn.iterations_test' must be int"),
    ("model.crf_rnn.learn=[w1, sigma_alpha]", "key 'model.crf_rnn.learn[1]' must be 'w1' or 'w2' or 'compatibility'"),
    ("model.crf_rnn.learn=[w1, w1]", "key 'model.crf_rnn.learn' must name each"),
    ("model.crf_rnn.params={sigma_beta: -1}", "key 'model.crf_rnn.params' is invalid: CRFParams.sigma_beta"),
    ("model.crf_rnn.params={w2: 0}", "key 'model.crf_rnn.params' has w2 = 0.0, which cannot be learned"),
])
def test_a_bad_crf_rnn_key_is_named(override, said, tmp_path):
    """One line, before any work, naming the key and what is wrong with it."""
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["model.crf_rnn.enabled=true", override, f"output_dir={tmp_path}"])
    assert said in str(e.value) and len(str(e.value).splitlines()) == 1


def test_the_crf_has_its_own_param_group_and_lr_mult_pattern():
    model = build_model("deeplab-largefov", 21, crf_rnn=LAYER)
    names = layer_name_of(model)
    assert names["dcnn.conv1_1.weight"] == "conv1_1" and names["crf.compatibility_raw"] == "crf"
    crf_params = {id(p) for p in model.crf.parameters()}
    for lr_mult, expect in ((None, 1.0), ({"crf": [30, 30]}, 30.0)):
        groups = caffe_param_groups(model, 0.001, 0.0005, 10.0, lr_mult=lr_mult)
        (crf_group,) = [g for g in groups if {id(p) for p in g["params"]} & crf_params]
        assert {id(p) for p in crf_group["params"]} == crf_params  # a group of its own
        assert crf_group["lr_mult"] == expect and crf_group["weight_decay"] == 0.0
        fc8 = [g for g in groups if any(p is model.dcnn.fc8.weight for p in g["params"])][0]
        assert fc8["lr_mult"] == 10.0  # the network's classifier rule holds inside the wrapper
    from deeplab_v1.stages.train import check_lr_mult

    check_lr_mult(load_config(DEFAULT, ["model.crf_rnn.enabled=true", "train.lr_mult={crf: [0, 0]}"],
                              check_paths=False))  # the pattern names a layer of the wrapped model ...
    with pytest.raises(ConfigError, match="train.lr_mult.crf"):  # ... not of the plain one
        check_lr_mult(load_config(DEFAULT, ["train.lr_mult={crf: [0, 0]}"], check_paths=False))


def test_fingerprints_carry_the_section_only_when_it_is_on():
    on = to_dict(load_config(DEFAULT, ["model.crf_rnn.enabled=true"], check_paths=False))
    off = to_dict(load_config(DEFAULT, ["model.crf_rnn.iterations_train=7"], check_paths=False))
    plain = to_dict(load_config(DEFAULT, check_paths=False))
    for stage in ("train", "test"):
        assert stage_inputs(stage, on)["model.crf_rnn.iterations_train"] == 5
        assert stage_inputs(stage, off) == stage_inputs(stage, plain)  # an off section changes nothing
    assert not any(k.startswith("model.crf_rnn") for k in stage_inputs("crf", on))  # the crf stage: through test


def _train(data: Path, out: Path, batch: int) -> dict:
    """tiny-test with the layer (3 classes), 2 iterations on 33 crops of random images with every label
    valid (the loss is normalised per forward: splits agree when every forward has as many labels)."""
    torch.manual_seed(0)
    model = build_model("tiny-test", 3, crf_rnn=LAYER)
    cfg = TrainConfig(iterations=2, batch_size=batch, base_lr=0.01, checkpoint_every=2, num_workers=0,
                      lr_mult={"crf": [10, 10]})
    train(model, make_samples(data, count=2), cfg, out, crop_size=33, seed=1, num_classes=3, progress=False,
          log=lambda _: None)
    return load_checkpoint(out / "final.pth")["state_dict"] if (out / "final.pth").is_file() else {}


def _rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(Path(data) / f"rank{rank}", Path(out), batch=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_the_crf_layer_as_one_process(tmp_path):
    """DDP carries the CRF parameters: 2 gloo ranks x batch 1 == one process with batch 2."""
    one = _train(tmp_path / "data", tmp_path / "one", batch=2)
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "data"), str(tmp_path / "two")), nprocs=2, join=True)
    two = load_checkpoint(tmp_path / "two" / "final.pth")["state_dict"]
    assert one.keys() == two.keys() and float(one["crf.w1_log_gain"]) != 0.0
    for k in one:
        scale = float(one[k].abs().max()) or 1.0
        assert float((one[k] - two[k]).abs().max()) <= 1e-4 * scale + 1e-7, k
