"""``deeplab compare RUN_DIR... [--out DIR]``: runs side by side, as the paper's Table 1 and Fig. 5 put
DeepLab and DeepLab-CRF of several variants together.

Reads each run's ``metrics.json`` and ``trimap.json`` (the ``evaluate`` stage). Writes ``DIR/compare.md``
(one markdown table: a column per run and method -- DCNN, DCNN-CRF -- and a row per measure: mIoU, pixel
accuracy, mean accuracy, the trimap at a few widths, the IoU of every class some run saw) and ``DIR/trimap.png``
(``.pdf``, ``.svg``): every run's trimap curves in one figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from crf.confusion import percent

from .atomic import atomic_write_text
from .errors import DeepLabError
from .figures import class_names, trimap_figure
from .layout import RunLayout

__all__ = ["CompareError", "TRIMAP_WIDTHS", "RunResult", "read_run", "compare_table", "trimap_curves", "compare_title",
           "compare_runs"]

#: Trimap widths (pixels) shown in the table, where the runs measured them.
TRIMAP_WIDTHS: tuple[int, ...] = (1, 3, 5, 10, 20, 40)
#: Method keys of metrics.json / trimap.json and their names.
METHODS: dict[str, str] = {"dcnn": "DCNN", "crf": "DCNN-CRF"}


class CompareError(DeepLabError, ValueError):
    """A run folder that cannot be compared (missing, not evaluated, unreadable files); names the file."""


class RunResult:
    """One evaluated run: ``label`` (its folder name), ``metrics`` (metrics.json), ``trimap`` (trimap.json,
    or an empty dict when absent), ``diagnostic`` (scores from degraded ground truth)."""

    def __init__(self, label: str, metrics: dict, trimap: dict) -> None:
        self.label = label
        self.metrics = metrics
        self.trimap = trimap
        self.diagnostic = metrics.get("score_source", "network") != "network"

    @property
    def methods(self) -> list[str]:
        """The method keys the run evaluated, DCNN first."""
        return [k for k in METHODS if k in self.metrics]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: not found; {what}") from None
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: not readable JSON ({exc})") from exc


def read_run(run_dir: str | Path, label: Optional[str] = None) -> RunResult:
    """Read one run folder's ``metrics.json`` and ``trimap.json``.

    Raises:
        CompareError: the folder does not exist or has no ``metrics.json`` (not evaluated yet), or a file
            is not readable JSON.
    """
    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise CompareError(f"{layout.root}: no such run folder")
    metrics = _read_json(layout.metrics, "run `deeplab evaluate` on this run first")
    if not any(k in metrics for k in METHODS):
        raise CompareError(f"{layout.metrics}: holds neither 'dcnn' nor 'crf' metrics")
    trimap = _read_json(layout.trimap, "") if layout.trimap.is_file() else {}
    return RunResult(label or layout.root.name, metrics, trimap)


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, with the parent's name added where two runs share one."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def _at(curve: dict, key: str, width: int):
    widths = curve.get("widths", [])
    return curve[key][widths.index(width)] if width in widths else None


def compare_table(runs: Sequence[RunResult], widths: Sequence[int] = TRIMAP_WIDTHS) -> str:
    """The one markdown table: a column per (run, method), a row per measure, values in %.

    Trimap rows are the ``widths`` that some run measured; a run without that width shows ``n/a``.
    """
    cols = [(r, k) for r in runs for k in r.methods]
    head = [f"{r.label} {METHODS[k]}" + (" (DIAGNOSTIC)" if r.diagnostic else "") for r, k in cols]
    lines = ["| measure % | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]

    def row(name: str, values) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    for key, name in (("miou", "**mIoU**"), ("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean accuracy")):
        row(name, [percent(r.metrics[k].get(key)) for r, k in cols])
    measured = sorted({w for r in runs for k in r.methods for w in r.trimap.get(k, {}).get("widths", [])})
    for key, name in (("pixel_accuracy", "trimap pixel acc."), ("miou", "trimap mIoU")):
        for w in (w for w in widths if w in measured):
            row(f"{name}, {w} px", [percent(_at(r.trimap.get(k, {}), key, w)) for r, k in cols])
    n = max(len(r.metrics[k].get("per_class_iou", [])) for r, k in cols)
    named = [r.metrics["class_names"] for r in runs if len(r.metrics.get("class_names") or []) == n]
    for i, cls in enumerate(named[0] if named else class_names(n)):  # the dataset's names (data.class_names)
        values = []
        for r, k in cols:
            per_class = r.metrics[k].get("per_class_iou", [])
            values.append(percent(per_class[i]) if i < len(per_class) else "n/a")
        if any(v != "n/a" for v in values):  # a class in no run's images nor predictions has no IoU anywhere
            row(f"IoU {cls}", values)
    return "\n".join(lines) + "\n"


def trimap_curves(runs: Sequence[RunResult]) -> dict[str, dict]:
    """The compare figure's curves: ``"<run> <method>"`` -> the run's trimap result, `` (DIAGNOSTIC)``
    added to the label of a run scored on degraded ground truth (issue #21: the legend must say so)."""
    return {f"{r.label} {METHODS[k]}" + (" (DIAGNOSTIC)" if r.diagnostic else ""): r.trimap[k]
            for r in runs for k in r.methods if k in r.trimap}


def compare_title(runs: Sequence[RunResult]) -> str:
    """The compare figure's title; it opens with DIAGNOSTIC and names the runs when some run's scores are
    degraded ground truth, not a network."""
    title = "Trimap: accuracy near object boundaries (dashed DCNN, solid DCNN-CRF)"
    diag = [r.label for r in runs if r.diagnostic]
    if not diag:
        return title
    which = "every run" if len(diag) == len(runs) else ", ".join(diag)
    return f"DIAGNOSTIC ({which}: degraded-GT scores, not a network)\n{title}"


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> tuple[str, list[Path]]:
    """Compare evaluated runs: write ``out/compare.md`` and the trimap figure ``out/trimap.png`` (+ PDF, SVG).

    Args:
        run_dirs: two or more run folders (one is allowed: its DCNN vs DCNN-CRF).
        out: the output folder (created).

    Returns:
        (the markdown text, the files written).

    Raises:
        CompareError: no run given, or a run that cannot be read (all read before anything is written).
    """
    if not run_dirs:
        raise CompareError("no run folder given")
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(p, label) for p, label in zip(paths, _labels(paths))]
    out = Path(out)
    table = compare_table(runs)
    diag = [r.label for r in runs if r.diagnostic]
    lines = ["# Runs compared", "",
             "Values in % on each run's own test images (VOC protocol: one confusion matrix per run, 255 "
             "ignored); the trimap rows count only pixels within w px of an object boundary (paper Fig. 5).", ""]
    if diag:
        lines += [f"**DIAGNOSTIC**: {', '.join(diag)} scored degraded ground truth, not a network.", ""]
    lines += ["| run | folder | images |", "|---|---|---:|"]
    lines += [f"| {r.label} | `{p}` | {r.metrics.get('images', 'n/a')} |" for r, p in zip(runs, paths)]
    lines += ["", table, "![trimap of every run](trimap.png)", ""]
    text = "\n".join(lines)
    written = [out / "compare.md"]
    atomic_write_text(out / "compare.md", text)
    curves = trimap_curves(runs)
    if curves:
        written += trimap_figure(curves, out / "trimap.png", title=compare_title(runs))
    return text, written
