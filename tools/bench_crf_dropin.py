"""Benchmark the pydensecrf drop-in (``crf.densecrf``) against pydensecrf itself, per image (issue #23).

The same pydensecrf-style script (``DenseCRF2D``, ``unary_from_softmax``, ``addPairwiseGaussian(sxy=3,
compat=3)``, ``addPairwiseBilateral``, ``inference(10)``, argmax) runs with either module, on VOC val
images (375x500, cropped/padded as ``tools/bench_crf.py`` does; DIAGNOSTIC probabilities from the ground
truth, ``deeplab_v1.data.degraded``), for three parameter regimes (w1 / sigma_alpha / sigma_beta):
DeepLab's search corner 5/50/3, the release's LargeFOV 4/121/5 and the weakly supervised pipelines'
10/80/13. Rows:

* one core: one process, one thread (``torch.set_num_threads(1)``), ms per image (the construction of
  the CRF and its lattices included, as a script pays them);
* every core: ``--processes`` worker processes (default: all cores), one thread each, images per second
  over ``--repeat`` passes of the images (pool start-up and input loading not timed);
* CUDA (``device="cuda"``) where ``torch.cuda.is_available()``: ms per image after one warm-up.

Labels: the fraction of pixels where the drop-in's labels equal pydensecrf's. The load average is
printed beside the numbers: on a shared machine they vary with it. Usage:

    python tools/bench_crf_dropin.py --voc VOC2012_DIR [--images 2] [--repeat 2] [--processes N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_crf import make_inputs  # noqa: E402

REGIMES = {"5/50/3": (5.0, 50.0, 3.0), "4/121/5": (4.0, 121.0, 5.0), "10/80/13": (10.0, 80.0, 13.0)}
ITERATIONS = 10


def run_script(module: str, image: np.ndarray, probs: np.ndarray, regime: str, device: str = "cpu") -> np.ndarray:
    """The pydensecrf-style script with ``module`` ("pydensecrf" or "crf"): labels (H, W)."""
    if module == "pydensecrf":
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
        kwargs = {}
    else:
        import crf.densecrf as dcrf
        from crf.utils import unary_from_softmax
        kwargs = {"device": device}
    w1, sigma_alpha, sigma_beta = REGIMES[regime]
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c, **kwargs)
    d.setUnaryEnergy(unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=sigma_alpha, srgb=sigma_beta, rgbim=image, compat=w1)
    return np.argmax(d.inference(ITERATIONS), axis=0).reshape(h, w)


_INPUTS: list = []


def _init(images: int, voc: str) -> None:
    import torch

    torch.set_num_threads(1)
    _INPUTS.extend(make_inputs(images, voc))


def _task(module: str, index: int, regime: str) -> None:
    image, probs = _INPUTS[index]
    run_script(module, image, probs, regime)


def every_core(module: str, regime: str, args) -> float:
    """Images per second of ``args.processes`` single-threaded processes."""
    with mp.get_context("spawn").Pool(args.processes, initializer=_init, initargs=(args.images, args.voc)) as pool:
        pool.starmap(_task, [(module, i % args.images, regime) for i in range(args.processes)])  # warm-up
        jobs = [(module, i % args.images, regime) for i in range(args.images * args.repeat)]
        t0 = time.perf_counter()
        pool.starmap(_task, jobs, chunksize=1)
        return len(jobs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", required=True, help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="passes over the images of the every-core rows")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"a subset of {list(REGIMES)}")
    args = ap.parse_args(argv)
    import torch

    _init(args.images, args.voc)
    regimes = args.regimes.split(",")
    print(f"# crf.densecrf vs pydensecrf: {args.images} VOC val image(s) 375x500, 21 labels, {ITERATIONS} "
          f"iterations; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'regime':<9} {'pydensecrf ms':>13} {'drop-in ms':>10} {'1 core':>7} {'labels':>8} | "
          f"{'pyd img/s':>9} {'drop img/s':>10} {'all cores':>9} | {'cuda ms':>8} {'vs pyd':>7}")
    for regime in regimes:
        times = {"pydensecrf": [], "crf": []}
        same = []
        for image, probs in _INPUTS:
            run_script("crf", image, probs, regime)  # warm-up: the first call builds thread pools
            labels = {}
            for module in ("pydensecrf", "crf"):
                t0 = time.perf_counter()
                labels[module] = run_script(module, image, probs, regime)
                times[module].append(time.perf_counter() - t0)
            same.append((labels["pydensecrf"] == labels["crf"]).mean())
        ref, ours = 1e3 * np.mean(times["pydensecrf"]), 1e3 * np.mean(times["crf"])
        rate_ref, rate_ours = every_core("pydensecrf", regime, args), every_core("crf", regime, args)
        cuda = "skipped"
        ratio = "-"
        if torch.cuda.is_available():
            image, probs = _INPUTS[0]
            run_script("crf", image, probs, regime, "cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for image, probs in _INPUTS:
                run_script("crf", image, probs, regime, "cuda")
            torch.cuda.synchronize()
            ms = 1e3 * (time.perf_counter() - t0) / len(_INPUTS)
            cuda, ratio = f"{ms:.1f}", f"{ref / ms:.1f}x"
        print(f"{regime:<9} {ref:>13.0f} {ours:>10.0f} {ref / ours:>6.2f}x {100 * min(same):>7.3f}% | "
              f"{rate_ref:>9.2f} {rate_ours:>10.2f} {rate_ours / rate_ref:>8.2f}x | {cuda:>8} {ratio:>7}")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end; 'labels' = the lowest fraction of equal pixels; "
          f"'all cores' = {args.processes} processes x 1 thread, images per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
