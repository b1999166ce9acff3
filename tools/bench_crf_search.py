"""Benchmark the CRF parameter search (crf.search) over worker processes.

For 1, 2, 4, ... processes up to ``os.cpu_count()`` it runs the same small search (a few configurations of
the paper's grid x a few images, one round, no refinement) and prints throughput ((configuration, image)
pairs per second), the wall time per CRF (wall / pairs), the mean time of one CRF inside a worker, and the
speed-up over one process. It also checks that every process count gives identical confusion matrices.

Images: real PASCAL VOC 2012 val images with ``--voc-root`` (DIAGNOSTIC probabilities made from their ground
truth by ``deeplab_v1.data.degraded.degraded_probs``, the same kind of coarse scores a DCNN gives);
otherwise synthetic 500 x 375 images with 21 labels (smooth shapes, mild noise). Sizes are full
resolution: one CRF is the paper's unit of work (10 mean-field iterations, 21 labels).

    python tools/bench_crf_search.py                      # synthetic, 4 configurations x 4 images
    python tools/bench_crf_search.py --voc-root VOC2012 --images 8 --configs 6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf.input_files import write_search_input  # noqa: E402
from crf.search import SearchConfig, run_search  # noqa: E402
from deeplab_v1.data.degraded import degraded_probs  # noqa: E402

NUM_CLASSES = 21


def synthetic(seed: int, h: int = 375, w: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB image with a few filled shapes of random classes, and its label map (void outlines)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([60 + 80 * xx / w, 90 + 60 * yy / h, 120 + 0 * xx], -1)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(3, 7)):
        cls = int(rng.integers(1, NUM_CLASSES))
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(30, 120), rng.integers(30, 160)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = rng.integers(0, 256, 3)
        label[inside] = cls
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.5) + rng.normal(0, 6, image.shape)
    edges = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    label[edges] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_search_inputs(folder: Path, n: int, voc_root: Path | None) -> list[Path]:
    """``n`` search input files in ``folder``: VOC val images or synthetic ones, degraded-GT probabilities."""
    files = []
    if voc_root is not None:
        from PIL import Image

        ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:n]
        pairs = [(i, np.array(Image.open(voc_root / "JPEGImages" / f"{i}.jpg").convert("RGB")),
                  np.array(Image.open(voc_root / "SegmentationClass" / f"{i}.png"))) for i in ids]
    else:
        pairs = [(f"synthetic_{k:03d}", *synthetic(k)) for k in range(n)]
    for name, image, label in pairs:
        f = folder / f"{name}.npz"
        write_search_input(f, image, degraded_probs(label, NUM_CLASSES).astype(np.float16), label)
        files.append(f)
    return files


def pick_configs(n: int) -> SearchConfig:
    """About ``n`` configurations spread over the paper's coarse grid (w1 {5, 10}, sigma_alpha 50..100,
    sigma_beta 3..10): the grid's corners in w1 x sigma_alpha times ceil(n / 4) sigma_beta values."""
    if n <= 2:
        return SearchConfig(w1=[5.0, 10.0][:n], sigma_alpha=[50.0], sigma_beta=[5.0], rounds=0)
    sb = [float(v) for v in np.linspace(3, 10, math.ceil(n / 4)).round(1)]
    return SearchConfig(w1=[5.0, 10.0], sigma_alpha=[50.0, 100.0], sigma_beta=sb, rounds=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voc-root", type=Path, help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
    ap.add_argument("--images", type=int, default=4, help="images (default 4)")
    ap.add_argument("--configs", type=int, default=4, help="configurations (default 4; above 2 rounded up to a multiple of 4)")
    ap.add_argument("--max-procs", type=int, default=os.cpu_count() or 1, help="largest process count")
    ap.add_argument("--backend", default="pydensecrf", choices=["pydensecrf", "torch"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    base = pick_configs(args.configs)
    counts = sorted({p for p in (1, 2, 4, 8, 16, 32, 64) if p <= args.max_procs} | {args.max_procs})
    with tempfile.TemporaryDirectory(prefix="bench_crf_search_") as tmp:
        tmp = Path(tmp)
        files = make_search_inputs(tmp, args.images, args.voc_root)
        with np.load(files[0]) as z:
            h, w = z["image"].shape[:2]
        pairs = len(base.coarse_grid()) * len(files)
        source = f"VOC val ({args.voc_root})" if args.voc_root else "synthetic"
        print(f"# crf.search benchmark: {len(base.coarse_grid())} configurations x {len(files)} images = {pairs} CRFs, "
              f"{source}, first image {w}x{h}, {NUM_CLASSES} labels, {base.iterations} mean-field iterations, "
              f"backend {args.backend}, {os.cpu_count()} CPUs")
        print()
        print("| processes | pairs / s | wall ms per CRF | mean ms of one CRF in a worker | speed-up vs 1 |")
        print("|---:|---:|---:|---:|---:|")
        first, ref = None, None
        for p in counts:
            cfg = SearchConfig(**{**base.__dict__, "workers": p, "backend": args.backend, "device": args.device})
            out = tmp / f"run_{p}"
            t0 = time.perf_counter()
            run_search(files, out, cfg, progress=False)
            wall = time.perf_counter() - t0
            recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
            crf_s = sum(r["seconds"] for r in recs) / pairs
            conf = {json.dumps(r["params"], sort_keys=True): r["confusion"] for r in recs}
            if ref is None:
                ref = conf
            same = "" if conf == ref else "  (CONFUSION MATRICES DIFFER FROM 1 PROCESS)"
            first = first or wall
            print(f"| {p} | {pairs / wall:.2f} | {1000 * wall / pairs:.0f} | {1000 * crf_s:.0f} | "
                  f"{first / wall:.2f}{same} |", flush=True)
        print()
        print("wall time includes starting the worker processes (spawn) and loading the search input files once per "
              "worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
