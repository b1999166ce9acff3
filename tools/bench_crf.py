"""Benchmark the dense CRF backends: pydensecrf vs the PyTorch permutohedral backend.

Measures, for 500x375 images with 21 labels and 10 mean-field iterations:

* single-image inference: ms per image for pydensecrf (C++, one thread), torch on CPU and torch on
  CUDA (the CUDA row is skipped with a note when ``torch.cuda.is_available()`` is False);
* a cross-validation grid (DeepLab v1 Sec. 5: w1 in 5..10, sigma_alpha in 50:10:100, sigma_beta in
  3:1:10, i.e. 6 x 48 = 288 configurations): configurations x images per second for pydensecrf
  (one process, every configuration from scratch) and for torch (lattices shared per
  (sigma_alpha, sigma_beta), the 6 w1 values run as channels). A subset of the (sigma_alpha,
  sigma_beta) pairs is run and the full grid's time is extrapolated.

Every row runs in a fresh subprocess so that its peak memory is its own (CPU: peak resident set
size; CUDA: ``torch.cuda.max_memory_allocated``). Images come from a VOC folder when ``--voc`` is
given (cropped/padded to 375x500), else they are synthetic (smooth colour regions). Usage:

    python tools/bench_crf.py [--voc VOC2012_DIR] [--images 2] [--pairs 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HEIGHT, WIDTH, LABELS, ITERATIONS = 375, 500, 21, 10
W1_VALUES = (5, 6, 7, 8, 9, 10)
PAIRS = [(sa, sb) for sa in range(50, 101, 10) for sb in range(3, 11)]  # 48 (sigma_alpha, sigma_beta)


def make_inputs(count: int, voc: str | None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (RGB uint8 (375, 500, 3), float32 probabilities (21, 375, 500)) pairs.

    The probabilities are smooth and coarse like upsampled fc8 softmax outputs (random logits on a
    stride-8 grid, bilinearly upsampled, softmax)."""
    import cv2

    rng = np.random.default_rng(seed)
    images = []
    if voc:
        names = (Path(voc) / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]
        for name in names:
            bgr = cv2.imread(str(Path(voc) / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR)
            if bgr is None:
                raise FileNotFoundError(f"cannot read image {name}.jpg under {voc}")
            rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            h, w = min(HEIGHT, bgr.shape[0]), min(WIDTH, bgr.shape[1])
            rgb[:h, :w] = bgr[:h, :w, ::-1]
            images.append(rgb)
    while len(images) < count:
        coarse = rng.integers(0, 256, size=(HEIGHT // 25, WIDTH // 25, 3)).astype(np.uint8)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST)
        noise = rng.normal(0, 6, image.shape)
        images.append(np.clip(image + noise, 0, 255).astype(np.uint8))
    out = []
    for image in images:
        logits = rng.normal(0, 3, size=(HEIGHT // 8 + 1, WIDTH // 8 + 1, LABELS)).astype(np.float32)
        up = cv2.resize(logits, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
        up = np.exp(up - up.max(axis=2, keepdims=True))
        probs = (up / up.sum(axis=2, keepdims=True)).transpose(2, 0, 1)
        out.append((np.ascontiguousarray(image), np.ascontiguousarray(probs, dtype=np.float32)))
    return out


def _pydensecrf(image: np.ndarray, probs: np.ndarray, params) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=params.sigma_gamma, compat=params.w2)
    crf.addPairwiseBilateral(sxy=params.sigma_alpha, srgb=params.sigma_beta, rgbim=image, compat=params.w1)
    return np.asarray(crf.inference(params.iterations), np.float32).reshape(probs.shape)


def _worker(task: dict, queue: mp.Queue) -> None:
    """Runs one benchmark row in this (fresh) process; puts (seconds, units, peak MB) or an error."""
    try:
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from crf.params import CRFParams
        from crf.torch_backend import dense_crf_torch, dense_crf_torch_grid

        torch.set_num_threads(task["threads"])
        inputs = make_inputs(task["images"], task["voc"])
        single = CRFParams(w1=5, sigma_alpha=50, sigma_beta=5, iterations=ITERATIONS)
        grid = [
            CRFParams(w1=w1, sigma_alpha=sa, sigma_beta=sb, iterations=ITERATIONS)
            for sa, sb in PAIRS[: task["pairs"]]
            for w1 in W1_VALUES
        ]
        device = task["device"]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kind = (task["backend"], task["mode"])
        # Warm-up on a small crop (allocators, lazy initialisation), not counted.
        image0, probs0 = inputs[0]
        if task["backend"] == "torch":
            dense_crf_torch(image0[:64, :64].copy(), probs0[:, :64, :64].copy() / probs0[:, :64, :64].sum(0), single, device)
        start = time.perf_counter()
        units = 0
        for image, probs in inputs:
            if kind == ("pydensecrf", "single"):
                _pydensecrf(image, probs, single)
                units += 1
            elif kind == ("pydensecrf", "grid"):
                for params in grid:
                    _pydensecrf(image, probs, params)
                units += len(grid)
            elif kind == ("torch", "single"):
                dense_crf_torch(image, probs, single, device)
                units += 1
            else:
                dense_crf_torch_grid(image, probs, grid, device)
                units += len(grid)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        queue.put((seconds, units, peak))
    except Exception as error:  # reported in the table instead of crashing the benchmark
        queue.put(f"{type(error).__name__}: {error}")


def run_row(task: dict) -> tuple[float, int, float] | str:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(task, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", default=None, help="VOC2012 folder (JPEGImages, ImageSets); default synthetic images")
    parser.add_argument("--images", type=int, default=2, help="images per row (default 2)")
    parser.add_argument("--pairs", type=int, default=2, help="(sigma_alpha, sigma_beta) pairs of the 48 to run (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not 1 <= args.pairs <= len(PAIRS):
        parser.error(f"--pairs must be in [1, {len(PAIRS)}], got {args.pairs}")
    import torch

    base = {"images": args.images, "voc": args.voc, "pairs": args.pairs, "threads": args.threads}
    rows = [
        ("single", "pydensecrf", "cpu (1 thread)"),
        ("single", "torch", "cpu"),
        ("single", "torch", "cuda"),
        ("grid", "pydensecrf", "cpu (1 process)"),
        ("grid", "torch", "cpu"),
        ("grid", "torch", "cuda"),
    ]
    grid_size = len(W1_VALUES) * args.pairs
    print(f"# dense CRF benchmark: {args.images} image(s) {WIDTH}x{HEIGHT}, {LABELS} labels, {ITERATIONS} iterations; "
          f"grid subset {grid_size} of {len(W1_VALUES) * len(PAIRS)} configurations; torch threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':<6} {'backend':<11} {'device':<16} {'ms/unit':>10} {'units/s':>9} {'peak MB':>9} {'vs pydensecrf':>14}")
    reference: dict[str, float] = {}
    notes = []
    for mode, backend, device_label in rows:
        device = "cuda" if device_label == "cuda" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            print(f"{mode:<6} {backend:<11} {device_label:<16} {'skipped: torch.cuda.is_available() is False':>44}")
            continue
        result = run_row({**base, "mode": mode, "backend": backend, "device": device})
        if isinstance(result, str):
            print(f"{mode:<6} {backend:<11} {device_label:<16} failed: {result}")
            continue
        seconds, units, peak = result
        rate = units / seconds
        if backend == "pydensecrf":
            reference[mode] = rate
        ratio = f"{rate / reference[mode]:.2f}x" if mode in reference else "-"
        print(f"{mode:<6} {backend:<11} {device_label:<16} {1e3 * seconds / units:>10.1f} {rate:>9.2f} {peak:>9.0f} {ratio:>14}")
        if mode == "grid":
            full = len(W1_VALUES) * len(PAIRS) * args.images / rate
            notes.append(f"{backend} {device_label}: full 288-configuration grid on {args.images} image(s) "
                         f"~ {full:.0f} s (extrapolated)")
    print("# unit = one image (single) or one configuration x image (grid); peak MB = process peak RSS "
          "(CPU) or torch.cuda.max_memory_allocated (CUDA)")
    for note in notes:
        print("# " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
