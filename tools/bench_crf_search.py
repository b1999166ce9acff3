"""Benchmark the CRF parameter search (crf.search): every backend and layout in one run (issue #14).

It runs the same small search (a few configurations of the paper's grid x a few images, one round, no
refinement) for every layout -- pydensecrf on every core (the reference), torch as one single-threaded
process per core (what ``backend: auto`` with ``workers: null`` takes on CPU, ``crf.pool.default_workers``)
and as one process of every core's threads, and one single-threaded process of each; ``--layouts`` picks
some of them -- and prints (configuration, image) pairs per second, the ratio to the first row, whether
the confusion matrices are identical to the first row's, the load average before and after (the machine
may be shared: compare the rows of one run), and the paper's protocol (100 images x (96 coarse + 26
refinement)) projected at the measured rates, exhaustive and with successive halving.

Images: real PASCAL VOC 2012 val images with ``--voc-root`` (DIAGNOSTIC probabilities made from their ground
truth by ``deeplab_v1.data.degraded.degraded_probs``, the same kind of coarse scores a DCNN gives);
otherwise synthetic 500 x 375 images with 21 labels (smooth shapes, mild noise). Sizes are full
resolution: one CRF is the paper's unit of work (10 mean-field iterations, 21 labels).

    python tools/bench_crf_search.py                      # synthetic, 8 configurations x 4 images
    python tools/bench_crf_search.py --voc-root /data/VOCdevkit/VOC2012 --images 4 --configs 8
    python tools/bench_crf_search.py --layouts torch-processes torch-threads --images 4 --configs 16  # the layout rule
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


def protocol_runs(images: int = 100, coarse: int = 96, refine: int = 26) -> dict[str, int]:
    """(configuration, image) CRF runs of the paper's protocol (Sec. 5: 100 images, the 96-configuration
    coarse grid, one refinement round of 26 new configurations): exhaustive, and with successive halving
    (eta 3: each round on ceil(100 / 9) = 12 images, the best third on 36, the best third of those on 100)."""
    halving = SearchConfig(strategy="halving")
    schedule = halving.halving_schedule(images)

    from crf import CRFParams
    from crf.search.run import halving_cut

    def halved(configs: list) -> int:
        # the cut keeps whole lattice groups; which ones does not change the count when groups are equal
        runs, done, alive = 0, 0, configs
        for n in schedule:
            runs += len(alive) * (n - done)
            done = n
            if n < images:
                rank = {id(p): i for i, p in enumerate(alive)}
                alive = halving_cut(alive, lambda p: {"objective": -rank[id(p)], "images": n,
                                                      "params": p.to_dict()}, halving.eta)
        return runs

    coarse_grid = halving.coarse_grid()[:coarse]
    best = coarse_grid[0]
    refinement = [p for p in halving.refine(best, 1) if p not in coarse_grid][:refine]
    return {"grid": (coarse + refine) * images, "halving": halved(coarse_grid) + halved(refinement)}


#: ``--layouts`` names of the rows of :func:`layouts`, in its order.
LAYOUT_KEYS = ("pydensecrf", "torch-processes", "torch-threads", "torch-1", "pydensecrf-1")


def layouts(cores: int) -> list[tuple[str, str, int, int]]:
    """(name, backend, processes, threads per process) of every layout measured, in the order of
    :data:`LAYOUT_KEYS`: pydensecrf on every core (the reference), torch as one single-threaded process per
    core (``workers: null``, ``crf.pool.default_workers``), torch as one process with every core's threads,
    and both backends in one single-threaded process."""
    return [("pydensecrf, 1 process per core", "pydensecrf", cores, 1),
            ("torch, 1 process per core x 1 thread (the default)", "torch", cores, 1),
            (f"torch, 1 process x {cores} threads (in-process)", "torch", 1, cores),
            ("torch, 1 process x 1 thread (in-process)", "torch", 1, 1),
            ("pydensecrf, 1 process", "pydensecrf", 1, 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voc-root", type=Path, help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
    ap.add_argument("--images", type=int, default=4, help="images (default 4)")
    ap.add_argument("--configs", type=int, default=8, help="configurations (default 8; above 2 rounded up to a multiple of 4)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="processes of the 'every core' layouts")
    ap.add_argument("--skip-single", action="store_true", help="leave out the two single-thread in-process rows")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUT_KEYS, metavar="LAYOUT",
                    help=f"measure only these layouts ({', '.join(LAYOUT_KEYS)}; default: all); the ratio "
                    "column is to the first one given")
    ap.add_argument("--repeats", type=int, default=2,
                    help="passes over the layouts, alternating their order; each layout's best pass is shown")
    args = ap.parse_args()
    from crf.memory import reuse_freed_memory

    reuse_freed_memory()  # an entry point's choice, as in a deeplab run (crf.memory)
    import torch

    base = pick_configs(args.configs)
    rows = layouts(args.cores)
    if args.layouts:
        rows = [dict(zip(LAYOUT_KEYS, rows))[k] for k in args.layouts]
    elif args.cores == 1:  # the 'every core' rows are the single-process ones
        rows = rows[1:4:2] + rows[:1]
    if args.skip_single:
        rows = [r for r in rows if not (r[2] == 1 and r[3] == 1)]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_crf_search_") as tmp:
        tmp = Path(tmp)
        files = make_search_inputs(tmp, args.images, args.voc_root)
        with np.load(files[0]) as z:
            h, w = z["image"].shape[:2]
        pairs = len(base.coarse_grid()) * len(files)
        source = f"VOC val ({args.voc_root})" if args.voc_root else "synthetic"
        print(f"# crf.search benchmark: {len(base.coarse_grid())} configurations x {len(files)} images = {pairs} CRFs, "
              f"{source}, first image {w}x{h}, {NUM_CLASSES} labels, {base.iterations} mean-field iterations, "
              f"{os.cpu_count()} CPUs; load average at the start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
        print()
        print("| layout | configs x images / s | ratio to the first row | identical confusions to the first row |")
        print("|---|---:|---:|---|")
        ref, rates, same_as_ref = None, {}, {}
        threads0 = torch.get_num_threads()
        passes = [row for r in range(args.repeats) for row in (rows if r % 2 == 0 else rows[::-1])]
        for index, (name, backend, procs, threads) in enumerate(passes):
            cfg = SearchConfig(**{**base.__dict__, "workers": procs, "backend": backend})
            out = tmp / f"run_{index}_{backend}_{procs}_{threads}"
            torch.set_num_threads(threads)
            try:
                t0 = time.perf_counter()
                run_search(files, out, cfg, progress=False)
                wall = time.perf_counter() - t0
            finally:
                torch.set_num_threads(threads0)
            recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
            conf = {json.dumps(r["params"], sort_keys=True): r["confusion"] for r in recs}
            ref = ref if ref is not None else conf  # the first row (pydensecrf on every core by default)
            rates[name] = max(rates.get(name, 0.0), pairs / wall)
            same = "yes" if conf == ref else "NO: " + str(sum(conf[k] != ref[k] for k in ref)) + " differ"
            same_as_ref[name] = same if same_as_ref.get(name, "yes") == "yes" else same_as_ref[name]
            print(f"  pass {index + 1}/{len(passes)}: {name}: {pairs / wall:.2f} pairs/s", file=sys.stderr, flush=True)
        ref_rate = rates[rows[0][0]]
        for name, *_ in rows:
            print(f"| {name} | {rates[name]:.2f} | {rates[name] / ref_rate:.2f}x | {same_as_ref[name]} |")
        load1 = os.getloadavg()
        print()
        print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (wall times include starting "
              "the workers and reading the inputs once per worker)")
        runs = protocol_runs()
        best = max(rates, key=rates.get)
        print()
        print(f"## The paper's protocol projected (100 images x (96 coarse + 26 refinement) = {runs['grid']} CRF runs; "
              f"successive halving {runs['halving']} = {100 * runs['halving'] / runs['grid']:.0f} %), at this "
              f"benchmark's rates on {w}x{h} images")
        print()
        print("| layout | exhaustive | halving |")
        print("|---|---:|---:|")
        for name in dict.fromkeys((rows[0][0], best)):
            r = rates[name]
            print(f"| {name} | {runs['grid'] / r / 60:.1f} min | {runs['halving'] / r / 60:.1f} min |")
        r = rates[best]
        print(f"\nfastest layout: {best}; exhaustive {rates[best] / ref_rate:.2f}x and halving "
              f"{rates[best] / ref_rate * runs['grid'] / runs['halving']:.2f}x faster than the first row "
              "(exhaustive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
