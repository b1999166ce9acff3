"""Benchmark the trainable CRF layer (``crf.DenseCRFLayer``) against the post-hoc CRF (torch backend).

For a 321x321 crop (DeepLab's training crop) and a 500x375 image (a VOC-sized image), C = 21 labels,
5 and 10 mean-field iterations, one image per call, it measures:

* ``post-hoc``: ``crf.torch_backend.dense_crf_torch`` (marginals; lattices built inside, no gradient);
* ``layer fwd``: ``DenseCRFLayer.forward`` with gradients enabled (lattices built inside), as in training;
* ``layer fwd+bwd``: the same forward, a cross-entropy loss and ``backward`` to the scores and to every
  learnable parameter (w1, w2, the 21 x 21 compatibility).

Every row runs in a fresh process so that its peak memory is its own: on CPU the peak resident set
size (``ru_maxrss``) minus the resident size just before the first measured call (inputs already made);
on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before. Times are the median of
``--repeats`` calls after one warm-up call, wall clock and the process's CPU time (all threads;
less sensitive than the wall clock to other load on a shared machine). Images come from VOC val with ``--voc`` (cropped/padded,
DIAGNOSTIC probabilities from the degraded ground truth, ``deeplab_v1.data.degraded``), otherwise
synthetic (smooth colour regions, stride-8 random logits). The load average is printed beside the table.

    python tools/bench_crf_layer.py [--voc VOC2012_DIR] [--device cpu|cuda] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = 21
SIZES = {"321x321 crop": (321, 321), "500x375 image": (375, 500)}
ITERATIONS = (5, 10)
ROWS = ("post-hoc", "layer fwd", "layer fwd+bwd")


def make_input(height: int, width: int, voc: str | None, seed: int = 0):
    """(RGB uint8 (H, W, 3), float32 probabilities (21, H, W), labels int64 (H, W), 255 void)."""
    import cv2

    from crf.dense import scores_to_probs

    if voc:
        from PIL import Image

        from deeplab_v1.data.degraded import degraded_probs

        name = (Path(voc) / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
        rgb_full = np.array(Image.open(Path(voc) / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        label_full = np.asarray(Image.open(Path(voc) / "SegmentationClass" / f"{name}.png"))
        rgb = np.zeros((height, width, 3), np.uint8)
        label = np.full((height, width), 255, np.uint8)
        h, w = min(height, rgb_full.shape[0]), min(width, rgb_full.shape[1])
        rgb[:h, :w], label[:h, :w] = rgb_full[:h, :w], label_full[:h, :w]
        return rgb, degraded_probs(label, LABELS), label.astype(np.int64)
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_NEAREST)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    logits = rng.normal(0, 3, size=(height // 8 + 1, width // 8 + 1, LABELS)).astype(np.float32)
    up = cv2.resize(logits, (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    return np.ascontiguousarray(image), scores_to_probs(up), up.argmax(0).astype(np.int64)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(row: str, height: int, width: int, iterations: int, voc: str | None, device: str,
            repeats: int, threads: int | None) -> dict:
    """One row in this (fresh) process: median ms and peak MiB."""
    import torch
    import torch.nn.functional as F

    from crf import RELEASE_LARGEFOV, CRFParams
    from crf.layer import DenseCRFLayer
    from crf.torch_backend import dense_crf_torch

    if threads:
        torch.set_num_threads(threads)
    params = CRFParams.from_dict({**RELEASE_LARGEFOV.to_dict(), "iterations": iterations})
    rgb, probs, label = make_input(height, width, voc)
    dev = torch.device(device)
    layer = DenseCRFLayer(LABELS, params).to(dev)
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(dev)
    scores = torch.from_numpy(np.log(np.maximum(probs, 1e-8)))[None].to(dev)
    target = torch.from_numpy(label)[None].to(dev)

    def call():
        if row == "post-hoc":
            return dense_crf_torch(rgb, probs, params, device=dev)
        s = scores.clone().requires_grad_(row == "layer fwd+bwd")
        out = layer(images, s)
        if row == "layer fwd+bwd":
            F.cross_entropy(out, target, ignore_index=255).backward()
            layer.zero_grad(set_to_none=True)
        return out

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_mb()
    times, cpu = [], []
    for _ in range(repeats + 1):  # the first call is the warm-up (and sets the peak)
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"ms": 1000 * statistics.median(times[1:]), "cpu_s": statistics.median(cpu[1:]),
            "first_ms": 1000 * times[0], "peak_mb": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc", help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--iterations", type=int, nargs="+", default=list(ITERATIONS))
    args = parser.parse_args(argv)
    import torch

    load0 = os.getloadavg()
    threads = args.threads or torch.get_num_threads()
    print(f"# DenseCRFLayer vs post-hoc CRF (torch backend), C = {LABELS}, RELEASE_LARGEFOV widths, "
          f"device {args.device}, {threads} threads, {os.cpu_count()} cores, "
          f"inputs {'VOC val' if args.voc else 'synthetic'}, median of {args.repeats} after a warm-up; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start")
    print(f"| size | iterations | {' | '.join(f'{r} ms (CPU s)' for r in ROWS)} | "
          f"{' | '.join(f'{r} peak MiB' for r in ROWS)} | fwd+bwd / post-hoc (CPU) |")
    print("|---" * (3 + 2 * len(ROWS)) + "|")
    ctx = mp.get_context("spawn")
    for size, (h, w) in SIZES.items():
        for iterations in args.iterations:
            results = {}
            for row in ROWS:
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                    results[row] = pool.submit(measure, row, h, w, iterations, args.voc, args.device,
                                               args.repeats, args.threads).result()
            ms = " | ".join(f"{results[r]['ms']:.0f} ({results[r]['cpu_s']:.1f})" for r in ROWS)
            mb = " | ".join(f"{results[r]['peak_mb']:.0f}" for r in ROWS)
            ratio = results["layer fwd+bwd"]["cpu_s"] / results["post-hoc"]["cpu_s"]
            print(f"| {size} | {iterations} | {ms} | {mb} | {ratio:.1f}x |", flush=True)
    load1 = os.getloadavg()
    print(f"# load average {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at the end")


if __name__ == "__main__":
    main()
