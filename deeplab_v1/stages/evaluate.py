"""The ``evaluate`` stage: the VOC protocol (one confusion matrix over the split, 255 ignored) and the
trimap (paper Fig. 5; its band is ``data.trimap_band``), DCNN vs DCNN-CRF, then ``report.md``.

Reads: ``predictions/dcnn/``, ``predictions/crf/`` (when the CRF ran), the test labels. Writes:
``metrics.json``, ``trimap.json``, ``trimap.png`` and, through ``stages.report``, ``report.md`` and
``figures/``. An evaluation first removes those of an earlier one, and checks that every prediction of every
method is there before it reads any: a finished crf stage whose predictions are gone is an error, never a
report without its CRF row (issue #20).
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

    The methods: DCNN, and DCNN-CRF when ``crf.enabled`` and the crf stage finished (or left predictions).

    Raises:
        StageError: predictions are missing (how many, the first one, and the command that rebuilds them),
            before any metric is computed; the outputs of an earlier evaluation are gone by then.
    """
    cfg = ctx.cfg
    n = cfg.model.num_classes
    widths = cfg.evaluation.trimap_widths
    ctx.layout.clear_outputs("evaluate")  # neither a redone nor a failed evaluation leaves older numbers
    samples = ctx.test_samples()
    methods = {"dcnn": ctx.layout.predictions("dcnn")}
    crf_record = ctx.layout.read_record("crf")
    crf_ran = crf_record is not None and not crf_record.get("skipped")
    if cfg.crf.enabled and (crf_ran or ctx.layout.predictions("crf").is_dir()):
        methods["crf"] = ctx.layout.predictions("crf")
    for k, folder in methods.items():
        missing = [p for s in samples if not (p := folder / f"{s.id}.png").is_file()]
        if missing:
            stage = "test" if k == "dcnn" else "crf"
            raise StageError(f"evaluate: {len(missing)} of {len(samples)} {METHODS[k]} predictions are missing "
                             f"(e.g. {missing[0]}); rebuild them with `deeplab {stage} EXPERIMENT --redo` or "
                             f"`deeplab run EXPERIMENT --redo {stage}`")
    conf = {k: ConfusionAccumulator(n) for k in methods}
    tri = {k: TrimapAccumulator(widths, n, band=cfg.data.trimap_band) for k in methods}
    for s in tqdm(samples, desc="evaluate", disable=not ctx.progress, dynamic_ncols=True):
        gt = read_label(s.label, n, s.label_map)
        for k, folder in methods.items():
            pred = read_label(folder / f"{s.id}.png", n)
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
