"""The pipeline that feeds a device: keyed randomness, the DataLoader, batched inference with a background
writer, precision, channels_last, compile and TensorBoard -- each checked against the exact path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_v1.config import TrainConfig, load_config
from deeplab_v1.data.datasets import TrainDataset
from deeplab_v1.data.io import voc_palette
from deeplab_v1.data.lists import load_samples
from deeplab_v1.data.loader import TrainBatches, epoch_index, train_loader
from deeplab_v1.engine.inference import BackgroundWriter, ScoreMap, forward_views, predict, predict_batch, image_views
from deeplab_v1.engine.precision import compile_supported
from deeplab_v1.models import build_model
from deeplab_v1.models.dropout import KeyedDropout, dropout_keys

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"
SAMPLE = REPO / "experiments" / "sample" / "VOC2012"


# ------------------------------------------------------------------------------------------ keyed dropout


def test_a_dropout_mask_follows_its_sample_not_its_place_in_the_batch():
    drop = KeyedDropout(0.5).train()
    x = torch.ones(3, 4, 6, 6)
    with dropout_keys(drop, [(0, 0, 5), (0, 0, 7), (0, 1, 5)]):
        together = drop(x)
    with dropout_keys(drop, [(0, 0, 7)]):
        alone = drop(x[:1])
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1]) and not torch.equal(together[0], together[2])  # keys matter
    kept = together != 0
    assert set(together[kept].unique().tolist()) == {2.0}  # kept values scaled by 1 / (1 - p)
    assert 0.3 < kept.float().mean() < 0.7
    with dropout_keys(drop, [(0, 0, 7)]):
        first, second = drop(x[:1]), drop(x[:1])  # a layer used twice (MSc branches) draws two masks
    assert not torch.equal(first, second)


def test_without_keys_it_is_torchs_dropout():
    drop, ref = KeyedDropout(0.5).train(), nn.Dropout(0.5).train()
    x = torch.randn(2, 8, 5, 5)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, ref(x))
    assert torch.equal(drop.eval()(x), x)
    model = build_model("deeplab-largefov", num_classes=3)
    assert sum(isinstance(m, KeyedDropout) for m in model.modules()) == 2  # fc6, fc7 (the release's DROPOUT)


# ------------------------------------------------------------------------------------------------ loader


def _former_batches(dataset: TrainDataset, iterations: int, batch: int, seed: int):
    """The loop the trainer ran before the DataLoader: positions in order, a permutation per epoch."""
    n = len(dataset)
    for it in range(iterations):
        images, labels = [], []
        for p in range(it * batch, (it + 1) * batch):
            epoch = p // n
            i = int(np.random.default_rng([seed, epoch]).permutation(n)[p % n])
            dataset.set_epoch(epoch)
            img, lab = dataset[i]
            images.append(img)
            labels.append(lab)
        yield torch.stack(images), torch.stack(labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_gives_the_samples_of_the_former_loop(workers):
    samples = load_samples(SAMPLE, "train", require_labels=True)
    dataset = TrainDataset(samples, 97, seed=3, scale_range=(0.5, 1.5))
    iterations, batch = 6, 3  # 18 samples of 8: three epochs
    loader = train_loader(dataset, TrainBatches(0, 0, iterations, batch), num_workers=workers)
    got = list(loader)
    assert len(got) == iterations
    for (img, lab, keys), (ref_img, ref_lab) in zip(got, _former_batches(dataset, iterations, batch, seed=3)):
        assert torch.equal(img, ref_img) and torch.equal(lab, ref_lab)
    keys = torch.cat([k for _, _, k in got])
    assert keys[:, 0].eq(3).all() and keys[:, 1].tolist() == [p // 8 for p in range(18)]
    assert sorted(keys[:8, 2].tolist()) == list(range(8))  # one epoch is a permutation


def test_ranks_and_micro_batches_split_one_stream_of_positions():
    one = [p for b in TrainBatches(10, 2, 5, 4) for p in b]
    split = [TrainBatches(10, 2, 5, 1, iter_size=2, rank=r, world=2) for r in (0, 1)]
    per_iteration = [sorted(split[0].positions(it, 0) + split[0].positions(it, 1) + split[1].positions(it, 0)
                            + split[1].positions(it, 1)) for it in range(2, 5)]
    assert [p for it in per_iteration for p in it] == one == list(range(10, 22))
    assert split[1].positions(2, 0) == [12] and split[0].global_batch == 4 and len(split[0]) == 6
    assert epoch_index(9, 8, 0)[0] == 1


# ------------------------------------------------------------------------------------------ inference


@pytest.fixture(scope="module")
def largefov():
    torch.manual_seed(0)
    return build_model("deeplab-largefov", num_classes=21).eval()


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 70), (64, 97), (97, 81))]


def _scale(maps: list[ScoreMap]) -> float:
    return max(float(np.abs(m.scores).max()) for m in maps)


@pytest.mark.slow
@pytest.mark.parametrize("scales,flip", [((1.0,), False), ((0.75, 1.0), True)])
def test_batched_test_equals_one_image_at_a_time(largefov, scales, flip):
    images = _images()
    single = [predict(largefov, im, size=97, scales=scales, flip=flip) for im in images]
    batched = predict_batch(largefov, images, size=97, scales=scales, flip=flip, batch_size=6)
    for a, b in zip(single, batched):
        assert (a.stride, a.offset, a.height, a.width) == (b.stride, b.offset, b.height, b.width)
        assert np.abs(a.scores - b.scores).max() <= 1e-3 * _scale(single)
    assert single[0].stride == (8 if scales == (1.0,) else 1)


def test_the_test_stage_batched_with_workers_writes_the_one_at_a_time_files(tmp_path):
    common = ["train.iterations=0", "stages=[train, test]", "data.max_test_images=3", "test.size=97",
              "model.name=tiny-test"]
    from deeplab_v1.runner import Runner

    outs = {}
    for name, extra in (("one", ["test.batch_size=1", "test.num_workers=0"]),
                        ("batched", ["test.batch_size=2", "test.num_workers=1"])):
        cfg = load_config(DEFAULT, common + extra + [f"output_dir={tmp_path / name}"])
        Runner(cfg, progress=False).run()
        outs[name] = {p.name: ScoreMap.load(p) for p in sorted((tmp_path / name / "scores").glob("*.npz"))}
    assert len(outs["one"]) == 3 and outs["one"].keys() == outs["batched"].keys()
    scale = max(float(np.abs(m.scores.astype(np.float32)).max()) for m in outs["one"].values())
    for k, a in outs["one"].items():
        b = outs["batched"][k]
        assert np.abs(a.scores.astype(np.float32) - b.scores.astype(np.float32)).max() <= 1e-3 * scale
        assert (tmp_path / "batched" / "predictions" / "dcnn" / k.replace(".npz", ".png")).is_file()


def test_bf16_inference_is_within_a_few_percent_of_fp32(largefov):
    image = _images()[2]
    ref = predict(largefov, image, size=97).scores
    low = predict(largefov, image, size=97, precision="bf16").scores
    rel = np.linalg.norm(low - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.05, rel  # not identical (it did run in bf16), and close


def test_channels_last_gives_the_same_scores(largefov):
    views = image_views(_images()[0], size=97)
    ref = forward_views(largefov, views)[0]
    model = build_model("deeplab-largefov", num_classes=21).eval()
    model.load_state_dict(largefov.state_dict())
    model.to(memory_format=torch.channels_last)
    got = forward_views(model, views, channels_last=True)[0]
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_compile_gives_the_same_scores():
    ok, why = compile_supported()
    if not ok:
        pytest.skip(why)

    class Tiny(nn.Module):
        output_stride = 8

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)

        def forward(self, x):
            return self.conv(x / 50)

    torch.manual_seed(0)
    model = Tiny().eval()
    views = image_views(_images()[0], size=97)
    ref = forward_views(model, views)[0]
    got = forward_views(model, views, net=torch.compile(model))[0]
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-5)


def test_the_background_writer_hands_back_a_write_error(tmp_path):
    done = []
    with BackgroundWriter(threads=2, max_pending=2) as w:
        for i in range(5):
            w.submit(done.append, i)
    assert sorted(done) == list(range(5))

    def fail(path: Path) -> None:
        raise OSError(f"{path}: disk full")

    w = BackgroundWriter()
    w.submit(fail, tmp_path / "x.npz")
    with pytest.raises(OSError, match="disk full"):
        w.close()


# ---------------------------------------------------------------------------------------------- training


def _train(tmp_path: Path, name: str, **kw) -> tuple[dict, float]:
    from deeplab_v1.engine.checkpoint import load_checkpoint
    from deeplab_v1.engine.trainer import train

    samples = load_samples(SAMPLE, "train", require_labels=True)[:4]
    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=21)
    cfg = TrainConfig(iterations=2, batch_size=2, base_lr=1e-4, checkpoint_every=2, num_workers=0, **kw)
    result = train(model, samples, cfg, tmp_path / name, crop_size=81, seed=0, progress=False, log=lambda _: None)
    return load_checkpoint(tmp_path / name / "iter_2.pth"), result.final_loss


@pytest.mark.slow
def test_bf16_and_fp16_training_track_fp32(tmp_path):
    ref, ref_loss = _train(tmp_path, "fp32")
    for precision in ("bf16", "fp16"):
        state, loss = _train(tmp_path, precision, precision=precision)
        assert abs(loss - ref_loss) <= 0.05 * abs(ref_loss), (precision, loss, ref_loss)
        w, w_ref = state["model_state"]["fc8.weight"], ref["model_state"]["fc8.weight"]
        assert not torch.equal(w, w_ref)  # the low precision did run
        assert float((w - w_ref).norm() / w_ref.norm()) < 0.05
        assert ("scaler_state" in state) == (precision == "fp16")  # GradScaler for fp16 only, resumable
    # a memory format: the same numbers up to float rounding (oneDNN picks other kernels for channels_last,
    # and their sums round differently by CPU): every tensor's update agrees with fp32's to 1 %
    state, loss = _train(tmp_path, "channels_last", channels_last=True)
    torch.manual_seed(0)
    init = build_model("deeplab-largefov", num_classes=21).state_dict()
    for k, w in state["model_state"].items():
        w_ref = ref["model_state"][k]
        if not torch.is_floating_point(w_ref):
            assert torch.equal(w, w_ref), k
            continue
        update = float((w_ref - init[k]).norm())
        assert float((w - w_ref).norm()) <= 0.01 * update + 1e-12, (k, float((w - w_ref).norm()), update)


def test_tensorboard_logs_loss_lr_and_predictions(tmp_path):
    pytest.importorskip("tensorboard")
    from deeplab_v1.runner import Runner

    cfg = load_config(DEFAULT, ["train.iterations=2", "train.batch_size=1", "train.crop_size=81", "train.log_every=1",
                                "train.checkpoint_every=2", "train.tensorboard=true", "stages=[train]",
                                "model.name=tiny-test", f"output_dir={tmp_path}"])
    Runner(cfg, progress=False).run()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"train/loss", "train/lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert "train/prediction/0" in acc.Tags()["images"] or "train/prediction" in str(acc.Tags()["images"])


def test_tensorboard_images_take_the_datasets_palette(tmp_path, monkeypatch):
    """The prediction and label images TensorBoard shows are in ``data.palette``'s colours, not VOC's
    (issue #23: a dataset of one's own keeps its colours everywhere). A stand-in SummaryWriter records them."""
    import types

    from deeplab_v1.runner import Runner

    shown: dict = {}

    class Writer:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, *args):
            pass

        def add_images(self, tag, images, step, dataformats):
            shown[tag] = images

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    colours = [[10 * c, 255 - 10 * c, 7] for c in range(21)]
    cfg = load_config(DEFAULT, ["train.iterations=1", "train.batch_size=1", "train.crop_size=81", "train.checkpoint_every=1",
                                "train.tensorboard=true", "stages=[train]", "model.name=tiny-test", f"data.palette={colours}",
                                f"output_dir={tmp_path}"])
    Runner(cfg, progress=False).run()
    allowed = {tuple(c) for c in colours} | {tuple(voc_palette()[255])}  # 255 (void) keeps VOC's colour
    for tag in ("train/prediction", "train/label"):
        seen = {tuple(v) for v in shown[tag].reshape(-1, 3).tolist()}
        assert seen and seen <= allowed, (tag, seen - allowed)
    assert {tuple(v) for v in shown["train/label"].reshape(-1, 3).tolist()} - {tuple(voc_palette()[255])}


def test_tensorboard_missing_is_a_one_line_error_naming_the_key(tmp_path, monkeypatch, capsys):
    from deeplab_v1.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code = main(["train", str(DEFAULT), "--no-progress", "--set", "train.tensorboard=true", "--set", "train.iterations=1",
                 "--set", "train.batch_size=1", "--set", "train.crop_size=81", "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "train.tensorboard" in err and "tensorboard package is not installed" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.cuda
def test_cuda_batched_bf16_inference_matches_float32_on_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=21).eval()
    images = _images()
    ref = predict_batch(model, images, size=97)
    model.cuda()
    got = predict_batch(model, images, size=97, device="cuda", batch_size=3, precision="bf16", channels_last=True)
    for a, b in zip(ref, got):
        rel = np.linalg.norm(a.scores - b.scores) / np.linalg.norm(a.scores)
        assert rel < 0.05
