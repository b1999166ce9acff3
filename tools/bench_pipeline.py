"""Throughput of the DCNN pipeline against the device's limit: one table.

Rows (DeepLab-LargeFOV, 21 classes, random weights, synthetic inputs so that no file I/O is timed):

* **train** img/s at 321 x 321 crops: forward (the training net), the label-shrunk loss, backward and the
  Caffe SGD step, in ``train.precision`` (fp32 on the CPU; fp32 and bf16 on CUDA), per crop;
* **test** img/s at 513 x 513: ``engine.inference.predict_batch`` on 500 x 375 images padded to 513, in
  batches (the test stage's path minus the file reads and the background writer);
* **crf** ms/image (by default): ``crf``'s default backend, torch (``crf.torch_backend.
  dense_crf_torch_batch``), on 500 x 375 images with 21 labels, 10 mean-field iterations, in batches
  (one image per call on the CPU, as the crf stage runs there; 8 on CUDA); ``--crf`` adds pydensecrf's
  row (the reference, one thread);
* **search** (configuration, image) pairs/s (by default): ``crf.search.run_search`` in-process (torch,
  ``workers: 1``) on synthetic search inputs (``tools/bench_crf_search.py``), one round.

Limit: the FLOP rate. A network row's FLOPs per image are counted with ``models.flops`` (2 FLOPs per
multiply-add; LargeFOV: about 257 GFLOP per 513 forward, a train step at 321 is counted as 3x its
forward: forward, and backward for inputs and weights). The device's rate is MEASURED with a large
matmul in the row's dtype (CPU: fp32 on every thread; CUDA: the row's dtype), so the ratio says how
close the network runs to what this device does on its best kernel, not to a data-sheet number.
CUDA rows are skipped with a reason where no GPU is present. As an entry point it tells glibc to reuse
freed memory (``crf.memory.reuse_freed_memory``, as a ``deeplab`` run does) and says so. Usage:

    python tools/bench_pipeline.py [--quick] [--crf] [--no-crf] [--batch N] [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplab_v1.data.transforms import shrunk_size  # noqa: E402
from deeplab_v1.engine.inference import predict_batch  # noqa: E402
from deeplab_v1.engine.precision import autocast  # noqa: E402
from deeplab_v1.engine.solver import CaffeSGD, caffe_param_groups  # noqa: E402
from deeplab_v1.engine.trainer import segmentation_loss  # noqa: E402
from deeplab_v1.models import build_model  # noqa: E402
from deeplab_v1.models.dropout import dropout_keys  # noqa: E402
from deeplab_v1.models.flops import count_multiply_adds  # noqa: E402

MODEL = "deeplab-largefov"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, quick: bool) -> float:
    """Measured FLOP/s of an n x n matmul, the best of several runs (the device's best-case rate in
    ``dtype``; on a shared machine the best run is the one least disturbed)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    reps = 1 if device == "cpu" else 20
    best = 0.0
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def forward_flops(size: int) -> float:
    return 2.0 * count_multiply_adds(lambda: build_model(MODEL, 21), size, size).total


def bench_train(device: str, precision: str, batch: int, steps: int) -> float:
    """Crops per second of the training step at 321."""
    torch.manual_seed(0)
    model = build_model(MODEL, 21).to(device).train()
    opt = CaffeSGD(caffe_param_groups(model, 1e-4, 5e-4), momentum=0.9)
    h = shrunk_size(321)
    x = torch.randn(batch, 3, 321, 321, device=device) * 60
    y = torch.randint(0, 21, (batch, h, h), device=device)
    keys = [(0, 0, i) for i in range(batch)]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with dropout_keys(model, keys), autocast(device, precision):
            out = model(x)
        segmentation_loss(out.float(), y).backward()
        opt.step()

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def bench_test(device: str, precision: str, batch: int, images: int) -> float:
    """Images per second of batched inference at 513 (500 x 375 images)."""
    torch.manual_seed(0)
    model = build_model(MODEL, 21).to(device).eval()
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(batch)]
    predict_batch(model, ims[:1], size=513, device=device, batch_size=1, precision=precision)
    _sync(device)
    done, t0 = 0, time.perf_counter()
    while done < images:
        predict_batch(model, ims, size=513, device=device, batch_size=batch, precision=precision)
        done += len(ims)
    _sync(device)
    return done / (time.perf_counter() - t0)


def crf_inputs(count: int, size: tuple[int, int] = (375, 500)) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` random RGB images of ``size`` (H, W) with smooth 21-label probabilities (a DCNN's
    stride-8 scores bilinearly upsampled)."""
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        logits = torch.randn(1, 21, -(-size[0] // 8), -(-size[1] // 8), generator=gen)
        probs = torch.softmax(F.interpolate(logits, size=size, mode="bilinear", align_corners=True)[0], 0)
        out.append((rng.integers(0, 256, (*size, 3), dtype=np.uint8), probs.numpy()))
    return out


CRF_PARAMS = dict(w1=4, sigma_alpha=49, sigma_beta=5, w2=3, sigma_gamma=3, iterations=10)


def bench_crf(images: int, backend: str = "torch", device: str = "cpu", batch: int = 1,
              size: tuple[int, int] = (375, 500)) -> float:
    """Milliseconds per image of ``size`` (H, W; 10 iterations): ``backend`` torch in batches of
    ``batch`` images (``dense_crf_torch_batch``, labels only, as the crf stage runs them), or pydensecrf."""
    from crf import CRFParams, dense_crf

    params = CRFParams(**CRF_PARAMS)
    inputs = crf_inputs(max(1, batch), size)
    if backend == "torch":
        from crf.torch_backend import dense_crf_torch_batch

        def run() -> None:
            dense_crf_torch_batch([i for i, _ in inputs], [p for _, p in inputs], params, device=device,
                                  labels_only=True)
    else:
        def run() -> None:
            for image, probs in inputs:
                dense_crf(image, probs, params, backend="pydensecrf")
    run()
    _sync(device)
    calls = max(1, -(-images // len(inputs)))
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    _sync(device)
    return (time.perf_counter() - t0) / (calls * len(inputs)) * 1e3


def bench_search(device: str, configs: int, images: int, size: tuple[int, int] = (375, 500)) -> tuple[float, int]:
    """(configuration, image) pairs per second of ``crf.search.run_search`` (torch, in-process) on
    ``images`` synthetic search inputs of ``size`` (H, W; ``tools/bench_crf_search.py``'s images) and
    about ``configs`` configurations of the paper's grid, one round; returns (pairs/s, pairs)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_crf_search import NUM_CLASSES, pick_configs, synthetic

    from crf.input_files import write_search_input
    from crf.search import SearchConfig, run_search
    from deeplab_v1.data.degraded import degraded_probs

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k in range(images):
            image, label = synthetic(k, *size)
            files.append(Path(tmp) / f"synthetic_{k:03d}.npz")
            write_search_input(files[-1], image, degraded_probs(label, NUM_CLASSES).astype(np.float16), label)
        base = pick_configs(configs)
        cfg = SearchConfig(**{**base.__dict__, "workers": 1, "backend": "torch", "device": device})
        pairs = len(cfg.coarse_grid()) * len(files)
        t0 = time.perf_counter()
        run_search(files, Path(tmp) / "out", cfg, progress=False)
        return pairs / (time.perf_counter() - t0), pairs


def network_rows(device: str, batch: int, quick: bool, f321: float, f513: float) -> list[tuple[str, ...]]:
    """The train 321 / test 513 rows of ``device`` (fp32; and bf16 on CUDA)."""
    rows: list[tuple[str, ...]] = []
    steps = (2 if quick else 5) if device == "cpu" else (10 if quick else 50)
    for precision in ["fp32"] if device == "cpu" else ["fp32", "bf16"]:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak = matmul_rate(device, dtype, quick)
        train_rate = bench_train(device, precision, batch, steps)
        test_rate = bench_test(device, precision, batch, batch * steps)
        for what, rate, flops in (("train 321", train_rate, 3 * f321), ("test 513", test_rate, f513)):
            achieved = rate * flops
            rows.append((device, what, precision, f"{batch}", f"{rate:.2f} img/s",
                         f"{achieved / 1e12:.3f} / {peak / 1e12:.3f} TFLOP/s", f"{achieved / peak:.0%}"))
    return rows


def crf_rows(device: str, quick: bool) -> list[tuple[str, ...]]:
    """The CRF row (torch, ms/image) and the search row (pairs/s) of ``device``."""
    batch = 1 if device == "cpu" else 8
    ms = bench_crf((1 if quick else 4) * batch, "torch", device, batch)
    configs, images = (4, 2) if quick else (8, 4)
    if device != "cpu":
        configs, images = (24, 8) if quick else (48, 16)
    rate, pairs = bench_search(device, configs, images)
    return [(device, "crf 500x375", "fp32", f"{batch}", f"{ms:.0f} ms/image", "-", "torch, 10 iterations"),
            (device, "search", "fp32", "-", f"{rate:.2f} pairs/s", "-",
             f"{pairs} (configuration, image) pairs, torch in-process")]


def print_table(rows: list[tuple[str, ...]]) -> None:
    head = ("device", "row", "precision", "batch", "throughput", "achieved / limit", "of limit")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps (a few minutes on a 2-core CPU)")
    ap.add_argument("--crf", action="store_true", help="add the pydensecrf CRF row (the reference, CPU)")
    ap.add_argument("--no-crf", action="store_true", help="leave out the CRF (torch) and search rows")
    ap.add_argument("--batch", type=int, help="images per step (default: 2 on the CPU, 16 on CUDA)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args(argv)
    from crf.memory import reuse_freed_memory

    tuned = reuse_freed_memory()
    f513, f321 = forward_flops(513), forward_flops(321)
    rows: list[tuple[str, ...]] = []
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    names = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            for what in ("train 321", "test 513"):
                for precision in ("fp32", "bf16"):
                    rows.append(("cuda", what, precision, "-", "-", "-", "skipped: no CUDA device here"))
            if not args.no_crf:
                rows += [("cuda", what, "fp32", "-", "-", "-", "skipped: no CUDA device here")
                         for what in ("crf 500x375", "search")]
            continue
        names.append(f"{device}: {device_name(device)}")
        rows += network_rows(device, args.batch or (2 if device == "cpu" else 16), args.quick, f321, f513)
        if not args.no_crf:
            rows += crf_rows(device, args.quick)
    if args.crf:
        ms = bench_crf(1 if args.quick else 5, "pydensecrf")
        rows.append(("cpu", "crf 500x375", "fp32", "1", f"{ms:.0f} ms/image", "-", "(pydensecrf, 1 thread)"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print("Devices: " + "; ".join(names or ["-"]))
    print(f"LargeFOV forward: {f513 / 1e9:.0f} GFLOP at 513, {f321 / 1e9:.0f} GFLOP at 321 (train step counted 3x); "
          f"limit = measured matmul rate in the row's dtype; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"glibc reuses freed memory: {'yes' if tuned else 'no'}")
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
