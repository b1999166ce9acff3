"""Trimap curves (paper Fig. 5): pixel accuracy and mIoU against the band width, one curve per (run,
method); the one drawing of them (``trimap.png`` of a run here, the report's and ``deeplab compare``'s
figures through ``deeplab_v1.figures.trimap_figure``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_file

__all__ = ["draw_trimap", "plot_trimap"]

#: The method words of a curve's label; a curve whose label holds ``DCNN`` (not ``DCNN-CRF``) is dashed.
_METHOD_WORDS = ("DCNN-CRF", "DCNN")


def _values(values: list) -> list[float]:
    # None marks an empty band; matplotlib leaves a gap for NaN
    return [float("nan") if v is None else 100.0 * float(v) for v in values]


def _run_and_method(label: str) -> tuple[str, str]:
    """``"run-a DCNN-CRF (DIAGNOSTIC)"`` -> ``("run-a (DIAGNOSTIC)", "DCNN-CRF")``: the curve's colour goes
    by the run, its line style by the method."""
    words = label.split()
    for i in range(len(words) - 1, -1, -1):
        if words[i] in _METHOD_WORDS:
            return " ".join(words[:i] + words[i + 1:]), words[i]
    return label, ""


def draw_trimap(curves: Mapping[str, Mapping], *, title: str | None = None) -> Figure:
    """The trimap figure: two panels (pixel accuracy %, mIoU % against the trimap width in pixels), one
    curve per label, one colour per run, DCNN dashed and DCNN-CRF solid, one legend below the panels (off
    the curves). 11 x 4.8 inches plus the legend's rows: a page's width at 110 dpi.

    Args:
        curves: label (e.g. ``"DCNN"``, ``"run-a DCNN-CRF (DIAGNOSTIC)"``) -> ``TrimapAccumulator.result()``
            (``widths``, ``pixel_accuracy``, ``miou``; fractions 0..1, None for empty bands).
        title: the figure's title (say DIAGNOSTIC here for degraded-GT scores).

    Returns:
        A ``Figure`` on the Agg canvas (constrained layout).

    Raises:
        ValueError: no curves, or a curve without ``widths``/``pixel_accuracy``/``miou`` of equal length.
    """
    if not curves:
        raise ValueError("trimap figure: no results to plot")
    for name, r in curves.items():
        missing = [k for k in ("widths", "pixel_accuracy", "miou") if k not in r]
        if missing:
            raise ValueError(f"trimap figure: curve {name!r} lacks {missing}")
        if not len(r["widths"]) == len(r["pixel_accuracy"]) == len(r["miou"]):
            raise ValueError(f"trimap figure: curve {name!r} has curves of different lengths")
    ncols = min(len(curves), 4)
    fig = Figure(figsize=(11, 4.8 + 0.25 * ((len(curves) + ncols - 1) // ncols)), layout="constrained")
    FigureCanvasAgg(fig)  # a bare Figure on the Agg canvas: no pyplot global state, no display needed
    axes = fig.subplots(1, 2)
    colours: dict[str, str] = {}
    for label, r in curves.items():
        run, method = _run_and_method(label)
        colour = colours.setdefault(run, f"C{len(colours) % 10}")
        style = "--" if method == "DCNN" else "-"
        for ax, key in zip(axes, ("pixel_accuracy", "miou")):
            ax.plot(r["widths"], _values(r[key]), style, color=colour, marker=".", label=label)
    for ax, ylabel in zip(axes, ("pixelwise accuracy %", "mean IOU %")):
        ax.set_xlabel("trimap width (pixels)", fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    try:  # matplotlib >= 3.7: below the panels, the layout makes room for it
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=9)
    except ValueError:  # pragma: no cover - matplotlib 3.6: right of the second panel
        axes[1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_trimap(results: dict[str, dict], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Write the trimap figure (:func:`draw_trimap`) as a PNG, atomically.

    Args:
        results: method name (e.g. ``"DCNN"``, ``"DCNN-CRF"``) -> ``TrimapAccumulator.result()``.
        path: the ``.png`` to write; parent folders are created.
        title: optional figure title.

    Raises:
        ValueError: as :func:`draw_trimap`'s.
    """
    fig = draw_trimap(results, title=title)
    with atomic_file(Path(path)) as f:
        fig.savefig(f, format="png", dpi=110)
