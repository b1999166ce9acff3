"""``report.md``: what was run and what it measured, as markdown tables (DCNN vs DCNN-CRF, paper Table 1
and Fig. 5 style) and figures. Written by the ``evaluate`` stage.

The report opens with one sentence on what the run is (``headline``: a pipeline check from random
weights, a DIAGNOSTIC run on degraded ground truth, or a real run) and where the paper's numbers come
from; ``deeplab run`` prints the same sentence last.

Reads: ``stages/*.json`` (init, CRF parameters, stage times), ``crf_search/best.json``,
``learned.json`` (the fitted CRF: no CRF / grid best / learned on the search's held-out images) and
``results.jsonl``, the test images, labels and ``predictions/``. Writes: ``report.md`` and
``figures/{qualitative,crf_search,trimap}.{png,pdf,svg}`` (``deeplab_v1.figures``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from crf.confusion import percent
from crf.trimap import trimap_band

from ..atomic import atomic_write_text
from ..config import ExperimentConfig
from ..context import RunContext
from ..data.io import read_image, read_label
from ..data.layouts import class_names, palette
from ..figures import qualitative_figure, search_heatmap, trimap_figure

#: Paper Table 1 (VOC 2012 val, trained on train_aug), mIoU % without / with the CRF.
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "deeplab": (59.80, 63.74),
    "deeplab-msc": (61.30, 65.21),
    "deeplab-7x7": (64.38, 67.64),
    "deeplab-largefov": (62.25, 67.64),
    "deeplab-msc-largefov": (64.21, 68.70),
}

_TRIMAP_ROWS = (1, 2, 3, 5, 10, 15, 20, 30, 40)


#: Rows of the qualitative figure: this many images where the CRF gained most near boundaries, as many where
#: it lost most.
QUALITATIVE_ROWS = 2
#: The band (pixels from an object boundary, the trimap of paper Fig. 5) the qualitative rows are picked by.
QUALITATIVE_BAND = 5


def headline(cfg: ExperimentConfig, metrics: Optional[dict] = None) -> str:
    """One sentence: what this run is, what its numbers mean, and where the paper's numbers come from.

    Args:
        cfg: the experiment.
        metrics: ``metrics.json`` of the run (read from the run folder when None and present).
    """
    if metrics is None and (cfg.run_dir / "metrics.json").is_file():
        metrics = json.loads((cfg.run_dir / "metrics.json").read_text(encoding="utf-8"))
    numbers = ""
    if metrics and "dcnn" in metrics:
        numbers = f"DCNN {percent(metrics['dcnn']['miou'])} %"
        numbers += f", DCNN-CRF {percent(metrics['crf']['miou'])} % mIoU" if "crf" in metrics else " mIoU"
    measured = f" (here: {numbers})" if numbers else ""
    paper = PAPER_TABLE1.get(cfg.model.name, PAPER_TABLE1["deeplab-largefov"])
    paper_name = cfg.model.name if cfg.model.name in PAPER_TABLE1 else "deeplab-largefov"
    source = (f"the paper's {paper[0]:.2f} / {paper[1]:.2f} % ({paper_name}, Table 1) come from training on "
              "VOC 2012 train_aug (10,582 images) from ImageNet weights and testing on the 1,449 val images "
              "(experiments/voc12-*.yaml with the full data)")
    if cfg.test.score_source != "network":
        band = _band_gain(cfg.run_dir / "trimap.json", width=5)
        here = f" (here: {numbers}{band})" if numbers else ""
        return (f"DIAGNOSTIC run: the DCNN scores are degraded ground truth (about 95 % pixel accuracy, wrong near "
                f"object boundaries), not a network, so the numbers measure what the CRF does near boundaries "
                f"(the trimap), not DeepLab's accuracy{here}; {source}.")
    if cfg.model.init is None:
        return (f"A pipeline check, not a result: {cfg.model.name} trained {cfg.train.iterations} iterations from "
                f"random weights, so expect an mIoU of a few % (mostly background) and a CRF that moves it by "
                f"a fraction of a point either way{measured}; {source}.")
    return (f"{cfg.model.name} from {Path(cfg.model.init).name}, {cfg.train.iterations} iterations, "
            f"tested on {cfg.data.test_list}{measured}; {source}.")


def _band_gain(path: Path, width: int) -> str:
    """``, within W px of a boundary pixel accuracy A -> B %`` from ``trimap.json``, or "" without it."""
    try:
        tri = json.loads(path.read_text(encoding="utf-8"))
        i = tri["dcnn"]["widths"].index(width)
        a, b = tri["dcnn"]["pixel_accuracy"][i], tri["crf"]["pixel_accuracy"][i]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return "" if a is None or b is None else f"; within {width} px of a boundary, pixel accuracy {percent(a)} -> {percent(b)} %"


def write_report(ctx: RunContext, metrics: dict, trimap: dict) -> str:
    """Write ``report.md`` in the run folder atomically and return its text."""
    cfg = ctx.cfg
    layout = ctx.layout
    lines = [f"# DeepLab experiment `{cfg.name}`", "", f"**{headline(cfg, metrics)}**", ""]
    if cfg.test.score_source == "network" and cfg.model.init is None:
        lines += ["To see what the CRF does at object boundaries without a trained network: `deeplab run crf-demo` "
                  "(DIAGNOSTIC degraded-GT scores).", ""]
    train_rec = layout.read_record("train")
    init = train_rec.get("init", "unknown") if train_rec is not None else "not trained in this run"
    source = cfg.test.score_source
    trained = (f"{cfg.train.iterations} iterations x {cfg.train.batch_size} crops (iter_size {cfg.train.iter_size}), "
               f"lr {cfg.train.base_lr} ({cfg.train.lr_policy})") if "train" in cfg.stages else "none (not among the stages)"
    lines += [
        f"- model: `{cfg.model.name}` ({cfg.model.num_classes} classes)",
        f"- initial weights: {init}",
        f"- training: {trained}",
        f"- data: `{cfg.data.root}`, train `{cfg.data.train_list}`, test `{cfg.data.test_list}` ({metrics.get('images')} images)",
    ]
    if source != "network":
        lines.append("- **score source: DIAGNOSTIC degraded ground truth** (not a network; for CRF work only)")
    else:
        lines.append("- score source: the network")
    rec = layout.read_record("crf")
    if rec is not None and not rec.get("skipped"):
        lines.append(f"- CRF: {rec['params']} (from {rec['params_from']}), backend {cfg.crf.backend}")
    elif rec is not None and rec.get("reason"):  # CRF-as-RNN: the DCNN row is the net with its CRF layer
        layer = (train_rec or {}).get("crf_layer") or {}
        lines.append(f"- CRF: {rec['reason']}; the DCNN row is the net with it (trained: w1 {layer.get('w1')}, w2 "
                     f"{layer.get('w2')}; the compatibility in stages/train.json)")
    best = layout.read_best()
    if best is not None:
        params = layout.best_params().to_dict()
        objective = best.get("objective")
        shown = "n/a" if objective is None else f"{100 * objective:.2f} %"
        lines.append(f"- CRF search: best {params}, {best.get('objective_name')} {shown} on {best.get('images')} "
                     f"images, {best.get('configurations')} configurations; see crf_search/ranked.md")
    lines += ["", "## Accuracy (VOC protocol: one confusion matrix over the split, 255 ignored)", "",
              "| method | mIoU % | pixel acc. % | mean acc. % |", "|---|---|---|---|"]
    names = {"dcnn": "DCNN", "crf": "DCNN-CRF"}
    for k in ("dcnn", "crf"):
        if k in metrics:
            m = metrics[k]
            lines.append(f"| {names[k]} | {percent(m['miou'])} | {percent(m['pixel_accuracy'])} | {percent(m.get('mean_accuracy'))} |")
    if cfg.model.name in PAPER_TABLE1:
        a, b = PAPER_TABLE1[cfg.model.name]
        lines.append(f"| paper Table 1 (full VOC12 val, train_aug) | {a:.2f} / {b:.2f} with CRF | | |")
    lines += ["", "## Per-class IoU %", "", "| class | " + " | ".join(names[k] for k in ("dcnn", "crf") if k in metrics) + " |",
              "|---|" + "---|" * sum(k in metrics for k in ("dcnn", "crf"))]
    for i, cls in enumerate(class_names(cfg.data, cfg.model.num_classes)):
        vals = [percent(metrics[k]["per_class_iou"][i]) for k in ("dcnn", "crf") if k in metrics]
        lines.append(f"| {cls} | " + " | ".join(vals) + " |")
    if trimap:
        first = next(iter(trimap.values()))
        widths = first["widths"]
        rows = [w for w in _TRIMAP_ROWS if w in widths] or widths
        around = {"void": "void outlines", "boundary": "label changes"}[cfg.data.trimap_band]
        lines += ["", "## Trimap (accuracy within a band of w pixels around object boundaries; paper Fig. 5)", "",
                  f"The band: the labelled pixels within w pixels of the {around} (data.trimap_band: "
                  f"{cfg.data.trimap_band}).", "",
                  "| width px | " + " | ".join(f"{names[k]} pixel acc. % | {names[k]} mIoU %" for k in trimap) + " |",
                  "|---|" + "---|---|" * len(trimap)]
        for w in rows:
            i = widths.index(w)
            cells = " | ".join(f"{percent(trimap[k]['pixel_accuracy'][i])} | {percent(trimap[k]['miou'][i])}" for k in trimap)
            lines.append(f"| {w} | {cells} |")
        lines += ["", "![trimap](trimap.png)"]
    lines += learned_lines(ctx)
    lines += _figures(ctx, trimap)
    secs = layout.stage_seconds()
    if secs:
        lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in secs.items()]
    text = "\n".join(lines) + "\n"
    atomic_write_text(layout.report, text)
    return text


def learned_lines(ctx: RunContext) -> list[str]:
    """The report's "Learned CRF" section (issue #24): no CRF / the grid's best / the fitted CRF on the search's
    held-out images (``learned.json``), the fitted values, and which CRF the crf stage ran. [] without a fit."""
    try:
        learned = ctx.layout.read_learned()
    except ValueError as exc:  # the report still comes out, and says why this section does not
        return ["", "## Learned CRF", "", f"Not shown: {exc}"]
    if learned is None:
        return []
    scores, objective = learned["held_out_scores"], learned["objective"]
    rec = ctx.layout.read_record("crf") or {}
    used = ("the learned CRF" if rec.get("learned") else f"not the learned CRF ({rec.get('params_from')}; "
            "crf.use_learned / crf.use_search)") if rec and not rec.get("skipped") else "no CRF (the crf stage did not run)"
    share = "held-out" if scores.get("share") == "held_out" else "search (no held-out share: the fit's own)"
    w = scores["trimap_width"]
    lines = ["", f"## Learned CRF (crf_search.learn: {', '.join(learned['learn'])})", "",
             f"Fitted by gradient from the grid's best on the search images (crf_search/learned.json); scored on the "
             f"{scores['images']} {share} images. The crf stage used {used} (its test-set numbers: the tables above).",
             "",
             f"| CRF on the {share} images | mIoU % | pixel acc. % | trimap mIoU % ({w} px) |", "|---|---|---|---|"]
    grid = ", ".join(f"{k} {v:g}" for k, v in learned["grid_best"].items() if k != "iterations")
    names = {"no_crf": "no CRF", "grid_best": f"grid best ({grid})",
             "learned": f"learned w1 {learned['params']['w1']:.4g}, w2 {learned['params']['w2']:.4g}"
                        + (", C x C compatibility" if "compatibility" in learned["learn"] else "")}
    for k, name in names.items():
        m = scores[k]
        lines.append(f"| {name} | {percent(m['miou'])} | {percent(m['pixel_accuracy'])} | {percent(m['trimap_miou'])} |")
    held = objective.get("held_out") or {}
    lines += ["", f"Cross-entropy per labelled pixel (nats), before -> after the fit: fit share "
              f"{objective['fit']['before']:.4f} -> {objective['fit']['after']:.4f}"
              + (f", held-out share {held['before']:.4f} -> {held['after']:.4f}." if held else ".")]
    return lines


def _figures(ctx: RunContext, trimap: dict) -> list[str]:
    """Draw the report's figures into ``figures/`` (PNG, PDF, SVG) and return their markdown section."""
    folder = ctx.layout.root / "figures"
    diag = " (DIAGNOSTIC degraded-GT scores)" if ctx.cfg.test.score_source != "network" else ""
    diag_head = "DIAGNOSTIC degraded-GT scores: " if diag else ""
    lines = ["", "## Figures", "", "PNG for reading, PDF and SVG beside each for papers (`figures/`).", ""]
    rows = qualitative_rows(ctx)
    if rows:
        with_crf = any(r["band_gain"] is not None for r in rows)
        what = (f"where the CRF gained most (top) and lost most (bottom) within {QUALITATIVE_BAND} px of a boundary"
                if with_crf else "the images with the most object pixels")
        qualitative_figure(rows, folder / "qualitative.png", title=f"{diag_head}{what}" if diag_head else what[:1].upper() + what[1:],
                           names=class_names(ctx.cfg.data, ctx.cfg.model.num_classes), palette=palette(ctx.cfg.data))
        lines += [f"Paper Fig. 4 style: image, ground truth, DCNN, DCNN-CRF; {what} (pixel accuracy in the "
                  "trimap band, paper Fig. 5); the colour key names the classes shown.", "",
                  "![qualitative](figures/qualitative.png)", ""]
    results = _search_results(ctx.layout.crf_search / "results.jsonl")
    if results:
        s = ctx.cfg.crf_search.search
        best = ctx.layout.best_params() if ctx.layout.read_best() is not None else None
        name = ({"miou": "mIoU", "trimap_miou": f"trimap mIoU ({s.trimap_width} px)"}.get(s.objective, "objective")
                if isinstance(s.objective, str) else "objective")
        try:
            search_heatmap(results, folder / "crf_search.png", grid=(s.w1, s.sigma_alpha, s.sigma_beta),
                           objective_name=name, title=f"{diag_head}CRF search on the coarse grid: {name} per configuration",
                           best=None if best is None else (best.w1, best.sigma_alpha, best.sigma_beta))
            lines += ["The CRF search on the coarse grid (the refinement's points off it are left out); the red box "
                      "is the search's best, the parameters the CRF used (the title names them, also when the "
                      "refinement put them off this grid); grey cells in parentheses were dropped early by "
                      "successive halving.", "", "![CRF search](figures/crf_search.png)", ""]
        except ValueError:  # no finished configuration on the coarse grid
            pass
    if trimap:
        names = {"dcnn": "DCNN", "crf": "DCNN-CRF"}
        trimap_figure({names[k]: v for k, v in trimap.items() if k in names}, folder / "trimap.png",
                      title=f"{diag_head}trimap, accuracy near object boundaries (paper Fig. 5)")
    return lines


def _search_results(path: Path) -> list[dict]:
    """The finished configurations of ``results.jsonl`` as flat dicts (w1, sigma_alpha, sigma_beta,
    objective); unreadable lines are skipped (the search itself warns about them)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            rows.append({**{k: float(rec["params"][k]) for k in ("w1", "sigma_alpha", "sigma_beta")},
                         "objective": rec.get("objective"), "images": rec.get("images")})
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def qualitative_rows(ctx: RunContext, per_end: int = QUALITATIVE_ROWS, band: int = QUALITATIVE_BAND) -> list[dict]:
    """Rows of the qualitative figure (paper Fig. 4): the ``per_end`` test images where the CRF gained most
    pixel accuracy within ``band`` px of an object boundary (the trimap band, paper Fig. 5) and the
    ``per_end`` where it lost most, gains first (issue #21: the images it changed least were often
    all-background DCNN output that showed nothing). Without CRF predictions: the images with the most
    object pixels. Each row: image ((H, W, 3) uint8 RGB), ``gt``, ``dcnn``, ``crf`` ((H, W) class indices;
    ``crf`` None without it), ``caption`` (id, band accuracy DCNN -> CRF) and ``band_gain`` (points, or
    None). Empty without labels or predictions."""
    samples = [s for s in ctx.test_samples() if s.label is not None
               and ctx.layout.prediction("dcnn", s.id).is_file()]
    if not samples:
        return []
    n = ctx.cfg.model.num_classes
    measured = []
    for s in samples:
        gt = read_label(s.label, n, s.label_map)
        dcnn = read_label(ctx.layout.prediction("dcnn", s.id), n)
        crf_path = ctx.layout.prediction("crf", s.id)
        crf = read_label(crf_path, n) if crf_path.is_file() else None
        in_band = trimap_band(gt, band, band=ctx.cfg.data.trimap_band)
        acc = {}
        for name, pred in (("dcnn", dcnn), ("crf", crf)):
            if pred is not None and in_band.any():
                acc[name] = 100.0 * float(np.mean(pred[in_band] == gt[in_band]))
        gain = acc["crf"] - acc["dcnn"] if len(acc) == 2 else None
        objects = int(np.sum((gt != 0) & (gt != 255)))
        measured.append((s, gt, dcnn, crf, acc, gain, objects))
    with_gain = [i for i, m in enumerate(measured) if m[5] is not None]
    if with_gain:
        order = sorted(with_gain, key=lambda i: -measured[i][5])
        chosen = [i for i in order if measured[i][5] > 0][:per_end]
        chosen += [i for i in reversed(order) if measured[i][5] < 0][:per_end]
        rest = [i for i in order if i not in chosen]  # too few gains or losses: the largest changes after them
        chosen += sorted(rest, key=lambda i: -abs(measured[i][5]))[: max(0, 2 * per_end - len(chosen))]
        picked = sorted((measured[i] for i in chosen), key=lambda m: -m[5])
    else:
        picked = sorted(measured, key=lambda m: -m[6])[: 2 * per_end]
    rows = []
    for s, gt, dcnn, crf, acc, gain, _ in picked:
        caption = s.id
        if gain is not None:
            caption += f"\n{band} px band:\nDCNN {acc['dcnn']:.1f} %\nCRF {acc['crf']:.1f} %"
        rows.append({"image": np.ascontiguousarray(read_image(s.image)[:, :, ::-1]), "gt": gt, "dcnn": dcnn,
                     "crf": crf, "caption": caption, "band_gain": gain, "id": s.id})
    return rows
