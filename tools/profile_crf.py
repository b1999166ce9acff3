"""Where the torch CRF backend spends its time: one table per case, one row per step (issue #14).

For one VOC-sized image (a real VOC val image with ``--voc-root``, DIAGNOSTIC degraded-ground-truth
probabilities; otherwise a synthetic 500 x 375 image) it runs ``crf.torch_backend`` under
``crf.torch_backend.profile_steps`` and prints the seconds of each step -- softmax, lattice (features,
build, normalisation), splat, blur, slice, compatibility (Potts weights, unary), the rest (everything
else: allocation, copies, argmax, Python) -- for

- one configuration (the crf stage's unit of work), and
- one grid group: the configurations of the paper's grid sharing one bilateral lattice (w1 in {5, 10} at
  sigma_alpha 50, sigma_beta 3: the search's unit of work),

next to pydensecrf's time for the same configurations (single-threaded, the reference). The first call is
a warm-up (the Gaussian lattice cache, the allocator) and is not counted.

    python tools/profile_crf.py --voc-root /data/VOCdevkit/VOC2012 --threads 1
    python tools/profile_crf.py --scale 0.25        # a quarter-size image: where per-call overhead shows
    python tools/profile_crf.py --dropin 5,50,3     # the pydensecrf drop-in (crf.densecrf) by phase

``--dropin w1,sigma_alpha,sigma_beta`` profiles instead the pydensecrf-style script of
``tools/bench_crf_dropin.py`` (Gaussian sxy 3 / compat 3, bilateral of those parameters, 10 iterations)
run with ``crf.densecrf``: CPU milliseconds (this process, one thread by default) of each phase --
``setUnaryEnergy``, the ``add*`` calls, the lattices and their normalisation, the inference by step --
next to pydensecrf's fixed cost (``inference(0)``: its lattices) and its whole script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf import CRFParams  # noqa: E402
from crf.dense import dense_crf_pydensecrf  # noqa: E402
from crf.inputs import check_inputs  # noqa: E402


def load_image(voc_root: Path | None, index: int, scale: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(image (H, W, 3) uint8, probs (21, H, W) float32, a name): a VOC val image with degraded-GT
    probabilities, or synthetic (see tools/bench_crf_search.py)."""
    import cv2

    from deeplab_v1.data.degraded import degraded_probs

    if voc_root is not None:
        from PIL import Image

        name = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[index]
        image = np.array(Image.open(voc_root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        label = np.array(Image.open(voc_root / "SegmentationClass" / f"{name}.png"))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_crf_search import synthetic

        image, label = synthetic(index)
        name = f"synthetic {index}"
    if scale != 1.0:
        size = (max(8, round(image.shape[1] * scale)), max(8, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    probs = degraded_probs(label, 21, stride=8, blur_sigma=4.0, temperature=3.0).astype(np.float32)
    image, probs = check_inputs(image, probs)
    return image, probs, name


def profile(image: np.ndarray, probs: np.ndarray, configs: list[CRFParams], repeats: int) -> tuple[dict, float]:
    """Seconds per step and the wall time of one call of ``dense_crf_torch_grid`` (mean over ``repeats``)."""
    from crf.torch_backend import dense_crf_torch_grid, profile_steps

    dense_crf_torch_grid(image, probs, configs, labels_only=True)  # warm-up
    with profile_steps() as times:
        t0 = time.perf_counter()
        for _ in range(repeats):
            dense_crf_torch_grid(image, probs, configs, labels_only=True)
        wall = (time.perf_counter() - t0) / repeats
    steps = {k: v / repeats for k, v in times.seconds.items()}
    steps["rest"] = max(0.0, wall - sum(steps.values()))
    return steps, wall


def table(title: str, steps: dict, wall: float, k: int, pyd: float) -> str:
    lines = [f"\n{title}", f"| step | ms per call | ms per configuration | share |", "|---|---:|---:|---:|"]
    for name, sec in steps.items():
        lines.append(f"| {name} | {1e3 * sec:.1f} | {1e3 * sec / k:.1f} | {100 * sec / wall:.0f} % |")
    lines.append(f"| **total (torch)** | {1e3 * wall:.1f} | {1e3 * wall / k:.1f} | 100 % |")
    lines.append(f"| pydensecrf (1 thread) | {1e3 * pyd:.1f} | {1e3 * pyd / k:.1f} | torch is {pyd / wall:.2f}x |")
    return "\n".join(lines)


def dropin_phases(module, image: np.ndarray, probs: np.ndarray, params: tuple, iterations: int) -> dict:
    """CPU seconds of each phase of the drop-in script with ``module`` (``crf.densecrf`` or pydensecrf's)."""
    from crf.utils import unary_from_softmax

    w1, sigma_alpha, sigma_beta = params
    c, h, w = probs.shape
    phases, t0 = {}, time.process_time()

    def mark(name: str) -> None:
        nonlocal t0
        phases[name] = time.process_time() - t0
        t0 = time.process_time()

    d = module.DenseCRF2D(w, h, c)
    unary = unary_from_softmax(probs)
    mark("unary_from_softmax")
    d.setUnaryEnergy(unary)
    mark("setUnaryEnergy")
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=sigma_alpha, srgb=sigma_beta, rgbim=image, compat=w1)
    mark("addPairwise*")
    if hasattr(d, "_ready"):
        d._ready()
        mark("lattices + normalisation")
    d.inference(iterations)
    mark(f"inference({iterations})")
    return phases


def profile_dropin(image: np.ndarray, probs: np.ndarray, params: tuple, repeats: int) -> str:
    """The drop-in's phases (best of ``repeats``, CPU ms), its inference by step, and pydensecrf's."""
    import pydensecrf.densecrf as pyd

    import crf.densecrf as dcrf
    from crf.step_times import profile_steps

    dropin_phases(dcrf, image, probs, params, 10)  # warm-up (the Gaussian lattice cache, the allocator)
    runs = []
    for _ in range(repeats):
        with profile_steps() as steps:
            runs.append(dropin_phases(dcrf, image, probs, params, 10))
    best = min(runs, key=lambda r: sum(r.values()))
    pyd_fixed = min(sum(dropin_phases(pyd, image, probs, params, 0).values()) for _ in range(repeats))
    pyd_total = min(sum(dropin_phases(pyd, image, probs, params, 10).values()) for _ in range(repeats))
    lines = [f"\ndrop-in, w1/sigma_alpha/sigma_beta {params}: CPU ms per phase (best of {repeats})",
             "| phase | ms |", "|---|---:|"]
    lines += [f"| {k} | {1e3 * v:.1f} |" for k, v in best.items()]
    lines.append(f"| **total** | {1e3 * sum(best.values()):.1f} |")
    lines.append(f"| of the inference, by step (wall, last run): {', '.join(f'{k} {1e3 * v:.0f}' for k, v in steps.seconds.items() if v)} | |")
    lines.append(f"| pydensecrf: inference(0) (its lattices) {1e3 * pyd_fixed:.1f}, whole script {1e3 * pyd_total:.1f} | "
                 f"drop-in {pyd_total / sum(best.values()):.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voc-root", type=Path, help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
    ap.add_argument("--index", type=int, default=0, help="which val image (or synthetic seed)")
    ap.add_argument("--scale", type=float, default=1.0, help="resize the image by this factor")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the search's workers)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropin", help="w1,sigma_alpha,sigma_beta: profile the pydensecrf drop-in instead")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from crf.memory import reuse_freed_memory

    reuse_freed_memory()  # an entry point's choice, as in a deeplab run (crf.memory)
    image, probs, name = load_image(args.voc_root, args.index, args.scale)
    load = os.getloadavg()
    print(f"image: {name}, {image.shape[1]} x {image.shape[0]}, 21 labels; torch {torch.__version__}, "
          f"{args.threads} thread(s); {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.dropin:
        print(profile_dropin(image, probs, tuple(float(v) for v in args.dropin.split(",")), args.repeats))
        return 0
    cases = [("one configuration (w1 5, sigma_alpha 50, sigma_beta 3)", [CRFParams(5, 50, 3)]),
             ("one grid group (w1 in {5, 10}, sigma_alpha 50, sigma_beta 3)", [CRFParams(5, 50, 3), CRFParams(10, 50, 3)])]
    for title, configs in cases:
        steps, wall = profile(image, probs, configs, args.repeats)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            for p in configs:
                dense_crf_pydensecrf(image, probs, p)
        pyd = (time.perf_counter() - t0) / args.repeats
        print(table(title, steps, wall, len(configs), pyd))
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
