"""Trimap curves (paper Fig. 5): pixel accuracy and mIoU against the band width, one curve per method."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_file

__all__ = ["plot_trimap"]


def _values(values: list) -> list[float]:
    # None marks an empty band; matplotlib leaves a gap for NaN
    return [float("nan") if v is None else 100.0 * float(v) for v in values]


def plot_trimap(results: dict[str, dict], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Write the trimap figure as a PNG, atomically.

    Args:
        results: method name (e.g. ``"DCNN"``, ``"DCNN-CRF"``) -> ``TrimapAccumulator.result()``
            (``widths``, ``pixel_accuracy``, ``miou``; fractions 0..1, None for empty bands).
        path: the ``.png`` to write; parent folders are created.
        title: optional figure title.

    Raises:
        ValueError: no results, or a result without ``widths``/``pixel_accuracy``/``miou`` of equal length.
    """
    if not results:
        raise ValueError("plot_trimap: no results to plot")
    for name, r in results.items():
        missing = [k for k in ("widths", "pixel_accuracy", "miou") if k not in r]
        if missing:
            raise ValueError(f"plot_trimap: result {name!r} lacks {missing}")
        if not len(r["widths"]) == len(r["pixel_accuracy"]) == len(r["miou"]):
            raise ValueError(f"plot_trimap: result {name!r} has curves of different lengths")
    path = Path(path)
    # a bare Figure on the Agg canvas: no pyplot global state, no display needed
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for name, r in results.items():
        axes[0].plot(r["widths"], _values(r["pixel_accuracy"]), marker=".", label=name)
        axes[1].plot(r["widths"], _values(r["miou"]), marker=".", label=name)
    for ax, ylabel in zip(axes, ("pixelwise accuracy %", "mean IOU %")):
        ax.set_xlabel("trimap width (pixels)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
