"""How often successive halving picks the grid's best configuration on real VOC images, and which floor on
its first rung keeps it there (issues #14, #20).

It scores every configuration of the paper's coarse grid (96: w1 {5, 10} x sigma_alpha 50..100 x
sigma_beta 3..10) on every image ONCE, keeping one integer confusion matrix per (configuration, image)
(``crf.search.evaluate.evaluate_task``, on every core; ``--cache FILE`` keeps them for later calls).
Because the search's objective is the mIoU of the confusion matrices summed over the images, successive
halving for any image order and any subset is then replayed exactly from these matrices, with the search's
own order (``crf.search.evaluate.image_order``), schedule (``SearchConfig.halving_schedule``, floor
included) and cut (``crf.search.run.halving_cut``).

Two reports:

* per order (default): for each ``halving_seed`` the configuration picked on all the images, its mIoU, the
  gap to the grid's best in mIoU points and the share of the grid's CRF runs; seed 0 is also run through
  ``run_search(strategy="halving")`` itself as a check that the replay is the search's.
* ``--floors 1,4,8,10 --sizes 12,18,24,36 --trials 300``: for each subset size and first-rung floor
  (``SearchConfig.halving_floor``; 1 is no floor), ``--trials`` random subsets of the cached images, each
  in its own random order, replayed; per row how many trials picked the grid's best and how many missed it
  by more than 0.1 points, the mean, 95th percentile and largest gap, and the CRF runs as a share of the
  grid's.

Probabilities are DIAGNOSTIC (degraded ground truth, ``deeplab_v1.data.degraded``), not a network's.

    python tools/halving_study.py --voc-root /data/VOCdevkit/VOC2012 --images 20 --scale 0.5 --seeds 20
    python tools/halving_study.py --voc-root /data/VOCdevkit/VOC2012 --images 40 --scale 0.5 \\
        --cache halving40.npz --floors 1,2,4,6,8,10,12 --sizes 12,18,24,36 --trials 300
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


def voc_ids(voc_root: Path, n: int, offset: int) -> list[str]:
    """VOC 2012 val ids ``offset..offset+n`` (the order of ``val.txt``)."""
    return (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[offset:offset + n]


def make_files(folder: Path, voc_root: Path, ids: list[str], scale: float) -> list[str]:
    """One search input file per VOC id, resized by ``scale``, DIAGNOSTIC degraded-GT probabilities."""
    import cv2
    from PIL import Image

    from deeplab_v1.data.degraded import degraded_probs

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


def grid_confusions(files: list[str], cfg: SearchConfig, backend: str, workers: int) -> np.ndarray:
    """(K, N, C, C) int64: every configuration of ``cfg.coarse_grid()`` (in its order) on every file."""
    from tqdm import tqdm

    grid = [param_key(p) for p in cfg.coarse_grid()]
    groups = lattice_groups(cfg.coarse_grid())
    out = np.zeros((len(grid), len(files), NUM_CLASSES, NUM_CLASSES), np.int64)
    with make_executor(workers, backend, initializer=set_cache_budget, initargs=(1 << 30,)) as ex:
        futures = {(gi, j): ex.submit(evaluate_task, files[j], groups[gi], NUM_CLASSES, None, backend, "cpu")
                   for gi in range(len(groups)) for j in range(len(files))}
        for (gi, j), fut in tqdm(futures.items(), desc="grid x images", unit="task"):
            conf, _, _ = fut.result()
            for k, p in enumerate(groups[gi]):
                out[grid.index(param_key(p)), j] = conf[k]
    return out


def mious(conf: np.ndarray) -> np.ndarray:
    """(K,) mIoU of (K, C, C) confusion matrices, as ``crf.confusion.miou`` (classes with union > 0)."""
    c = conf.astype(np.float64)
    tp = np.diagonal(c, axis1=1, axis2=2)
    union = c.sum(1) + c.sum(2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    return np.nanmean(iou, axis=1)


def _rec(k: tuple, objective: float, images: int) -> dict:
    return {"objective": float(objective), "images": images,
            "params": {"w1": k[0], "sigma_alpha": k[1], "sigma_beta": k[2]}}


def replay(ids: list[str], grid: list[tuple], conf: np.ndarray, cfg: SearchConfig, seed: int) -> tuple[tuple, int]:
    """The configuration successive halving picks on the images ``ids`` (``conf``: (K, len(ids), C, C), the
    grid's matrices on them) with ``halving_seed=seed``, and its CRF runs, replayed as ``run_search``
    decides (prefix sums in ``image_order``, the schedule of ``cfg``, ``halving_cut``)."""
    order = image_order(ids, seed)
    schedule = cfg.halving_schedule(len(ids))
    prefix = np.cumsum(conf[:, order], axis=1)
    by_key = {k: SearchConfig().params(k[0], k[1], k[2]) for k in grid}
    alive = list(range(len(grid)))
    runs, done, recs = 0, 0, {}
    for images in schedule:
        runs += len(alive) * (images - done)
        done = images
        scores = mious(prefix[alive, images - 1])
        recs = {grid[i]: _rec(grid[i], s, images) for i, s in zip(alive, scores)}
        if images == len(ids):
            break
        kept = {param_key(p) for p in halving_cut([by_key[grid[i]] for i in alive],
                                                  lambda p: recs[param_key(p)], cfg.eta)}
        alive = [i for i in alive if grid[i] in kept]
    return min((grid[i] for i in alive), key=lambda k: rank_key(recs[k])), runs


def grid_best(grid: list[tuple], conf: np.ndarray) -> tuple[tuple, dict]:
    """The grid's best on all images of ``conf`` (``rank_key``) and every configuration's mIoU."""
    full = dict(zip(grid, mious(conf.sum(1))))
    n = conf.shape[1]
    return min(grid, key=lambda k: rank_key(_rec(k, full[k], n))), full


def floor_table(ids: list[str], grid: list[tuple], conf: np.ndarray, eta: int, floors: list[int],
                sizes: list[int], trials: int) -> list[dict]:
    """One row per (subset size, floor): ``trials`` random subsets of ``ids`` (the same subsets and orders
    for every floor), halving replayed on each; gaps in mIoU points against the grid's best of the subset."""
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        subsets = [sorted(rng.choice(len(ids), n, replace=False).tolist()) for _ in range(trials)]
        bests = [grid_best(grid, conf[:, s]) for s in subsets]
        for floor in floors:
            cfg = SearchConfig(strategy="halving", eta=eta, halving_floor=floor)
            gaps, runs = [], 0
            for t, s in enumerate(subsets):
                best, full = bests[t]
                pick, r = replay([ids[j] for j in s], grid, conf[:, s], cfg, seed=t)
                gaps.append(100 * (full[best] - full[pick]))
                runs += r
            g = np.array(gaps)
            rows.append({"images": n, "floor": floor, "rungs": cfg.halving_schedule(n),
                         "runs_pct": 100 * runs / (trials * len(grid) * n), "same": int(np.sum(g <= 0)),
                         "missed": int(np.sum(g > 0.1)), "mean_gap": float(g.mean()),
                         "p95_gap": float(np.percentile(g, 95)), "max_gap": float(g.max())})
    return rows


def print_floor_table(rows: list[dict], trials: int) -> None:
    print(f"| images | floor | rungs | CRF runs (% of grid) | picked the grid's best (of {trials}) "
          f"| missed by > 0.1 pt (of {trials}) | mean gap (pt) | p95 gap (pt) | max gap (pt) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['floor']} | {r['rungs']} | {r['runs_pct']:.0f} | {r['same']} | "
              f"{r['missed']} | {r['mean_gap']:.2f} | {r['p95_gap']:.2f} | {r['max_gap']:.2f} |")


def load_or_score(args, cfg: SearchConfig, tmp: Path) -> tuple[list[str], list[str], np.ndarray, float]:
    """(ids, files, (K, N, C, C) confusions, seconds): from ``--cache`` when it holds these images, else
    scored now (and saved to ``--cache``)."""
    ids = voc_ids(args.voc_root, args.images, args.offset)
    files = make_files(tmp, args.voc_root, ids, args.scale)
    grid = np.array([param_key(p) for p in cfg.coarse_grid()])
    meta = f"scale={args.scale} backend={args.backend}"
    if args.cache is not None and args.cache.is_file():
        with np.load(args.cache) as z:
            if list(z["ids"]) == ids and np.array_equal(z["grid"], grid) and str(z["meta"]) == meta:
                return ids, files, z["conf"], float(z["seconds"])
        print(f"{args.cache} holds other images, grid, scale or backend: scoring again")
    t0 = time.perf_counter()
    conf = grid_confusions(files, cfg, args.backend, args.workers)
    seconds = time.perf_counter() - t0
    if args.cache is not None:
        part = args.cache.with_name(args.cache.name + ".part.npz")
        np.savez_compressed(part, ids=np.array(ids), grid=grid, conf=conf, meta=meta, seconds=seconds)
        os.replace(part, args.cache)
    return ids, files, conf, seconds


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
    ap.add_argument("--floor", type=int, default=None, help="halving_floor of the per-order report "
                    "(default: SearchConfig's)")
    ap.add_argument("--cache", type=Path, help="an .npz keeping the per-(configuration, image) matrices")
    ap.add_argument("--floors", help="comma-separated first-rung floors to compare (the floor table)")
    ap.add_argument("--sizes", default="12,18,24,36", help="subset sizes of the floor table")
    ap.add_argument("--trials", type=int, default=300, help="random subsets (and orders) per floor table row")
    args = ap.parse_args()
    floor = {} if args.floor is None else {"halving_floor": args.floor}
    cfg = SearchConfig(rounds=0, eta=args.eta, min_images=args.min_images, strategy="halving", **floor)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="halving_study_") as tmp:
        ids, files, conf, grid_s = load_or_score(args, cfg, Path(tmp))
        grid = [param_key(p) for p in cfg.coarse_grid()]
        best, full = grid_best(grid, conf)
        assert abs(full[best] - miou(conf[grid.index(best)].sum(0))) < 1e-12
        head = (f"{len(grid)} configurations x {len(ids)} VOC val images (from #{args.offset}, scale {args.scale}), "
                f"DIAGNOSTIC degraded-GT probabilities, backend {args.backend}, eta {cfg.eta}; grid scored in "
                f"{grid_s:.0f} s; load average {load[0]:.2f}")
        if args.floors:
            floors = [int(x) for x in args.floors.split(",")]
            sizes = [int(x) for x in args.sizes.split(",")]
            if max(sizes) > len(ids):
                ap.error(f"--sizes up to {max(sizes)} need --images >= {max(sizes)}")
            print(f"# first-rung floors of successive halving vs the grid: {head}; {args.trials} random subsets "
                  f"and orders per row")
            print_floor_table(floor_table(ids, grid, conf, cfg.eta, floors, sizes, args.trials), args.trials)
            return 0
        print(f"# successive halving (rungs {cfg.halving_schedule(len(ids))}) vs the grid: {head}")
        print(f"grid best: w1 {best[0]:g}, sigma_alpha {best[1]:g}, sigma_beta {best[2]:g}: "
              f"mIoU {100 * full[best]:.2f} %; worst {100 * min(full.values()):.2f} %")
        print()
        print("| halving_seed | picked (w1, sigma_alpha, sigma_beta) | mIoU (%) | gap (points) | CRF runs (% of grid) |")
        print("|---:|---|---:|---:|---:|")
        same = within = 0
        picks = {}
        grid_runs = len(grid) * len(ids)
        for seed in range(args.seeds):
            pick, runs = replay(ids, grid, conf, cfg, seed)
            picks[seed] = pick
            gap = 100 * (full[best] - full[pick])
            same += pick == best
            within += gap <= 0.1
            print(f"| {seed} | ({pick[0]:g}, {pick[1]:g}, {pick[2]:g}) | {100 * full[pick]:.2f} | {gap:.2f} | "
                  f"{runs} ({100 * runs / grid_runs:.0f} %) |")
        print()
        print(f"halving picked the grid's best in {same} of {args.seeds} orders, a configuration within 0.1 mIoU "
              f"points in {within} of {args.seeds}")
        res = run_search(files, Path(tmp) / "check", SearchConfig(**{**cfg.__dict__, "backend": args.backend,
                                                                     "workers": args.workers}), progress=False)
        check = param_key(res.best) == picks[0]
        print(f"check: run_search(strategy='halving', halving_seed=0) picked ({res.best.w1:g}, "
              f"{res.best.sigma_alpha:g}, {res.best.sigma_beta:g}) with {res.crf_runs_total} CRF runs: "
              f"{'the same as the replay' if check else 'NOT THE REPLAY (a bug)'}")
        return 0 if check else 1


if __name__ == "__main__":
    sys.exit(main())
