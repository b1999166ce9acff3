"""Benchmark the pydensecrf drop-in (``crf.densecrf``) against pydensecrf itself, per image (issue #23).

The same pydensecrf-style script (``DenseCRF2D``, ``unary_from_softmax``, ``addPairwiseGaussian(sxy=3,
compat=3)``, ``addPairwiseBilateral``, ``inference(10)``, argmax) runs with either module, on VOC val
images (375x500, cropped/padded as ``tools/bench_crf.py`` does; DIAGNOSTIC probabilities from the ground
truth, ``deeplab_v1.data.degraded``), for three parameter regimes (w1 / sigma_alpha / sigma_beta):
DeepLab's search corner 5/50/3, the release's LargeFOV 4/121/5 and the weakly supervised pipelines'
10/80/13. Tables:

* one core: one process, one thread (``torch.set_num_threads(1)``), ms per image (the construction of
  the CRF and its lattices included, as a script pays them), wall and CPU (user + system) time, the two
  modules alternating image by image; the ratio is pydensecrf's time over the drop-in's;
* every core: images per second over ``--repeat`` passes of the images (pool start-up and input loading
  not timed) of pydensecrf in one process (how pipelines call it), pydensecrf in ``--processes``
  single-threaded processes (default: all cores), the drop-in the same way, and the drop-in's batched
  call ``crf.densecrf.inference_batch(crfs, 10, workers=N)`` (CRFs built in the calling process), with
  the ratios of the drop-in's two rows to both pydensecrf rows;
* CUDA (``device="cuda"``) where ``torch.cuda.is_available()``: ms per image after one warm-up, and
  pydensecrf's one-core time over it.

Labels: the fraction of pixels where the drop-in's labels equal pydensecrf's. The load average is
printed beside the numbers: on a shared machine they vary with it. Usage:

    python tools/bench_crf_dropin.py --voc VOC2012_DIR [--images 2] [--repeat 2] [--processes N]
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


def every_core(module: str, regime: str, args, processes: int) -> float:
    """Images per second of ``processes`` single-threaded processes running the script image by image."""
    with mp.get_context("spawn").Pool(processes, initializer=_init, initargs=(args.images, args.voc)) as pool:
        pool.starmap(_task, [(module, i % args.images, regime) for i in range(processes)])  # warm-up
        jobs = [(module, i % args.images, regime) for i in range(args.images * args.repeat)]
        t0 = time.perf_counter()
        pool.starmap(_task, jobs, chunksize=1)
        return len(jobs) / (time.perf_counter() - t0)


def batched(regime: str, args) -> float:
    """Images per second of ``crf.densecrf.inference_batch(crfs, ITERATIONS, workers=args.processes)``
    over the same jobs, the CRFs built (and the labels taken) in this process."""
    import crf.densecrf as dcrf
    from crf.utils import unary_from_softmax

    w1, sigma_alpha, sigma_beta = REGIMES[regime]

    def build(index: int):
        image, probs = _INPUTS[index]
        c, h, w = probs.shape
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(unary_from_softmax(probs))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=sigma_alpha, srgb=sigma_beta, rgbim=image, compat=w1)
        return d

    dcrf.inference_batch([build(i % args.images) for i in range(args.processes)], ITERATIONS,
                         workers=args.processes)  # warm-up: starts the pool
    jobs = [i % args.images for i in range(args.images * args.repeat)]
    t0 = time.perf_counter()
    results = dcrf.inference_batch([build(i) for i in jobs], ITERATIONS, workers=args.processes)
    for q, i in zip(results, jobs):
        np.argmax(q, axis=0).reshape(_INPUTS[i][1].shape[1:])
    return len(jobs) / (time.perf_counter() - t0)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_core(regime: str) -> tuple[dict, dict, float]:
    """(wall ms, CPU ms) per module and the lowest fraction of equal labels, this process (one thread),
    the two modules alternating image by image."""
    wall = {"pydensecrf": [], "crf": []}
    cpu = {"pydensecrf": [], "crf": []}
    same = []
    for image, probs in _INPUTS:
        run_script("crf", image, probs, regime)  # warm-up: the first call builds thread pools
        labels = {}
        for module in ("pydensecrf", "crf"):
            c0, t0 = _cpu_seconds(), time.perf_counter()
            labels[module] = run_script(module, image, probs, regime)
            wall[module].append(time.perf_counter() - t0)
            cpu[module].append(_cpu_seconds() - c0)
        same.append((labels["pydensecrf"] == labels["crf"]).mean())
    return ({k: 1e3 * np.mean(v) for k, v in wall.items()}, {k: 1e3 * np.mean(v) for k, v in cpu.items()},
            float(min(same)))


def cuda_ms(regime: str) -> float:
    """ms per image of the drop-in on CUDA after one warm-up."""
    import torch

    image, probs = _INPUTS[0]
    run_script("crf", image, probs, regime, "cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for image, probs in _INPUTS:
        run_script("crf", image, probs, regime, "cuda")
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / len(_INPUTS)


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
    n = args.processes
    print(f"# crf.densecrf vs pydensecrf: {args.images} VOC val image(s) 375x500, 21 labels, {ITERATIONS} "
          f"iterations; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    rows = {}
    print("\n## one core: one process, one thread; ms per image, wall (CPU)")
    print(f"{'regime':<9} {'pydensecrf ms':>16} {'drop-in ms':>16} {'ratio':>14} {'labels':>8}")
    for regime in regimes:
        wall, cpu, same = one_core(regime)
        rows[regime] = wall["pydensecrf"]
        print(f"{regime:<9} {wall['pydensecrf']:>8.0f} ({cpu['pydensecrf']:>5.0f}) {wall['crf']:>8.0f} "
              f"({cpu['crf']:>5.0f}) {wall['pydensecrf'] / wall['crf']:>6.2f}x ({cpu['pydensecrf'] / cpu['crf']:.2f}x) "
              f"{100 * same:>7.3f}%")
    print(f"\n## every core: images per second; pydensecrf in 1 process and in {n}, the drop-in in {n} "
          f"processes and batched (inference_batch, workers={n}); ratios to pydensecrf in 1 | {n} processes")
    print(f"{'regime':<9} {'pyd 1':>6} {f'pyd {n}':>6} {f'drop {n}':>7} {'batch':>6} | "
          f"{f'drop {n} vs 1':>12} {'batch vs 1':>10} | {f'drop {n} vs {n}':>12} {f'batch vs {n}':>10}")
    for regime in regimes:
        one = 1e3 / rows[regime]
        rate_ref, rate_ours = every_core("pydensecrf", regime, args, n), every_core("crf", regime, args, n)
        rate_batch = batched(regime, args)
        print(f"{regime:<9} {one:>6.2f} {rate_ref:>6.2f} {rate_ours:>7.2f} {rate_batch:>6.2f} | "
              f"{rate_ours / one:>11.2f}x {rate_batch / one:>9.2f}x | {rate_ours / rate_ref:>11.2f}x "
              f"{rate_batch / rate_ref:>9.2f}x")
    print("\n## CUDA: ms per image (device='cuda'), pydensecrf's one-core time over it")
    for regime in regimes:
        if torch.cuda.is_available():
            ms = cuda_ms(regime)
            print(f"{regime:<9} {ms:>8.1f} {rows[regime] / ms:>7.1f}x")
        else:
            print(f"{regime:<9} skipped (torch.cuda.is_available() is False)")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end; 'labels' = the lowest fraction of equal pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
