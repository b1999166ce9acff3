"""``report.md``: what was run and what it measured, as markdown tables (DCNN vs DCNN-CRF, paper Table 1
and Fig. 5 style). Written by the ``evaluate`` stage.

Reads: ``stages/*.json`` (init, CRF parameters, stage times), ``crf_search/best.json``. Writes: ``report.md``.
"""

from __future__ import annotations

from ..atomic import atomic_write_text
from ..context import RunContext
from ..data.io import VOC_CLASSES

#: Paper Table 1 (VOC 2012 val, trained on train_aug), mIoU % without / with the CRF.
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "deeplab": (59.80, 63.74),
    "deeplab-msc": (61.30, 65.21),
    "deeplab-7x7": (64.38, 67.64),
    "deeplab-largefov": (62.25, 67.64),
    "deeplab-msc-largefov": (64.21, 68.70),
}

_TRIMAP_ROWS = (1, 2, 3, 5, 10, 15, 20, 30, 40)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def write_report(ctx: RunContext, metrics: dict, trimap: dict) -> str:
    """Write ``report.md`` in the run folder atomically and return its text."""
    cfg = ctx.cfg
    layout = ctx.layout
    lines = [f"# DeepLab experiment `{cfg.name}`", ""]
    train_rec = layout.read_record("train")
    init = train_rec.get("init", "unknown") if train_rec is not None else "not trained in this run"
    source = cfg.test.score_source
    lines += [
        f"- model: `{cfg.model.name}` ({cfg.model.num_classes} classes)",
        f"- initial weights: {init}",
        f"- training: {cfg.train.iterations} iterations x {cfg.train.batch_size} crops (iter_size {cfg.train.iter_size}), "
        f"lr {cfg.train.base_lr} ({cfg.train.lr_policy})",
        f"- data: `{cfg.data.root}`, train `{cfg.data.train_list}`, test `{cfg.data.test_list}` ({metrics.get('images')} images)",
    ]
    if source != "network":
        lines.append("- **score source: DIAGNOSTIC degraded ground truth** (not a network; for CRF work only)")
    else:
        lines.append("- score source: the network")
    rec = layout.read_record("crf")
    if rec is not None and not rec.get("skipped"):
        lines.append(f"- CRF: {rec['params']} (from {rec['params_from']}), backend {cfg.crf.backend}")
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
            lines.append(f"| {names[k]} | {_pct(m['miou'])} | {_pct(m['pixel_accuracy'])} | {_pct(m.get('mean_accuracy'))} |")
    if cfg.model.name in PAPER_TABLE1:
        a, b = PAPER_TABLE1[cfg.model.name]
        lines.append(f"| paper Table 1 (full VOC12 val, train_aug) | {a:.2f} / {b:.2f} with CRF | | |")
    lines += ["", "## Per-class IoU %", "", "| class | " + " | ".join(names[k] for k in ("dcnn", "crf") if k in metrics) + " |",
              "|---|" + "---|" * sum(k in metrics for k in ("dcnn", "crf"))]
    for i, cls in enumerate(VOC_CLASSES[: cfg.model.num_classes]):
        vals = [_pct(metrics[k]["per_class_iou"][i]) for k in ("dcnn", "crf") if k in metrics]
        lines.append(f"| {cls} | " + " | ".join(vals) + " |")
    if trimap:
        first = next(iter(trimap.values()))
        widths = first["widths"]
        rows = [w for w in _TRIMAP_ROWS if w in widths] or widths
        lines += ["", "## Trimap (accuracy within a band of w pixels around object boundaries; paper Fig. 5)", "",
                  "| width px | " + " | ".join(f"{names[k]} pixel acc. % | {names[k]} mIoU %" for k in trimap) + " |",
                  "|---|" + "---|---|" * len(trimap)]
        for w in rows:
            i = widths.index(w)
            cells = " | ".join(f"{_pct(trimap[k]['pixel_accuracy'][i])} | {_pct(trimap[k]['miou'][i])}" for k in trimap)
            lines.append(f"| {w} | {cells} |")
        lines += ["", "![trimap](trimap.png)"]
    secs = layout.stage_seconds()
    if secs:
        lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in secs.items()]
    text = "\n".join(lines) + "\n"
    atomic_write_text(layout.report, text)
    return text
