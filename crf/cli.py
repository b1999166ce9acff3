"""``python -m crf``: the fully connected CRF over any model's outputs, no experiment file (issue #23 item 2).

* ``apply --images DIR --probs DIR --out DIR [--params w1=4,sigma_alpha=49,...] [--logits]``: the CRF on
  every ``<stem>.npy`` / ``.npz`` class map with its image ``<stem>.*``; writes ``<stem>.png`` palette
  labels. Resumable (outputs already there are kept), every core or a GPU (``crf.parallel``).
* ``search --images DIR --probs DIR --labels DIR --out DIR [--band void|boundary]``: the paper's
  cross-validation of w1, sigma_alpha, sigma_beta (DeepLab v1 Sec. 5; ``crf.search``, grid or successive
  halving); ``--band`` is the ``trimap_miou`` objective's band (``crf.trimap``).
* ``evaluate --pred DIR --labels DIR --num-classes N --out DIR [--band void|boundary]``: ``metrics.json``
  (mIoU, pixel and mean accuracy, per class; ``crf.confusion``) and ``trimap.json`` + ``trimap.png`` (the
  accuracy in bands around the void outlines or the label changes, paper Fig. 5; ``crf.trimap``).

Every input folder is checked before any work, and one error names every bad file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_json
from .confusion import confusion_stack, mean_accuracy, miou, per_class_accuracy, per_class_iou, pixel_accuracy
from .errors import CRFInputError, DeepLabError
from .folders import (IMAGE_SUFFIXES, MAP_SUFFIXES, bad_files_error, check_maps, files_by_stem, load_map,
                      match_maps, read_label, read_rgb, to_probs, write_palette_png)
from .params import RELEASE_LARGEFOV, CRFParams

__all__ = ["main", "parse_params", "load_probs", "load_logits", "evaluate_folders"]


def parse_params(text: str | None) -> CRFParams:
    """``w1=4,sigma_alpha=49,...`` (the rest from the release's LargeFOV values) or a JSON file with those
    keys (a search's ``best.json``; other keys ignored) -> CRFParams.

    Raises:
        CRFInputError: an item without ``=``, a value that is not a number, an unknown key (named).
    """
    values = RELEASE_LARGEFOV.to_dict()
    if not text:
        return RELEASE_LARGEFOV
    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise CRFInputError(f"--params: file {path} does not exist")
        loaded = json.loads(path.read_text())
        values.update({k: v for k, v in loaded.items() if k in values})
        return CRFParams.from_dict(values)
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise CRFInputError(f"--params: {item!r} is not key=value (e.g. w1=4,sigma_alpha=49,sigma_beta=5)")
        try:
            number = float(value)
        except ValueError:
            raise CRFInputError(f"--params: {key.strip()}={value!r} is not a number") from None
        values[key.strip()] = int(number) if key.strip() == "iterations" and number.is_integer() else number
    return CRFParams.from_dict(values)


def _load(task, logits: bool) -> tuple[np.ndarray, np.ndarray]:
    image = read_rgb(task.image)
    return image, to_probs(load_map(task.inputs), image.shape[0], image.shape[1], logits, where=str(task.inputs))


def load_probs(task) -> tuple[np.ndarray, np.ndarray]:
    """``crf.parallel`` load hook: (RGB uint8 image, float32 probabilities at its size) of a task whose
    ``inputs`` is a probability map and ``image`` its image."""
    return _load(task, False)


def load_logits(task) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`load_probs` for a map of logits (softmax after the upsampling)."""
    return _load(task, True)


def _add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=Path, required=True, help="folder of the images (<stem>.jpg/.png/...)")
    ap.add_argument("--probs", type=Path, required=True,
                    help="folder of (C, H, W) class maps <stem>.npy/.npz, at the image's size or smaller")
    ap.add_argument("--logits", action="store_true", help="the maps are logits (softmax after upsampling)")
    ap.add_argument("--device", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--workers", type=int, help="worker processes (default: by the machine's cores and load)")
    ap.add_argument("--backend", choices=["auto", "torch", "pydensecrf"],
                    help="auto (default): torch where it fits memory, else pydensecrf")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def _inputs(args) -> tuple[list[str], dict[str, Path], dict[str, Path], int]:
    images = files_by_stem(args.images, IMAGE_SUFFIXES, "--images")
    maps = files_by_stem(args.probs, MAP_SUFFIXES, "--probs")
    stems = match_maps(images, maps)
    return stems, images, maps, check_maps(stems, images, maps)


def cmd_apply(args) -> int:
    from .parallel import CRFTask, run_crf_many

    params = parse_params(args.params)
    stems, images, maps, _ = _inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [CRFTask(maps[s], args.out / f"{s}.png", image=images[s]) for s in stems]
    summary = run_crf_many(tasks, params, workers=args.workers, backend=args.backend or "auto",
                           device=args.device or "cpu",
                           progress=not args.no_progress, load=load_logits if args.logits else load_probs,
                           write=write_palette_png)
    if args.no_progress:
        print(summary.line())
    return 0


def cmd_search(args) -> int:
    from .input_files import write_search_input
    from .search import SearchConfig, run_search
    from .trimap import trimap_band

    values: dict = {}
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            raise CRFInputError(f"--config: {args.config} does not exist")
        values = yaml.safe_load(args.config.read_text()) or {}
    for key in ("strategy", "objective", "workers", "rounds", "backend", "device"):
        if getattr(args, key) is not None:  # given on the command line: over the YAML's
            values[key] = getattr(args, key)
    config = SearchConfig.from_dict(values)
    stems, images, maps, classes = _inputs(args)
    labels = files_by_stem(args.labels, (".png",), "--labels")
    missing = [f"{maps[s]}: no label {s}.png in --labels" for s in stems if s not in labels]
    if missing:
        raise bad_files_error(missing, "class maps")
    boundary = args.band == "boundary" and config.objective == "trimap_miou"
    # the boundary band is stored in the inputs (the search computes only the void band from a label), in a
    # folder of its width so that a rerun with another band or width does not reuse them
    samples = args.out / (f"samples-boundary-{config.trimap_width}" if boundary else "samples")
    samples.mkdir(parents=True, exist_ok=True)
    files, problems = [], []
    for stem in stems:
        path = samples / f"{stem}.npz"
        files.append(path)
        if path.is_file():
            continue  # written by an earlier run: the search resumes on the same inputs
        try:
            image = read_rgb(images[stem])
            label = read_label(labels[stem])
            if label.shape != image.shape[:2]:
                raise CRFInputError(f"{labels[stem]}: label {label.shape} and image {image.shape[:2]} differ in size")
            bad = np.unique(label[(label >= classes) & (label != 255)])
            if bad.size:
                raise CRFInputError(f"{labels[stem]}: values {bad[:10].tolist()} are not classes 0..{classes - 1} or 255")
            probs = to_probs(load_map(maps[stem]), *image.shape[:2], args.logits, where=str(maps[stem]))
            band = trimap_band(label, config.trimap_width, band="boundary") if boundary else None
            write_search_input(path, image, probs.astype(np.float16), label, band)
        except CRFInputError as exc:
            problems.append(str(exc))
    if problems:
        raise bad_files_error(problems, "search inputs")
    from .search.cli import torchrun_ranks

    with torchrun_ranks() as ranks:  # under torchrun every rank computes its share of one plan
        result = run_search(files, args.out, config, progress=not args.no_progress, dist=ranks)
        if ranks.rank == 0:
            print(f"best: {json.dumps(result.best.to_dict())}; {config.objective_name} {result.best_objective}; "
                  f"{args.out / 'best.json'}")
    return 0


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate_folders(pred: Path, labels: Path, num_classes: int, out: Path, *, ignore_index: int = 255,
                     widths: Sequence[int] = range(1, 41), class_names: Sequence[str] | None = None,
                     progress: bool = True, band: str = "void") -> dict:
    """Score every ``<stem>.png`` of ``pred`` against ``labels/<stem>.png``; write ``metrics.json``,
    ``trimap.json`` and ``trimap.png`` into ``out`` (atomically); return the metrics.

    metrics.json: ``images``, ``miou``, ``pixel_accuracy``, ``mean_accuracy`` (fractions), ``per_class``
    (name, IoU, accuracy; None where a class never occurs), ``confusion`` (rows ground truth). trimap.json:
    for each band width w (pixels), the mIoU and pixel accuracy of the labelled pixels within chessboard
    distance w of a void (``ignore_index``) pixel (``band="void"``; empty bands without void outlines) or of
    a pixel of another class (``band="boundary"``), as ``crf.trimap`` defines them.

    Raises:
        CRFInputError: a missing folder, no prediction, predictions without a label, bad class names, and
            every bad pair (size, values) named in one message.
    """
    from tqdm import tqdm

    from .trimap import BANDS, band_distance

    if band not in BANDS:
        raise CRFInputError(f"--band must be one of {', '.join(BANDS)}, got {band!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CRFInputError(f"--num-classes must be an integer >= 1, got {num_classes!r}")
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise CRFInputError(f"--class-names: {len(names)} names for {num_classes} classes")
    widths = sorted({int(w) for w in widths})
    if not widths or widths[0] < 0:
        raise CRFInputError(f"--trimap-widths must be pixel widths >= 0, got {widths}")
    preds = files_by_stem(pred, (".png",), "--pred")
    gts = files_by_stem(labels, (".png",), "--labels")
    if not preds:
        raise CRFInputError(f"--pred: no .png prediction in {pred}")
    missing = [f"{preds[s]}: no label {s}.png in --labels" for s in sorted(set(preds) - set(gts))]
    if missing:
        raise bad_files_error(missing, "predictions")
    top = widths[-1]
    total = np.zeros((num_classes, num_classes), np.int64)
    bands = np.zeros((top + 1, num_classes, num_classes), np.int64)
    problems = []
    for stem in tqdm(sorted(preds), desc="evaluate", unit="img", disable=not progress):
        try:
            p, g = read_label(preds[stem]), read_label(gts[stem])
            distance = band_distance(g, band, ignore_index)
            bins = np.where(distance <= top, distance, -1).astype(np.int64)
            both = ("label " + str(gts[stem]), "prediction " + str(preds[stem]))
            total += confusion_stack(g, p, num_classes, np.zeros(g.shape, np.int64), 1, ignore_index, both)[0]
            bands += confusion_stack(g, p, num_classes, bins, top + 1, ignore_index, both)
        except (CRFInputError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        raise bad_files_error(problems, "prediction/label pairs")
    iou, acc = per_class_iou(total), per_class_accuracy(total)
    metrics = {
        "images": len(preds), "num_classes": num_classes,
        "miou": _json_number(miou(total)), "pixel_accuracy": _json_number(pixel_accuracy(total)),
        "mean_accuracy": _json_number(mean_accuracy(total)),
        "per_class": [{"class": n, "iou": _json_number(i), "accuracy": _json_number(a)} for n, i, a in zip(names, iou, acc)],
        "confusion": total.tolist(),
    }
    cumulative = np.cumsum(bands, axis=0)
    trimap = {"band": band, "ignore_index": ignore_index, "widths": widths,
              "miou": [_json_number(miou(cumulative[w])) for w in widths],
              "pixel_accuracy": [_json_number(pixel_accuracy(cumulative[w])) for w in widths],
              "pixels": [int(cumulative[w].sum()) for w in widths]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "trimap.json", trimap)
    _trimap_figure(out / "trimap.png", trimap)
    return metrics


def _trimap_figure(path: Path, trimap: dict) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "pixel_accuracy", "pixel accuracy (%)"), (axes[1], "miou", "mean IoU (%)")):
        ys = [np.nan if v is None else 100 * v for v in trimap[key]]
        ax.plot(trimap["widths"], ys, marker=".")
        ax.set_xlabel("trimap width (pixels)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def cmd_evaluate(args) -> int:
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    metrics = evaluate_folders(args.pred, args.labels, args.num_classes, args.out, ignore_index=args.ignore_index,
                               widths=args.trimap_widths, class_names=names, progress=not args.no_progress,
                               band=args.band)
    print(f"{metrics['images']} images: mIoU {100 * (metrics['miou'] or 0):.2f} %, pixel accuracy "
          f"{100 * (metrics['pixel_accuracy'] or 0):.2f} %; {args.out / 'metrics.json'}")
    return 0


def _widths(text: str) -> list[int]:
    if ".." in text:
        low, high = text.split("..")
        return list(range(int(low), int(high) + 1))
    return [int(w) for w in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crf", description="The fully connected CRF of DeepLab v1 "
                                 "over any model's outputs.")
    sub = ap.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="run the CRF; write <stem>.png labels")
    _add_common(apply)
    apply.add_argument("--out", type=Path, required=True, help="folder for the <stem>.png label maps")
    apply.add_argument("--params", help="w1=4,sigma_alpha=49,sigma_beta=5,w2=3,sigma_gamma=3,iterations=10 "
                       "(default: these, the release's LargeFOV) or a search's best.json")
    search = sub.add_parser("search", help="the paper's cross-validation of w1, sigma_alpha, sigma_beta")
    _add_common(search)
    search.add_argument("--labels", type=Path, required=True, help="folder of <stem>.png ground truth (255 ignored)")
    search.add_argument("--out", type=Path, required=True, help="search folder (samples/, results.jsonl, best.json)")
    search.add_argument("--config", type=Path, help="YAML mapping of crf.search.SearchConfig fields")
    search.add_argument("--strategy", choices=["grid", "halving"], help="grid (the paper's) or halving")
    search.add_argument("--objective", choices=["miou", "trimap_miou"])
    search.add_argument("--rounds", type=int, help="refinement rounds after the coarse grid")
    search.add_argument("--band", choices=["void", "boundary"], default="void",
                        help="trimap_miou's band: around void outlines (VOC, the release's) or label changes")
    evaluate = sub.add_parser("evaluate", help="metrics.json, trimap.json and trimap.png")
    evaluate.add_argument("--pred", type=Path, required=True, help="folder of <stem>.png predicted labels")
    evaluate.add_argument("--labels", type=Path, required=True, help="folder of <stem>.png ground truth")
    evaluate.add_argument("--num-classes", type=int, required=True)
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--ignore-index", type=int, default=255)
    evaluate.add_argument("--trimap-widths", type=_widths, default=list(range(1, 41)), help="e.g. 1..40 or 2,5,10")
    evaluate.add_argument("--class-names", help="comma-separated, one per class")
    evaluate.add_argument("--band", choices=["void", "boundary"], default="void",
                          help="trimap band around void outlines (VOC, the release's) or label changes")
    evaluate.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a ``DeepLabError`` is printed on one line with exit status 2."""
    args = build_parser().parse_args(argv)
    command = {"apply": cmd_apply, "search": cmd_search, "evaluate": cmd_evaluate}[args.command]
    try:
        return command(args)
    except DeepLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
