"""Held-out evidence for the learned CRF (issue #24 item 4): no CRF vs the grid's best vs the fitted CRF.

On VOC val images with DIAGNOSTIC scores made from their ground truth (``deeplab_v1.data.degraded``: about
95 % pixel accuracy, wrong near boundaries; as ``tools/bench_crf_dropin.py`` uses them), the images are
split in two halves with ``--seed``:

1. the fit half: a small grid over ``w1`` x ``sigma_alpha`` x ``sigma_beta`` (``--grid``; ``w2 = 3``,
   ``sigma_gamma = 3`` fixed, as the paper's Sec. 5) scored by mIoU (the paper's objective), then
   ``crf.fit_crf`` from the grid's best (``--learn``: default ``w1``, ``w2`` and the 21 x 21 compatibility, a
   quarter of the fit half held out for early stopping);
2. the report half, which neither the grid nor the fit saw: mIoU, pixel accuracy and the 5-px trimap mIoU
   (``crf.trimap``'s void band, as the evaluation's trimap) of no CRF, the grid's best and the learned CRF
   (``crf.learn.score_crfs``: one confusion matrix over the half).

``--scale`` shrinks every image to save time on a CPU: the probabilities are made at full size and then
resized with the image (area averaging, renormalised), the label by nearest neighbour; the grid's
``sigma_alpha`` values are in pixels of the shrunk images. The CRF runs the pydensecrf backend (the
reference) unless ``--backend`` says otherwise. Prints a markdown table with the load average (times on a
shared machine are noisy). Usage:

    python tools/learned_crf_study.py --voc VOC2012_DIR [--images 20] [--scale 0.5] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf import CRFParams, fit_crf  # noqa: E402
from crf.confusion import percent  # noqa: E402
from crf.learn import score_crfs  # noqa: E402

CLASSES = 21
#: The grid on the fit half: w1 x sigma_alpha x sigma_beta (the paper's w2 = 3, sigma_gamma = 3).
DEFAULT_GRID = "3,5/20,40,60/3,5,10"


def load_images(voc: str, count: int, scale: float) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The first ``count`` val images: (id, RGB uint8 (H, W, 3), probs float32 (C, H, W), label uint8 (H, W)),
    shrunk by ``scale``.

    Raises:
        ValueError: val.txt lists fewer images; FileNotFoundError: an image cannot be read.
    """
    import cv2
    from PIL import Image

    from deeplab_v1.data.degraded import degraded_probs

    names = (Path(voc) / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]
    if len(names) < count:
        raise ValueError(f"{voc}: val.txt lists {len(names)} images, --images asks for {count}")
    out = []
    for name in names:
        bgr = cv2.imread(str(Path(voc) / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read image {name}.jpg under {voc}")
        label = np.asarray(Image.open(Path(voc) / "SegmentationClass" / f"{name}.png"))
        probs = degraded_probs(label, CLASSES)
        if scale != 1:
            h, w = max(8, round(label.shape[0] * scale)), max(8, round(label.shape[1] * scale))
            bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
            probs = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_AREA) for p in probs])
            probs /= probs.sum(0, keepdims=True)
        out.append((name, np.ascontiguousarray(bgr[:, :, ::-1]), probs.astype(np.float32), label))
    return out


def parse_grid(text: str) -> list[CRFParams]:
    """``"3,5/20,40/3,5"`` -> every (w1, sigma_alpha, sigma_beta), w2 = sigma_gamma = 3, 10 iterations."""
    w1s, alphas, betas = ([float(v) for v in part.split(",")] for part in text.split("/"))
    return [CRFParams(w1=a, sigma_alpha=b, sigma_beta=c, w2=3.0, sigma_gamma=3.0, iterations=10)
            for a in w1s for b in alphas for c in betas]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", required=True, help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
    ap.add_argument("--images", type=int, default=20, help="val images, split in a fit and a report half")
    ap.add_argument("--scale", type=float, default=0.5, help="shrink factor of every image (1: full size)")
    ap.add_argument("--grid", default=DEFAULT_GRID, help="w1/sigma_alpha/sigma_beta values on the fit half")
    ap.add_argument("--epochs", type=int, default=6, help="most passes of the fit")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learn", default="w1,w2,compatibility", help="what the fit learns (crf.fit_crf's learn)")
    ap.add_argument("--backend", default="pydensecrf", help="the post-hoc CRF's backend (scoring)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.images < 4 or not 0 < args.scale <= 1:
        ap.error("--images must be >= 4 and --scale in (0, 1]")
    import torch

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    data = load_images(args.voc, args.images, args.scale)
    order = np.random.default_rng(args.seed).permutation(len(data))
    fit_half, report_half = sorted(order[: len(data) // 2]), sorted(order[len(data) // 2:])
    pick = lambda ids, k: [data[i][k] for i in ids]  # noqa: E731
    grid = parse_grid(args.grid)

    t0 = time.perf_counter()
    crfs = {f"{p.w1:g}/{p.sigma_alpha:g}/{p.sigma_beta:g}": (p, None) for p in grid}
    on_fit = score_crfs(pick(fit_half, 1), pick(fit_half, 2), pick(fit_half, 3), crfs, backend=args.backend)
    best_name = max(crfs, key=lambda k: on_fit[k]["miou"])
    best = crfs[best_name][0]
    grid_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = fit_crf(pick(fit_half, 1), pick(fit_half, 2), pick(fit_half, 3), best, learn=args.learn.split(","),
                     epochs=args.epochs, batch=2,
                     held_out=0.25, patience=2, lr=args.lr, seed=args.seed,
                     progress=lambda e: print(f"  fit epoch {e['epoch']}: batch loss {e['fit_batch_loss']:.4f}, "
                                              f"held-out {e['held_out']:.4f}, w1 {e['w1']:.3f}, w2 {e['w2']:.3f}",
                                              file=sys.stderr, flush=True))
    fit_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    compared = {"no CRF": None, f"grid best {best_name}": (best, None),
                f"learned ({args.learn.replace(',', ', ')})": (result.params, np.array(result.compatibility))}
    report = score_crfs(pick(report_half, 1), pick(report_half, 2), pick(report_half, 3), compared,
                        backend=args.backend)
    fit_scores = score_crfs(pick(fit_half, 1), pick(fit_half, 2), pick(fit_half, 3), compared, backend=args.backend)
    score_seconds = time.perf_counter() - t0

    shape = sorted({d[1].shape[:2] for d in data})
    print(f"# Learned CRF, held out: {len(report_half)} report + {len(fit_half)} fit VOC 2012 val images (the "
          f"first {args.images} of val.txt, split with seed {args.seed}), shrunk x{args.scale:g} "
          f"({shape[0][1]}x{shape[0][0]} to {shape[-1][1]}x{shape[-1][0]} px), DIAGNOSTIC degraded-GT scores, "
          f"C = {CLASSES}, 10 iterations, {args.backend}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} cores; load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print()
    print(f"Grid on the fit half ({len(grid)} configurations, mIoU): best w1/sigma_alpha/sigma_beta = {best_name}. "
          f"Fit from it: w1 {best.w1:g} -> {result.params.w1:.3f}, w2 {best.w2:g} -> {result.params.w2:.3f}, "
          f"{result.epochs_run} epochs (best {result.best_epoch}), {result.steps} steps; cross-entropy fit "
          f"{result.objective['fit']['before']:.4f} -> {result.objective['fit']['after']:.4f}, its held-out "
          f"quarter {result.objective['held_out']['before']:.4f} -> {result.objective['held_out']['after']:.4f}.")
    print()
    print("| CRF | report half mIoU % | report half pixel acc. % | report half 5-px trimap mIoU % | "
          "fit half mIoU % | fit half 5-px trimap mIoU % |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in compared:
        r, f = report[name], fit_scores[name]
        print(f"| {name} | {percent(r['miou'])} | {percent(r['pixel_accuracy'])} | {percent(r['trimap_miou'])} | "
              f"{percent(f['miou'])} | {percent(f['trimap_miou'])} |")
    print()
    print(f"Seconds: grid {grid_seconds:.0f}, fit {fit_seconds:.0f}, scoring {score_seconds:.0f}, total "
          f"{time.perf_counter() - t_start:.0f}.")
    if args.json:
        Path(args.json).write_text(json.dumps({"report_half": report, "fit_half": fit_scores, "grid_on_fit": on_fit,
                                               "grid_best": best_name, "fit": result.to_dict(),
                                               "args": vars(args)}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
