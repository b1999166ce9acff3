"""Benchmark the dense CRF backends: pydensecrf vs the PyTorch permutohedral backend.

Measures, for 500x375 images with 21 labels and 10 mean-field iterations:

* single-image inference: ms per image for pydensecrf (C++, one thread), torch on CPU (all threads)
  and torch on CUDA (the CUDA rows are skipped with a note when ``torch.cuda.is_available()`` is False);
* the cross-validation grid of ``crf.search.SearchConfig()`` (DeepLab v1 Sec. 5, MATLAB notation: w1 in
  [5, 10], i.e. the two values 5 and 10, sigma_alpha in [50:10:100], sigma_beta in [3:1:10], i.e.
  2 x 48 = 96 configurations), as the search stage runs it: configurations x images per second for
  pydensecrf in one process, pydensecrf in one process per core (the former default, every
  configuration from scratch), and torch (a lattice per (sigma_alpha, sigma_beta) shared by the w1
  values, which run as channels; the Gaussian lattice shared by all; labels only, as the search takes
  them). A subset of the 48 (sigma_alpha, sigma_beta) pairs is run and the full grid's time is
  extrapolated.

Every row runs in fresh processes so that its peak memory is its own (CPU: peak resident set size of
the process, or the largest worker's; CUDA: ``torch.cuda.max_memory_allocated``). The ratios are to
pydensecrf in one process and to pydensecrf on every core. With ``--voc``, images come from VOC val
(cropped/padded to 375x500) and probabilities from their ground truth made DCNN-like
(``deeplab_v1.data.degraded``: coarse blobs, wrong near boundaries, upsampled x8); otherwise both are
synthetic (smooth colour regions; random stride-8 logits). Usage:

    python tools/bench_crf.py [--voc VOC2012_DIR] [--images 2] [--pairs 2] [--threads N]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf.dense import scores_to_probs  # noqa: E402
from crf.search import SearchConfig  # noqa: E402

HEIGHT, WIDTH, LABELS, ITERATIONS = 375, 500, 21, 10
_GRID = SearchConfig()  # the search's default coarse grid (paper Sec. 5): 2 x 6 x 8 = 96 configurations
W1_VALUES = tuple(_GRID.w1)
PAIRS = [(sa, sb) for sa in _GRID.sigma_alpha for sb in _GRID.sigma_beta]  # 48 (sigma_alpha, sigma_beta)


def make_inputs(count: int, voc: str | None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (RGB uint8 (375, 500, 3), float32 probabilities (21, 375, 500)) pairs.

    With ``voc``: the first val images and DIAGNOSTIC DCNN-like probabilities from their ground truth
    (``deeplab_v1.data.degraded.degraded_probs``: the scores bilinearly upsampled x8 as the network's
    are, softmax). Without: synthetic images (smooth colour regions with noise) and random logits on a
    stride-8 grid, bilinearly upsampled, softmax."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    if voc:
        from PIL import Image

        from deeplab_v1.data.degraded import degraded_probs

        names = (Path(voc) / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]
        if len(names) < count:
            raise ValueError(f"{voc}: val.txt lists {len(names)} images, --images asks for {count}")
        for name in names:
            bgr = cv2.imread(str(Path(voc) / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR)
            if bgr is None:
                raise FileNotFoundError(f"cannot read image {name}.jpg under {voc}")
            label = np.asarray(Image.open(Path(voc) / "SegmentationClass" / f"{name}.png"))
            rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            lab = np.zeros((HEIGHT, WIDTH), np.uint8)
            h, w = min(HEIGHT, bgr.shape[0]), min(WIDTH, bgr.shape[1])
            rgb[:h, :w] = bgr[:h, :w, ::-1]
            lab[:h, :w] = label[:h, :w]
            out.append((rgb, degraded_probs(lab, LABELS)))  # stride-8 scores upsampled x8, softmaxed
        return out
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(HEIGHT // 25, WIDTH // 25, 3)).astype(np.uint8)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        logits = rng.normal(0, 3, size=(HEIGHT // 8 + 1, WIDTH // 8 + 1, LABELS)).astype(np.float32)
        up = cv2.resize(logits, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
        out.append((np.ascontiguousarray(image), scores_to_probs(up.transpose(2, 0, 1))))
    return out


def _pydensecrf(image: np.ndarray, probs: np.ndarray, params) -> np.ndarray:
    # the pydensecrf backend as the search runs it (make_inputs gives checked, C-contiguous arrays)
    from crf.dense import dense_crf_pydensecrf

    return dense_crf_pydensecrf(image, probs, params)


def _grid(pairs: int):
    from crf.params import CRFParams

    return [CRFParams(w1=w1, sigma_alpha=sa, sigma_beta=sb, iterations=ITERATIONS)
            for sa, sb in PAIRS[:pairs] for w1 in W1_VALUES]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --------------------------------------------------------------------------- pydensecrf, one process per core
_POOL_INPUTS: list = []


def _pool_init(images: int, voc: str | None) -> None:
    _POOL_INPUTS.extend(make_inputs(images, voc))


def _pool_task(image_index: int, params) -> float:
    image, probs = _POOL_INPUTS[image_index]
    _pydensecrf(image, probs, params).argmax(0)
    return _peak_mb()


def _pydensecrf_processes(task: dict) -> tuple[float, int, float]:
    """The search's pydensecrf layout: a spawn pool of ``processes`` workers, one (configuration, image)
    pair per task. Pool start-up and input loading are not timed."""
    from crf.pool import make_executor

    grid = _grid(task["pairs"])
    with make_executor(task["processes"], "pydensecrf", initializer=_pool_init,
                       initargs=(task["images"], task["voc"])) as pool:
        list(pool.map(_pool_task, [0] * task["processes"], [grid[0]] * task["processes"]))  # start every worker
        start = time.perf_counter()
        pairs = [(i, p) for p in grid for i in range(task["images"])]
        peaks = list(pool.map(_pool_task, [i for i, _ in pairs], [p for _, p in pairs]))
        seconds = time.perf_counter() - start
    return seconds, len(pairs), max(peaks)


# --------------------------------------------------------------------------- one row in a fresh process
def _worker(task: dict, queue) -> None:
    """Runs one benchmark row in this (fresh) process; puts (seconds, units, peak MB) or an error."""
    try:
        if task["backend"] == "pydensecrf" and task["processes"] > 1:
            queue.put(_pydensecrf_processes(task))
            return
        import torch

        from crf.params import CRFParams
        from crf.torch_backend import dense_crf_torch, dense_crf_torch_grid

        torch.set_num_threads(task["threads"])
        from crf.memory import reuse_freed_memory

        reuse_freed_memory()  # an entry point's choice, as in a deeplab run (crf.memory)
        inputs = make_inputs(task["images"], task["voc"])
        single = CRFParams(w1=5, sigma_alpha=50, sigma_beta=5, iterations=ITERATIONS)
        grid = _grid(task["pairs"])
        device = task["device"]
        kind = (task["backend"], task["mode"])
        if task["backend"] == "torch":
            # Warm-up, not counted: one full-size call of the row's kind (the heap grows to its working
            # size once per process, lazy initialisation, CUDA kernels), as in a search worker's
            # steady state.
            image0, probs0 = inputs[0]
            if task["mode"] == "single":
                dense_crf_torch(image0, probs0, single, device)
            else:
                dense_crf_torch_grid(image0, probs0, grid[: len(W1_VALUES)], device, labels_only=True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        units = 0
        for image, probs in inputs:
            if kind == ("pydensecrf", "single"):
                _pydensecrf(image, probs, single)
                units += 1
            elif kind == ("pydensecrf", "grid"):
                for params in grid:
                    _pydensecrf(image, probs, params).argmax(0)
                units += len(grid)
            elif kind == ("torch", "single"):
                dense_crf_torch(image, probs, single, device)
                units += 1
            else:
                # one call per (sigma_alpha, sigma_beta) group and image, as the search stage makes them
                for g in range(0, len(grid), len(W1_VALUES)):
                    dense_crf_torch_grid(image, probs, grid[g : g + len(W1_VALUES)], device, labels_only=True)
                units += len(grid)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_mb()
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
    parser.add_argument("--voc", default=None, help="VOC2012 folder (JPEGImages, SegmentationClass, ImageSets); default synthetic inputs")
    parser.add_argument("--images", type=int, default=2, help="images per row (default 2)")
    parser.add_argument("--pairs", type=int, default=2, help="(sigma_alpha, sigma_beta) pairs of the 48 to run (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all cores)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="pydensecrf worker processes of the 'every core' grid row (default: all cores)")
    args = parser.parse_args(argv)
    if not 1 <= args.pairs <= len(PAIRS):
        parser.error(f"--pairs must be in [1, {len(PAIRS)}], got {args.pairs}")
    if args.images < 1 or args.threads < 1 or args.processes < 1:
        parser.error("--images, --threads and --processes must be >= 1")
    if args.voc and not (Path(args.voc) / "ImageSets" / "Segmentation" / "val.txt").is_file():
        parser.error(f"--voc {args.voc}: ImageSets/Segmentation/val.txt not found (give the VOC2012 folder)")
    import torch

    from tqdm import tqdm

    base = {"images": args.images, "voc": args.voc, "pairs": args.pairs, "threads": args.threads, "processes": 1}
    rows = [
        ("single", "pydensecrf", "cpu, 1 process", {}),
        ("single", "torch", f"cpu, {args.threads} threads", {}),
        ("single", "torch", "cuda", {"device": "cuda"}),
        ("grid", "pydensecrf", "cpu, 1 process", {}),
        ("grid", "pydensecrf", f"cpu, {args.processes} processes", {"processes": args.processes}),
        ("grid", "torch", f"cpu, {args.threads} threads", {}),
        ("grid", "torch", "cuda", {"device": "cuda"}),
    ]
    grid_size = len(W1_VALUES) * args.pairs
    inputs = "VOC val, degraded-GT probabilities" if args.voc else "synthetic"
    lines = [
        f"# dense CRF benchmark: {args.images} image(s) {WIDTH}x{HEIGHT} ({inputs}), {LABELS} labels, {ITERATIONS} "
        f"iterations; grid subset {grid_size} of {len(W1_VALUES) * len(PAIRS)} configurations; "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}",
        f"{'mode':<6} {'backend':<11} {'device':<18} {'ms/unit':>9} {'units/s':>8} {'peak MB':>8} "
        f"{'vs 1 proc':>9} {'vs all cores':>12}",
    ]
    one: dict[str, float] = {}
    best: dict[str, float] = {}
    notes = []
    for mode, backend, label, extra in tqdm(rows, desc="bench_crf", unit="row", file=sys.stderr):
        device = extra.get("device", "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            lines.append(f"{mode:<6} {backend:<11} {label:<18} skipped: torch.cuda.is_available() is False")
            continue
        result = run_row({**base, **extra, "mode": mode, "backend": backend, "device": device})
        if isinstance(result, str):
            lines.append(f"{mode:<6} {backend:<11} {label:<18} failed: {result}")
            continue
        seconds, units, peak = result
        rate = units / seconds
        if backend == "pydensecrf":
            one.setdefault(mode, rate)
            best[mode] = max(best.get(mode, 0.0), rate)
        vs_one = f"{rate / one[mode]:.2f}x" if mode in one else "-"
        vs_best = f"{rate / best[mode]:.2f}x" if mode in best else "-"
        lines.append(f"{mode:<6} {backend:<11} {label:<18} {1e3 * seconds / units:>9.1f} {rate:>8.2f} {peak:>8.0f} "
                     f"{vs_one:>9} {vs_best:>12}")
        if mode == "grid":
            full = len(W1_VALUES) * len(PAIRS) * args.images / rate
            notes.append(f"{backend} {label}: the full {len(W1_VALUES) * len(PAIRS)}-configuration grid on "
                         f"{args.images} image(s) ~ {full:.0f} s (extrapolated)")
    lines.append("# unit = one image (single) or one configuration x image (grid); peak MB = peak RSS of the "
                 "process or largest worker (CPU), torch.cuda.max_memory_allocated (CUDA); 'vs all cores' = "
                 "vs the fastest pydensecrf row of the mode")
    lines.extend("# " + note for note in notes)
    print("\n".join(lines))
    speedup = [line for line in lines if line.startswith("grid   torch       cpu")]
    print(f"bench_crf: {len(rows)} rows; torch CPU grid: {speedup[0].split()[-1] if speedup else 'n/a'} the fastest "
          "pydensecrf grid row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
