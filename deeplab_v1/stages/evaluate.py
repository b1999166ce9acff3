"""The ``evaluate`` stage: the VOC protocol (one confusion matrix over the split, 255 ignored) and the
trimap (paper Fig. 5; its band is ``data.trimap_band``), DCNN vs DCNN-CRF, then ``report.md``.

Reads: ``predictions/dcnn/``, ``predictions/crf/`` (when the CRF ran), the test labels. Writes:
``metrics.json``, ``trimap.json``, ``trimap.png`` and, through ``stages.report``, ``report.md``.
"""

from __future__ import annotations

from tqdm import tqdm

from ..atomic import atomic_write_json
from ..context import RunContext, StageError
from ..data.io import read_label
from ..data.layouts import class_names
from ..evaluation.metrics import ConfusionAccumulator
from ..evaluation.plots import plot_trimap
from ..evaluation.trimap import TrimapAccumulator
from . import report

#: Method keys of the outputs and their names in tables and plots.
METHODS: dict[str, str] = {"dcnn": "DCNN", "crf": "DCNN-CRF"}


def run(ctx: RunContext) -> dict:
    """Evaluate every method's predictions; returns the mIoU of each for the stage record.

    Raises:
        StageError: a prediction is missing (names the file and the stage that writes it).
    """
    cfg = ctx.cfg
    n = cfg.model.num_classes
    widths = cfg.evaluation.trimap_widths
    samples = ctx.test_samples()
    methods = {"dcnn": ctx.layout.predictions("dcnn")}
    if cfg.crf.enabled and ctx.layout.predictions("crf").is_dir():
        methods["crf"] = ctx.layout.predictions("crf")
    conf = {k: ConfusionAccumulator(n) for k in methods}
    tri = {k: TrimapAccumulator(widths, n, band=cfg.data.trimap_band) for k in methods}
    for s in tqdm(samples, desc="evaluate", disable=not ctx.progress, dynamic_ncols=True):
        gt = read_label(s.label, n, s.label_map)
        for k, folder in methods.items():
            p = folder / f"{s.id}.png"
            if not p.is_file():
                raise StageError(f"evaluate: missing prediction {p}; run the {'test' if k == 'dcnn' else 'crf'} stage")
            pred = read_label(p, n)
            conf[k].update(gt, pred)
            tri[k].update(gt, pred)
    metrics = {k: conf[k].metrics(json_safe=True) for k in methods}
    metrics["images"] = len(samples)
    metrics["class_names"] = class_names(cfg.data, n)
    metrics["score_source"] = cfg.test.score_source
    atomic_write_json(ctx.layout.metrics, metrics)
    trimap = {k: tri[k].result() for k in methods}
    atomic_write_json(ctx.layout.trimap, {**trimap, "score_source": cfg.test.score_source})
    diag = " (diagnostic degraded-GT scores)" if cfg.test.score_source != "network" else ""
    plot_trimap({METHODS[k] + diag: v for k, v in trimap.items()}, ctx.layout.trimap_plot,
                title=f"{'DIAGNOSTIC degraded-GT scores: ' if diag else ''}{cfg.name}: trimap, "
                      f"{cfg.data.trimap_band} band (paper Fig. 5)")
    report.write_report(ctx, metrics, trimap)
    return {k: (None if metrics[k]["miou"] is None else round(metrics[k]["miou"], 6)) for k in methods}
