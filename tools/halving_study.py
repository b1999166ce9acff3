"""How often successive halving picks the grid's best configuration, on real VOC images (issue #14).

It scores every configuration of the paper's coarse grid (96: w1 {5, 10} x sigma_alpha 50..100 x
sigma_beta 3..10) on every image ONCE, keeping one integer confusion matrix per (configuration, image)
(``crf.search.evaluate.evaluate_task``, on every core). Because the search's objective is the mIoU of the
confusion matrices summed over the images, successive halving for any image order is then replayed
exactly from these matrices: for each ``halving_seed`` the same order (``crf.search.evaluate.image_order``),
schedule (``SearchConfig.halving_schedule``) and cut (``crf.search.run.halving_cut``) as ``run_search``.
Seed 0 is also run through ``run_search(strategy="halving")`` itself as a check that the replay is the
search's. It prints, per seed, the configuration picked, its mIoU on all images, the gap to the grid's best
in mIoU points and the share of the grid's CRF runs used, then how often halving picked the grid's best
or a configuration within 0.1 points.

Probabilities are DIAGNOSTIC (degraded ground truth, ``deeplab_v1.data.degraded``), not a network's.

    python tools/halving_study.py --voc-root /data/VOCdevkit/VOC2012 --images 20 --scale 0.5 --seeds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf.confusion import miou  # noqa: E402
from crf.input_files import write_search_input  # noqa: E402
from crf.pool import make_executor  # noqa: E402
from crf.search import SearchConfig, run_search  # noqa: E402
from crf.search.run import halving_cut  # noqa: E402
from crf.search.config import param_key  # noqa: E402
from crf.search.evaluate import evaluate_task, image_order, lattice_groups, set_cache_budget  # noqa: E402
from crf.search.report import rank_key  # noqa: E402

NUM_CLASSES = 21


def make_files(folder: Path, voc_root: Path, n: int, offset: int, scale: float) -> list[str]:
    """``n`` search input files of VOC val images ``offset..offset+n`` resized by ``scale``."""
    import cv2
    from PIL import Image

    from deeplab_v1.data.degraded import degraded_probs

    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[offset:offset + n]
    files = []
    for i in ids:
        image = np.array(Image.open(voc_root / "JPEGImages" / f"{i}.jpg").convert("RGB"))
        label = np.array(Image.open(voc_root / "SegmentationClass" / f"{i}.png"))
        if scale != 1.0:
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        probs = degraded_probs(label, NUM_CLASSES, stride=16, blur_sigma=4.0, temperature=3.0)
        f = folder / f"{i}.npz"
        write_search_input(f, image, probs.astype(np.float16), label)
        files.append(str(f))
    return files


def per_image_confusions(files: list[str], cfg: SearchConfig, backend: str, workers: int) -> dict:
    """(configuration key, image index) -> (C, C) int64 confusion, every configuration on every image."""
    from tqdm import tqdm

    groups = lattice_groups(cfg.coarse_grid())
    out = {}
    with make_executor(workers, backend, initializer=set_cache_budget, initargs=(1 << 30,)) as ex:
        futures = {(gi, j): ex.submit(evaluate_task, files[j], groups[gi], NUM_CLASSES, None, backend, "cpu")
                   for gi in range(len(groups)) for j in range(len(files))}
        for (gi, j), fut in tqdm(futures.items(), desc="grid x images", unit="task"):
            conf, _, _ = fut.result()
            for k, p in enumerate(groups[gi]):
                out[param_key(p), j] = conf[k]
    return out


def replay_halving(files: list[str], cfg: SearchConfig, conf: dict, seed: int) -> tuple[tuple, int]:
    """The configuration successive halving picks with ``halving_seed=seed`` and its CRF runs, replayed
    from the per-image matrices exactly as ``run_search`` decides (prefix sums, ``rank_key`` cut)."""
    order = image_order(files, seed)
    schedule = SearchConfig(**{**cfg.__dict__, "strategy": "halving", "halving_seed": seed}).halving_schedule(len(files))
    by_key = {param_key(p): p for p in cfg.coarse_grid()}
    alive = list(by_key)
    runs, done = 0, 0
    recs = {}
    for images in schedule:
        runs += len(alive) * (images - done)
        done = images
        for k in alive:
            total = sum(conf[k, j] for j in order[:images])
            recs[k] = {"objective": float(miou(total)), "images": images,
                       "params": {"w1": k[0], "sigma_alpha": k[1], "sigma_beta": k[2]}}
        if images == len(files):
            break
        alive = [param_key(p) for p in halving_cut([by_key[k] for k in alive], lambda p: recs[param_key(p)], cfg.eta)]
    best = min(alive, key=lambda k: rank_key(recs[k]))
    return best, runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voc-root", type=Path, required=True)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0, help="first val image")
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--backend", default="torch", choices=["torch", "pydensecrf"])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--min-images", type=int, help="images of the first rung (default ceil(images / eta**2))")
    args = ap.parse_args()
    cfg = SearchConfig(rounds=0, eta=args.eta, min_images=args.min_images)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="halving_study_") as tmp:
        files = make_files(Path(tmp), args.voc_root, args.images, args.offset, args.scale)
        t0 = time.perf_counter()
        conf = per_image_confusions(files, cfg, args.backend, args.workers)
        grid_s = time.perf_counter() - t0
        keys = [param_key(p) for p in cfg.coarse_grid()]
        full = {k: float(miou(sum(conf[k, j] for j in range(len(files))))) for k in keys}
        grid_best = min(keys, key=lambda k: rank_key({"objective": full[k], "images": len(files),
                                                       "params": {"w1": k[0], "sigma_alpha": k[1], "sigma_beta": k[2]}}))
        grid_runs = len(keys) * len(files)
        print(f"# successive halving (eta {cfg.eta}, rungs {cfg.__class__(**{**cfg.__dict__, 'strategy': 'halving'}).halving_schedule(len(files))}) "
              f"vs the grid: {len(keys)} configurations x {len(files)} VOC val images "
              f"(from #{args.offset}, scale {args.scale}), DIAGNOSTIC degraded-GT probabilities, backend {args.backend}; "
              f"grid scored in {grid_s:.0f} s; load average {load[0]:.2f}")
        print(f"grid best: w1 {grid_best[0]:g}, sigma_alpha {grid_best[1]:g}, sigma_beta {grid_best[2]:g}: "
              f"mIoU {100 * full[grid_best]:.2f} %; worst {100 * min(full.values()):.2f} %")
        print()
        print("| halving_seed | picked (w1, sigma_alpha, sigma_beta) | mIoU (%) | gap (points) | CRF runs (% of grid) |")
        print("|---:|---|---:|---:|---:|")
        same = within = 0
        picks = {}
        for seed in range(args.seeds):
            best, runs = replay_halving(files, cfg, conf, seed)
            picks[seed] = best
            gap = 100 * (full[grid_best] - full[best])
            same += best == grid_best
            within += gap <= 0.1
            print(f"| {seed} | ({best[0]:g}, {best[1]:g}, {best[2]:g}) | {100 * full[best]:.2f} | {gap:.2f} | "
                  f"{runs} ({100 * runs / grid_runs:.0f} %) |")
        print()
        print(f"halving picked the grid's best in {same} of {args.seeds} orders, a configuration within 0.1 mIoU "
              f"points in {within} of {args.seeds}")
        res = run_search(files, Path(tmp) / "check", SearchConfig(rounds=0, strategy="halving", backend=args.backend,
                                                                    workers=args.workers, eta=args.eta,
                                                                    min_images=args.min_images), progress=False)
        check = param_key(res.best) == picks[0]
        print(f"check: run_search(strategy='halving', halving_seed=0) picked ({res.best.w1:g}, "
              f"{res.best.sigma_alpha:g}, {res.best.sigma_beta:g}) with {res.crf_runs_total} CRF runs: "
              f"{'the same as the replay' if check else 'NOT THE REPLAY (a bug)'}")
        return 0 if check else 1


if __name__ == "__main__":
    sys.exit(main())
