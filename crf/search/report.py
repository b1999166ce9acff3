"""What the search reports: the ranking of its configurations, ``ranked.md``, ``heatmap.png`` and
``best.json`` (all written atomically, by rank 0, with ``crf.atomic``)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..confusion import percent
from ..errors import CRFInputError
from ..params import CRFParams
from .config import SearchConfig, param_key

__all__ = ["rank_key", "best_of", "ranked_rows", "ranked_markdown", "heatmap_cells", "heatmap_figure", "heatmap_png", "best_json", "write_outputs"]


def rank_key(rec: dict) -> tuple:
    """Sort key of a record: measured objectives first, those scored on more images first (successive
    halving's finalists before the configurations it dropped), highest objective first; ties by w1,
    sigma_alpha, sigma_beta."""
    obj = rec.get("objective")
    p = rec["params"]
    return (0 if obj is not None else 1, -int(rec.get("images", 0)), -(obj if obj is not None else 0.0), p["w1"],
            p["sigma_alpha"], p["sigma_beta"])


def best_of(records: dict[tuple, dict], keys: Sequence[tuple]) -> CRFParams:
    """The best configuration among ``records[k]`` for ``k`` in ``keys``."""
    best = min((records[k] for k in keys), key=rank_key)
    return CRFParams.from_dict(best["params"])


def ranked_rows(records: dict[tuple, dict], round_of: dict[tuple, int]) -> list[dict]:
    """The rows of :class:`~crf.search.run.SearchResult`: the configurations of ``round_of``, best first."""
    recs = sorted((records[k] for k in round_of), key=rank_key)
    rows = []
    for rank, rec in enumerate(recs, start=1):
        p = rec["params"]
        rows.append({"rank": rank, **p, "objective": rec.get("objective"), "miou": rec.get("miou"),
                     "pixel_accuracy": rec.get("pixel_accuracy"),
                     "round": round_of[param_key(CRFParams.from_dict(p))], "seconds": rec.get("seconds"),
                     "images": rec.get("images"), "crf_runs": rec.get("crf_runs", rec.get("images"))})
    return rows


def ranked_markdown(rows: list[dict], key: dict, images: int, callable_objective: bool, label: str = "") -> str:
    """``ranked.md``: the search's key and every configuration, best first."""
    obj_head = "objective" if callable_objective else f"objective ({key['objective_name']}, %)"
    fixed = key["fixed"]
    lines = [
        "# CRF parameter search (DeepLab v1 Sec. 5), best first",
        "",
        *([f"- scores: **{label}**"] if label else []),
        f"- images: {images} (subset {key['subset_hash']})",
        f"- objective: {key['objective_name']}; backend: {key['backend']}",
        "- configurations scored on fewer images were dropped by successive halving (ranked after the others)",
        f"- fixed: w2 = {fixed['w2']:g}, sigma_gamma = {fixed['sigma_gamma']:g} pixels, "
        f"{fixed['iterations']} mean-field iterations",
        "",
        f"| rank | w1 | sigma_alpha | sigma_beta | {obj_head} | mIoU (%) | pixel acc (%) | round | images |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        obj = r["objective"]
        obj_s = "n/a" if obj is None else (f"{obj:.6g}" if callable_objective else f"{100 * obj:.2f}")
        lines.append(f"| {r['rank']} | {r['w1']:g} | {r['sigma_alpha']:g} | {r['sigma_beta']:g} | {obj_s} | "
                     f"{percent(r['miou'])} | {percent(r['pixel_accuracy'])} | {r['round']} | {r['images']} |")
    return "\n".join(lines) + "\n"


def _key(r: Mapping) -> tuple[float, float, float]:
    return float(r["w1"]), float(r["sigma_alpha"]), float(r["sigma_beta"])


def heatmap_cells(results: Sequence[Mapping], *, grid: Sequence[Sequence[float]] | None = None,
                  best: tuple[float, float, float] | None = None, percent: bool = True) -> dict:
    """What the search heatmap draws, cell by cell (the data ``heatmap_figure`` draws and the tests check).

    ``results.jsonl`` of a successive-halving search holds one line per configuration and rung (a finalist
    scored on 1, then 3, then 6 images has three lines): each configuration is shown once, with its score on
    the most images it reached. A configuration is *dropped* when that is fewer images than the most any
    configuration of the search reached (successive halving stopped it early; issue #21).

    Args:
        results: mappings with ``w1``, ``sigma_alpha``, ``sigma_beta``, ``objective`` (a fraction 0..1 when
            ``percent``; None: failed, left out) and optional ``images`` (how many it was scored on).
        grid: (w1 values, sigma_alpha values, sigma_beta values) to draw (e.g. the coarse grid; the
            refinement's points off it are left out); default: every value the results hold.
        best: (w1, sigma_alpha, sigma_beta) of the search's best (``best.json``: what the CRF uses);
            default: the best of those scored on the most images, among all results (on the grid or not).
        percent: values x 100.

    Returns:
        ``{"w1s", "alphas", "betas"}`` (sorted axis values), ``"cells"``: (w1, sigma_alpha, sigma_beta) ->
        ``{"value": objective (x 100 when percent), "images": int, "dropped": bool, "text": the cell's label,
        "(v)" when dropped}``, ``"most"`` (images of the finalists; 0 when the results do not say),
        ``"best"`` (the triple), ``"best_on_grid"`` (bool) and ``"best_row"`` (its merged result, or None).

    Raises:
        CRFInputError (a ValueError): no configuration with an objective (on the grid).
    """
    merged: dict[tuple, Mapping] = {}
    for r in results:
        if r.get("objective") is None:
            continue
        k = _key(r)
        if k not in merged or int(r.get("images") or 0) >= int(merged[k].get("images") or 0):
            merged[k] = r  # the score on the most images (the later line on a tie)
    if not merged:
        raise CRFInputError("search heatmap: no configuration with an objective")
    most = max(int(r.get("images") or 0) for r in merged.values())
    if best is None:
        top = max(merged.values(), key=lambda r: (int(r.get("images") or 0), r["objective"]))
        best = _key(top)
    best = (float(best[0]), float(best[1]), float(best[2]))
    shown = merged
    if grid is not None:
        on = [set(float(v) for v in values) for values in grid]
        shown = {k: r for k, r in merged.items() if all(k[i] in on[i] for i in range(3))}
    if not shown:
        raise CRFInputError("search heatmap: no configuration with an objective on the grid")
    scale = 100.0 if percent else 1.0
    # a spread under 1 point among the cells compared by colour (the finalists) needs the 2nd digit
    values = [scale * r["objective"] for r in shown.values() if int(r.get("images") or 0) == most]
    digits = 2 if values and max(values) - min(values) < 1 else 1
    cells = {}
    for k, r in shown.items():
        images = int(r.get("images") or 0)
        dropped = images < most
        v = scale * r["objective"]
        text = f"{v:.{digits}f}"
        cells[k] = {"value": v, "images": images, "dropped": dropped, "text": f"({text})" if dropped else text}
    return {"w1s": sorted({k[0] for k in shown}), "alphas": sorted({k[1] for k in shown}),
            "betas": sorted({k[2] for k in shown}), "cells": cells, "most": most, "best": best,
            "best_on_grid": best in shown, "best_row": merged.get(best)}


def heatmap_figure(results: Sequence[Mapping], *, grid: Sequence[Sequence[float]] | None = None,
                   objective_name: str = "mIoU", title: str | None = None,
                   best: tuple[float, float, float] | None = None, percent: bool = True):
    """The CRF search as heatmaps that can be read (the one drawing of the search: ``heatmap.png`` here,
    the report's ``figures/crf_search.*`` in deeplab_v1): one panel per w1, sigma_beta across, sigma_alpha
    down, each cell labelled with its objective, the search's best (the parameters the CRF uses) outlined
    in red and named in the title, also when the refinement put it off the drawn grid. Configurations that
    successive halving dropped early (scored on fewer images, so not comparable) are grey, their value in
    parentheses; the colours span the finalists only.

    Args:
        results, grid, best, percent: as :func:`heatmap_cells`'s.
        objective_name: what ``objective`` is (the colour bar's label; keep it short).
        title: the first line of the title (default: one naming the objective); the lines on the best and
            on dropped configurations follow it.

    Returns:
        A ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no global backend switch); its size
        follows the grid (about 0.75 x 0.5 inch per cell).

    Raises:
        CRFInputError (a ValueError): no configuration with an objective (on the grid).
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    data = heatmap_cells(results, grid=grid, best=best, percent=percent)
    w1s, alphas, betas, cells, best = data["w1s"], data["alphas"], data["betas"], data["cells"], data["best"]
    full = [c["value"] for c in cells.values() if not c["dropped"]]
    lo, hi = (min(full), max(full)) if full else (0.0, 1.0)
    ncols = min(len(w1s), 3)
    nrows = math.ceil(len(w1s) / ncols)
    cw, ch = 0.75, 0.5  # inches per cell: room for a 10 pt label
    width = max(5.5, ncols * (len(betas) * cw + 1.0) + 1.4)
    unit = "%" if percent else ""
    lines = [title or f"CRF search: {objective_name} per configuration"]
    row = data["best_row"]
    where = "red box" if data["best_on_grid"] else "refined, off this grid"
    score = "" if row is None else (f", {objective_name} {(100 if percent else 1) * row['objective']:.2f}{' %' if percent else ''}"
                                    + (f" on {int(row['images'])} images" if row.get("images") else ""))
    lines.append(f"best ({where}; the CRF's parameters): w1={best[0]:g}, sigma_alpha={best[1]:g}, "
                 f"sigma_beta={best[2]:g}{score}")
    dropped = sorted({c["images"] for c in cells.values() if c["dropped"]})
    if dropped:
        lines.append(f"grey (x): dropped early by successive halving, scored on {'/'.join(map(str, dropped))} of "
                     f"{data['most']} images, not comparable")
    chars = int(width * 72 / (10 * 0.6))  # about 0.6 em per character at 10 pt
    text = "\n".join(textwrap.fill(line, chars) for line in lines)
    fig = Figure(figsize=(width, nrows * (len(alphas) * ch + 1.1) + 0.25 * (text.count("\n") + 1) + 0.9),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    image = None
    grey = ListedColormap(["#d9d9d9"])
    for i, (ax, w) in enumerate(zip(axes, w1s)):
        g = np.full((len(alphas), len(betas)), np.nan)
        d = np.full_like(g, np.nan)
        for (cw1, a, b), c in cells.items():
            if cw1 == w:
                (d if c["dropped"] else g)[alphas.index(a), betas.index(b)] = c["value"]
        ax.imshow(d, cmap=grey, aspect="auto")
        image = ax.imshow(g, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, aspect="auto")
        for (cw1, a, b), c in cells.items():
            if cw1 == w:
                light = c["dropped"] or (hi <= lo) or (c["value"] - lo) / (hi - lo) > 0.6
                ax.text(betas.index(b), alphas.index(a), c["text"], ha="center", va="center", fontsize=10,
                        color="black" if light else "white")
        if data["best_on_grid"] and best[0] == w:
            a, b = alphas.index(best[1]), betas.index(best[2])
            ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas], fontsize=10)
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=10)
        if i + ncols >= len(w1s):  # the bottom panel of its column
            ax.set_xlabel("sigma_beta (RGB)", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("sigma_alpha (px)", fontsize=10)
        ax.set_title(f"w1 = {w:g}", fontsize=11)
    for ax in axes[len(w1s):]:
        ax.set_visible(False)
    if image is not None and full:
        # below the panels: a long objective name runs along the figure's width, never past its edge
        bar = fig.colorbar(image, ax=list(axes[: len(w1s)]), location="bottom", shrink=0.6, aspect=40)
        bar.set_label(f"{objective_name} {unit}".strip(), fontsize=10)
        bar.ax.locator_params(nbins=5)
    fig.suptitle(text, fontsize=10)
    return fig


def heatmap_png(config: SearchConfig, records: dict[tuple, dict], best: CRFParams) -> bytes:
    """``heatmap.png`` of the coarse grid: ``heatmap_figure`` of the records (those scored on fewer images
    than the most, dropped by successive halving, grey and in parentheses), ``best`` outlined and named in
    the title, whose first line names the scores (``config.label``, e.g. DIAGNOSTIC degraded ground truth)."""
    rows = [{**rec["params"], "objective": rec.get("objective"), "images": rec.get("images")}
            for rec in records.values()]
    percent = not callable(config.objective)
    first = f"CRF search on the coarse grid: {config.objective_name}{' (%)' if percent else ''} per configuration"
    fig = heatmap_figure(rows, grid=(config.w1, config.sigma_alpha, config.sigma_beta),
                         objective_name=config.objective_name, percent=percent,
                         title=f"{config.label}: {first}" if config.label else first,
                         best=(best.w1, best.sigma_alpha, best.sigma_beta))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def best_json(best: CRFParams, best_rec: dict, key: dict, config: SearchConfig, images: int,
              configurations: int, run_info: dict | None = None, images_scored: dict | None = None) -> dict:
    """``best.json``: ``CRFParams.to_dict()`` of the best configuration at the top level (what
    ``crf.CRFParams.from_dict`` of its parameter keys gives back) plus its scores, the search's key, the
    backend that ran (``backend``; ``backend_requested`` e.g. ``auto``, and why), the strategy, the
    (configuration, image) CRF runs made (``crf_runs``; ``crf_runs_grid`` for every configuration on
    every image) and ``images_scored`` (images -> number of configurations scored on that many)."""
    return {**best.to_dict(), "objective": best_rec.get("objective"), "objective_name": key["objective_name"],
            "miou": best_rec.get("miou"), "pixel_accuracy": best_rec.get("pixel_accuracy"),
            "subset_hash": key["subset_hash"], "images": images, "configurations": configurations,
            "backend": key["backend"], **(run_info or {}), **({"images_scored": images_scored} if images_scored else {}),
            **({"scores": config.label} if config.label else {})}


def write_outputs(out_dir: Path, config: SearchConfig, key: dict, records: dict[tuple, dict], rows: list[dict],
                  best: CRFParams, images: int, run_info: dict | None = None) -> None:
    """Write ``ranked.md``, ``heatmap.png`` and ``best.json`` into ``out_dir``, atomically."""
    table = ranked_markdown(rows, key, images, callable(config.objective), config.label)
    atomic_write_text(out_dir / "ranked.md", table)
    atomic_write_bytes(out_dir / "heatmap.png", heatmap_png(config, records, best))
    scored: dict[str, int] = {}
    for r in rows:
        scored[str(r["images"])] = scored.get(str(r["images"]), 0) + 1
    atomic_write_json(out_dir / "best.json", best_json(best, records[param_key(best)], key, config, images, len(rows),
                                                       run_info, dict(sorted(scored.items(), key=lambda x: -int(x[0])))))
