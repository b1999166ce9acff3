"""``deeplab predict``: label PNGs of each image's own size (DCNN and DCNN-CRF), the overlay, batches that
give the test net's own scores, CRF parameters from the checkpoint's run, and bad input stopped at once
with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crf.backend_choice import torch_memory_mb
from crf.params import RELEASE_LARGEFOV
from deeplab_v1.cli import main
from deeplab_v1.data.io import DataError, read_image, voc_palette
from deeplab_v1.engine.inference import predict
from deeplab_v1.models import build_model
from deeplab_v1.predict import PredictError, crf_choice, crf_params_for, load_predictor, predict_images
from deeplab_v1.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "experiments" / "sample" / "VOC2012" / "JPEGImages"
SIZE = 97  # a small test padding keeps the CPU forward passes short


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder holding ``checkpoints/final.pth`` of a (randomly initialised) LargeFOV, as the train
    stage writes it (the model name recorded)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model("deeplab-largefov", 21)
    save_checkpoint(run / "checkpoints" / "final.pth", {"state_dict": model.state_dict(), "model": "deeplab-largefov",
                                                        "num_classes": 21})
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Images of different sizes and kinds: a real VOC photo scaled down (JPEG), a grayscale PNG, an RGBA
    PNG and an RGB PNG of odd sizes (the last two pad to the same test size: one batch)."""
    folder = tmp_path_factory.mktemp("images")
    photo = Image.open(SAMPLE / "2007_002427.jpg")
    paths = [folder / "photo.jpg", folder / "gray.png", folder / "rgba.png", folder / "small.png"]
    photo.resize((photo.width // 4, photo.height // 4)).save(paths[0], quality=90)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (41, 130), dtype=np.uint8), "L").save(paths[1])
    Image.fromarray(rng.integers(0, 255, (77, 59, 4), dtype=np.uint8), "RGBA").save(paths[2])
    Image.fromarray(rng.integers(0, 255, (50, 61, 3), dtype=np.uint8), "RGB").save(paths[3])
    return paths


@pytest.fixture(scope="module")
def predicted(run_dir, images, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out")
    record = predict_images(images, run_dir / "checkpoints" / "final.pth", out, use_crf=True, size=SIZE,
                            device="cpu", batch_size=2, progress=False, log=lambda line: None)
    return out, record


@pytest.mark.slow
def test_labels_have_each_images_size_and_the_voc_palette(predicted, images):
    out, record = predicted
    for path in images:
        h, w = read_image(path).shape[:2]
        for method in ("dcnn", "crf"):
            with Image.open(out / method / f"{path.stem}.png") as im:
                assert im.mode == "P" and im.size == (w, h)
                assert np.array_equal(np.array(im.getpalette()[:63]).reshape(21, 3), voc_palette()[:21])
                assert np.array(im).max() < 21
        assert record["images"][path.stem]["height"] == h and record["images"][path.stem]["width"] == w


@pytest.mark.slow
def test_overlay_shows_image_dcnn_and_crf_side_by_side(predicted, images):
    out, _ = predicted
    for path in images:
        h, w = read_image(path).shape[:2]
        with Image.open(out / "overlay" / f"{path.stem}.png") as im:
            assert im.mode == "RGB"
            assert im.width >= 3 * w and h < im.height < 2 * h  # three panels under one caption strip
            left = np.asarray(im)[-h:, :w]  # the first panel is the image itself
        np.testing.assert_allclose(left.astype(int), read_image(path)[:, :, ::-1].astype(int), atol=1)


def test_record_names_the_model_and_the_crf_parameters(predicted, run_dir):
    out, record = predicted
    saved = json.loads((out / "predict.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["model"] == "deeplab-largefov"  # from the checkpoint: no --model given
    assert saved["crf"]["params"] == RELEASE_LARGEFOV.to_dict()  # this run has no search
    assert "release" in saved["crf"]["from"]


def _argmax_up_to_rounding(scores: np.ndarray, labels: np.ndarray, tol: float = 1e-4) -> None:
    """``labels`` (H, W) is an argmax of ``scores`` (C, H, W) where the top two scores differ by more than
    float rounding: at every pixel where it is not the argmax, its score is within ``tol`` of the maximum
    (convolutions batched or not, or on another CPU, may round differently: oneDNN picks its algorithm per
    shape and instruction set), and that happens at a tiny fraction of the pixels."""
    want = scores.argmax(0)
    picked = np.take_along_axis(scores, labels[None].astype(np.int64), 0)[0]
    top = scores.max(0)
    off = labels != want
    assert np.all(top[off] - picked[off] <= tol * (1 + np.abs(top[off]))), "a label far from the argmax"
    assert off.mean() <= 1e-3, f"{off.mean():.2%} of the pixels differ from the argmax"


@pytest.mark.slow
def test_dcnn_labels_are_the_argmax_of_the_test_nets_scores(predicted, images, run_dir):
    """What predict writes is what ``engine.inference.predict`` computes, image by image."""
    out, _ = predicted
    model = load_predictor(run_dir / "checkpoints" / "final.pth", device="cpu").model
    for path in images:
        scores = predict(model, read_image(path), size=SIZE).upsampled().numpy()
        _argmax_up_to_rounding(scores, np.array(Image.open(out / "dcnn" / f"{path.stem}.png")))


@pytest.mark.slow
def test_batches_give_the_labels_of_one_image_at_a_time(predicted, images, run_dir, tmp_path):
    """Batched (2 per forward, above) and one image per forward write the same labels, up to ties that float
    rounding decides."""
    out, _ = predicted
    predict_images(images, run_dir / "checkpoints" / "final.pth", tmp_path, size=SIZE, device="cpu", batch_size=1,
                   progress=False, log=lambda line: None)
    model = load_predictor(run_dir / "checkpoints" / "final.pth", device="cpu").model
    for path in images:
        scores = predict(model, read_image(path), size=SIZE).upsampled().numpy()
        single = np.array(Image.open(tmp_path / "dcnn" / f"{path.stem}.png"))
        batched = np.array(Image.open(out / "dcnn" / f"{path.stem}.png"))
        _argmax_up_to_rounding(scores, single)
        _argmax_up_to_rounding(scores, batched)
        assert (single != batched).mean() <= 1e-3


def test_crf_parameters_come_from_the_runs_search(run_dir, tmp_path):
    ck = run_dir / "checkpoints" / "final.pth"
    assert crf_params_for(ck) == (RELEASE_LARGEFOV, "the release's LargeFOV values")
    best = {"w1": 7.0, "sigma_alpha": 61.0, "sigma_beta": 4.0, "w2": 3.0, "sigma_gamma": 3.0, "iterations": 10,
            "objective": 0.5, "objective_name": "miou", "images": 2, "configurations": 4}
    (run_dir / "crf_search").mkdir(exist_ok=True)
    (run_dir / "crf_search" / "best.json").write_text(json.dumps(best))
    try:
        params, origin = crf_params_for(ck)
        assert (params.w1, params.sigma_alpha, params.sigma_beta) == (7.0, 61.0, 4.0) and "best.json" in origin
        params, origin = crf_params_for(ck, "w1=3, iterations=5")
        assert (params.w1, params.sigma_alpha, params.iterations) == (3.0, 61.0, 5) and "--params" in origin
    finally:
        (run_dir / "crf_search" / "best.json").unlink()
    with pytest.raises(PredictError, match="--params.*'w9=1'"):
        crf_params_for(ck, "w9=1")
    with pytest.raises(PredictError, match="sigma_alpha"):
        crf_params_for(ck, "sigma_alpha=-3")
    with pytest.raises(PredictError, match="not a number"):
        crf_params_for(ck, "w1=five")


def test_the_command_writes_every_file(run_dir, images, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["predict", str(images[1]), "--weights", str(run_dir / "checkpoints" / "final.pth"), "--crf",
                 "--params", "w1=5", "--out", str(out), "--size", str(SIZE), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["crf/gray.png", "dcnn/gray.png",
                                                                               "overlay/gray.png"]
    assert json.loads((out / "predict.json").read_text())["crf"]["params"]["w1"] == 5.0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deeplab: error: "), err
    return err[0]


def test_bad_images_stop_before_the_checkpoint_is_read(images, tmp_path, capsys):
    """Every image is checked first: the (missing) checkpoint is never reached, nothing is written."""
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = tmp_path / "out"
    for bad, message in ((tmp_path / "missing.jpg", "missing.jpg: image file not found"),
                         (not_an_image, "notes.png: not a readable image"),
                         (text, "notes.txt: not a JPEG or PNG")):
        assert main(["predict", str(images[0]), str(bad), "--weights", str(tmp_path / "none.pth"),
                     "--out", str(out)]) == 2
        assert message in _error_line(capsys)
    assert not out.exists()
    for option, message in ((["--crf-backend", "opencl"], "--crf-backend must be one of"),
                            (["--batch-size", "0"], "--batch-size must be >= 1"),
                            (["--crf", "--crf-memory-mb", "0"], "--crf-memory-mb must be a finite number of MiB > 0"),
                            (["--crf", "--crf-memory-mb", "inf"], "--crf-memory-mb must be a finite number")):
        assert main(["predict", str(images[0]), "--weights", str(tmp_path / "none.pth"), "--out", str(out),
                     *option]) == 2
        assert message in _error_line(capsys)
    with pytest.raises(DataError):
        predict_images([tmp_path / "missing.jpg"], tmp_path / "none.pth", out, progress=False)
    same_stem = tmp_path / "x" / "photo.jpg"
    same_stem.parent.mkdir()
    same_stem.write_bytes(images[0].read_bytes())
    with pytest.raises(PredictError, match="share the name 'photo'"):
        predict_images([images[0], same_stem], tmp_path / "none.pth", out, progress=False)


def test_a_checkpoint_of_another_architecture_is_refused(run_dir, images, tmp_path, capsys):
    state = torch.load(run_dir / "checkpoints" / "final.pth", weights_only=True)["state_dict"]
    other = dict(state)
    other["fc8.weight"] = other["fc8.weight"][:2]  # a 2-class fc8
    del other["fc7.bias"]
    other["backbone.conv1.weight"] = torch.zeros(1)
    ck = tmp_path / "other.pth"
    save_checkpoint(ck, {"state_dict": other, "model": "deeplab-largefov"})
    assert main(["predict", str(images[1]), "--weights", str(ck), "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "does not fit model 'deeplab-largefov'" in line and "fc7.bias" in line and "fc8.weight" in line
    assert "backbone.conv1.weight" in line
    # the checkpoint says largefov: another --model is refused; a checkpoint that records none needs --model
    with pytest.raises(PredictError, match="a checkpoint of model 'deeplab-largefov', but --model deeplab-msc"):
        load_predictor(run_dir / "checkpoints" / "final.pth", model="deeplab-msc", device="cpu")
    anonymous = tmp_path / "anonymous.pth"
    save_checkpoint(anonymous, {"state_dict": state})
    with pytest.raises(PredictError, match="does not record its model; pass --model"):
        load_predictor(anonymous, device="cpu")
    assert load_predictor(anonymous, model="deeplab-largefov", device="cpu").name == "deeplab-largefov"
    assert main(["predict", str(images[1]), "--weights", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "none.pth: checkpoint not found" in _error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(run_dir, images, tmp_path, capsys):
    assert main(["predict", str(images[1]), "--weights", str(run_dir / "checkpoints" / "final.pth"),
                 "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in _error_line(capsys)


#: Runs predict_images in a fresh process with each budget (argv: image, checkpoint, out folder, budgets in MiB)
#: and measures the peak resident memory of each CRF call: VmRSS before it, the high-water mark VmHWM (reset
#: through /proc/self/clear_refs) after it. tracemalloc does not see torch's allocations; the kernel does.
_MEASURE = r"""
import json, sys
from pathlib import Path
import deeplab_v1.predict as predict

def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

real, peaks = predict.dense_crf, []

def measured(*args, **kwargs):
    before = mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    q = real(*args, **kwargs)
    peaks.append({"backend": kwargs["backend"], "peak_mib": mib("VmHWM") - before})
    return q

predict.dense_crf = measured
image, weights, out = sys.argv[1:4]
for budget in sys.argv[4:]:
    lines = []
    predict.predict_images([image], weights, Path(out) / budget, use_crf=True, size=97, device="cpu",
                           progress=False, crf_memory_mb=float(budget), log=lines.append)
    print(json.dumps({"budget": float(budget), "lines": lines, **peaks[-1]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_the_crf_of_a_large_image_stays_within_its_memory_budget_and_says_what_ran(run_dir, tmp_path):
    """Issue #21 item 8: a 3000 x 2000 photo took 7.4 GB. ``auto`` takes torch only where the image fits the
    budget (``--crf-memory-mb``), and then the measured peak of the CRF stays within it; under a smaller budget
    the same image runs in pydensecrf; both say so on a printed line and in predict.json. The image is a real
    photo upscaled to 240 x 180 (43,200 pixels, torch's estimate ~107 MiB) to keep the run short."""
    image = tmp_path / "photo.jpg"
    Image.open(SAMPLE / "2007_002427.jpg").resize((240, 180), Image.BICUBIC).save(image, quality=92)
    need = torch_memory_mb(240 * 180, 21)
    fits, tight = 120.0, 80.0
    assert tight < need <= fits
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(image), str(run_dir / "checkpoints" / "final.pth"),
                           str(tmp_path / "out"), str(fits), str(tight)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {r["budget"]: r for r in map(json.loads, done.stdout.splitlines())}
    for budget, backend in ((fits, "torch"), (tight, "pydensecrf")):
        run = runs[budget]
        assert run["backend"] == backend
        said = [line for line in run["lines"] if line.startswith("predict: CRF of photo.jpg (240x180 pixels): ")]
        assert len(said) == 1 and f"{backend} on cpu" in said[0] and f"budget {budget:.0f} MiB" in said[0], run["lines"]
        record = json.loads((tmp_path / "out" / str(budget) / "predict.json").read_text())
        chosen = record["images"]["photo"]["crf_backend"]
        assert chosen["backend"] == backend and chosen["memory_mb"] == budget and chosen["reason"].startswith("auto: ")
        assert record["crf"]["memory_mb"] == budget
        assert "240x180 pixels x 21 labels" in said[0]
        assert (f"~{need:.0f} MiB in torch, over the {budget:.0f} MiB budget" in said[0]) == (backend != "torch")
    # the measured peak of the torch CRF (image, probabilities, lattices, Q): within the budget it was chosen for
    assert 0 < runs[fits]["peak_mib"] <= fits, runs[fits]


def test_the_crf_choice_of_a_3000_by_2000_photo_is_pydensecrf_and_an_explicit_torch_is_warned_of():
    """The issue's photo (#21 item 8): ~15 GB in torch, over the 4096 MiB default on CPU, so ``auto`` takes
    pydensecrf and says why; ``--crf-backend torch`` runs as asked, with a warning line naming both sizes."""
    lines: list[str] = []
    auto = crf_choice(Path("photo.jpg"), (2000, 3000), 21, "auto", "cpu", 4096.0, lines.append)
    assert (auto.backend, auto.device, auto.memory_mb) == ("pydensecrf", "cpu", 4096.0) and not lines
    assert "3000x2000 pixels x 21 labels, needs ~14923 MiB in torch, over the 4096 MiB budget" in auto.reason
    torch_ = crf_choice(Path("photo.jpg"), (2000, 3000), 21, "torch", "cpu", 4096.0, lines.append)
    assert torch_.backend == "torch" and lines == [
        "predict: warning: the torch CRF of photo.jpg (3000x2000 pixels) needs ~14923 MiB, over its 4096 MiB budget "
        "(--crf-backend auto or pydensecrf stays within it)"]
    small = crf_choice(Path("photo.jpg"), (366, 500), 21, "auto", "cpu", 4096.0, lines.append)
    assert small.backend == "torch" and len(lines) == 1
