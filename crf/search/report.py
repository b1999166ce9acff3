"""What the search reports: the ranking of its configurations, ``ranked.md``, ``heatmap.png`` and
``best.json`` (all written atomically, by rank 0, with ``crf.atomic``)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..errors import CRFInputError
from ..params import CRFParams
from .config import SearchConfig, param_key

__all__ = ["rank_key", "best_of", "ranked_rows", "ranked_markdown", "heatmap_figure", "heatmap_png", "best_json", "write_outputs"]


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


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


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
                     f"{_fmt_pct(r['miou'])} | {_fmt_pct(r['pixel_accuracy'])} | {r['round']} | {r['images']} |")
    return "\n".join(lines) + "\n"


def heatmap_figure(results: Sequence[Mapping], *, grid: Sequence[Sequence[float]] | None = None,
                   objective_name: str = "mIoU", title: str | None = None,
                   best: tuple[float, float, float] | None = None, percent: bool = True):
    """The CRF search as heatmaps that can be read (the one drawing of the search: ``heatmap.png`` here,
    the report's ``figures/crf_search.*`` in deeplab_v1): one panel per w1, sigma_beta across, sigma_alpha
    down, each cell labelled with its objective in large type, the best cell outlined in red.

    Args:
        results: one mapping per configuration with ``w1``, ``sigma_alpha``, ``sigma_beta`` and
            ``objective`` (a fraction 0..1 when ``percent``, or None for a failed configuration), e.g. the
            lines of ``results.jsonl``; optional ``images`` (how many it was scored on: those scored on
            fewer than the most, dropped by successive halving, are shown in parentheses).
        grid: (w1 values, sigma_alpha values, sigma_beta values) to draw, e.g. the coarse grid (the
            refinement's points off it are left out); default: every value the results hold.
        objective_name: what ``objective`` is (for the colour bar).
        title: the figure's title (default: one naming the objective).
        best: (w1, sigma_alpha, sigma_beta) to outline; default: the best of those scored on most images.
        percent: show objectives x 100 (false for a callable objective's own scale).

    Returns:
        A ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no global backend switch).

    Raises:
        CRFInputError (a ValueError): no configuration with an objective (on the grid).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = [r for r in results if r.get("objective") is not None]
    if grid is not None:
        on = [set(float(v) for v in values) for values in grid]
        rows = [r for r in rows if float(r["w1"]) in on[0] and float(r["sigma_alpha"]) in on[1]
                and float(r["sigma_beta"]) in on[2]]
    if not rows:
        raise CRFInputError("search heatmap: no configuration with an objective")
    scale = 100.0 if percent else 1.0
    w1s = sorted({float(r["w1"]) for r in rows})
    alphas = sorted({float(r["sigma_alpha"]) for r in rows})
    betas = sorted({float(r["sigma_beta"]) for r in rows})
    grids = {w: np.full((len(alphas), len(betas)), np.nan) for w in w1s}
    for r in rows:
        grids[float(r["w1"])][alphas.index(float(r["sigma_alpha"])), betas.index(float(r["sigma_beta"]))] = (
            scale * r["objective"])
    # successive halving scores the configurations it drops on fewer images: shown in parentheses, never best
    most = max(int(r.get("images") or 0) for r in rows)
    partial = {(float(r["w1"]), float(r["sigma_alpha"]), float(r["sigma_beta"])) for r in rows
               if int(r.get("images") or 0) < most}
    if best is None:
        top = max(rows, key=lambda r: (int(r.get("images") or 0), r["objective"]))
        best = (float(top["w1"]), float(top["sigma_alpha"]), float(top["sigma_beta"]))
    values = np.concatenate([g.ravel() for g in grids.values()])
    lo, hi = np.nanmin(values), np.nanmax(values)
    ncols = min(len(w1s), 3)
    nrows = math.ceil(len(w1s) / ncols)
    cw, ch = 0.75, 0.5  # inches per cell: room for a 10 pt label
    fig = Figure(figsize=(max(4.5, ncols * (len(betas) * cw + 1.0) + 1.2), nrows * (len(alphas) * ch + 1.1) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    image = None
    outlined = False
    for i, (ax, w) in enumerate(zip(axes, w1s)):
        g = grids[w]
        image = ax.imshow(g, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, aspect="auto")
        for (a, b), v in np.ndenumerate(g):
            if not np.isnan(v):
                light = (v - lo) / (hi - lo) > 0.6 if hi > lo else True
                shown = f"{v:.2f}" if hi - lo < 1 else f"{v:.1f}"  # a spread under 1 point needs the 2nd digit
                text = f"({shown})" if (w, alphas[a], betas[b]) in partial else shown
                ax.text(b, a, text, ha="center", va="center", fontsize=10, color="black" if light else "white")
        if float(best[0]) == w and float(best[1]) in alphas and float(best[2]) in betas:
            a, b = alphas.index(float(best[1])), betas.index(float(best[2]))
            ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
            outlined = True
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas], fontsize=10)
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=10)
        if i + ncols >= len(w1s):  # the bottom panel of its column
            ax.set_xlabel("sigma_beta (RGB)", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("sigma_alpha (px)", fontsize=10)
        ax.set_title(f"w1 = {w:g}", fontsize=11)
    for ax in axes[len(w1s):]:
        ax.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[: len(w1s)]), shrink=0.9)
        bar.set_label(f"{objective_name}{' %' if percent else ''}", fontsize=10)
    note = "; (x): dropped early, scored on fewer images" if partial else ""
    where = "" if outlined else f"; best w1={best[0]:g}, sigma_alpha={best[1]:g}, sigma_beta={best[2]:g} (refined, off this grid)"
    fig.suptitle((title or f"CRF search: {objective_name} per configuration (best outlined)") + note + where,
                 fontsize=11)
    return fig


def heatmap_png(config: SearchConfig, records: dict[tuple, dict], best: CRFParams, title: str) -> bytes:
    """``heatmap.png`` of the coarse grid: ``heatmap_figure`` of the records (those scored on fewer images
    than the most, dropped by successive halving, in parentheses), ``best`` outlined."""
    rows = [{**rec["params"], "objective": rec.get("objective"), "images": rec.get("images")}
            for rec in records.values()]
    fig = heatmap_figure(rows, grid=(config.w1, config.sigma_alpha, config.sigma_beta),
                         objective_name=title.replace(" (%)", ""),
                         title=f"coarse grid: {title}, best outlined",
                         best=(best.w1, best.sigma_alpha, best.sigma_beta), percent=not callable(config.objective))
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
    title = config.objective_name + ("" if callable(config.objective) else " (%)")
    if config.label:
        title = f"{title} [{config.label}]"
    table = ranked_markdown(rows, key, images, callable(config.objective), config.label)
    atomic_write_text(out_dir / "ranked.md", table)
    atomic_write_bytes(out_dir / "heatmap.png", heatmap_png(config, records, best, title))
    scored: dict[str, int] = {}
    for r in rows:
        scored[str(r["images"])] = scored.get(str(r["images"]), 0) + 1
    atomic_write_json(out_dir / "best.json", best_json(best, records[param_key(best)], key, config, images, len(rows),
                                                       run_info, dict(sorted(scored.items(), key=lambda x: -int(x[0])))))
