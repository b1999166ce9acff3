"""What the search reports: the ranking of its configurations, ``ranked.md``, ``heatmap.png`` and
``best.json`` (all written atomically, by rank 0, with ``crf.atomic``)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..params import CRFParams
from .config import SearchConfig, param_key

__all__ = ["rank_key", "best_of", "ranked_rows", "ranked_markdown", "heatmap_png", "best_json", "write_outputs"]


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


def heatmap_png(config: SearchConfig, records: dict[tuple, dict], best: CRFParams, title: str,
                images: int | None = None) -> bytes:
    """``heatmap.png``: one panel per w1 of the coarse grid, the objective over sigma_alpha x sigma_beta
    (only configurations scored on all ``images``; successive halving's dropped ones stay blank)."""
    # the object-oriented API with an explicit Agg canvas: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w1s, sas, sbs = config.w1, config.sigma_alpha, config.sigma_beta
    grid = np.full((len(w1s), len(sas), len(sbs)), np.nan)
    for i, a in enumerate(w1s):
        for j, b in enumerate(sas):
            for k, c in enumerate(sbs):
                rec = records.get(param_key(config.params(a, b, c)))
                if rec is not None and rec.get("objective") is not None and (
                        images is None or int(rec.get("images", 0)) >= images):
                    grid[i, j, k] = rec["objective"]
    scale = 1.0 if callable(config.objective) else 100.0
    grid *= scale
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ncols = min(3, len(w1s))
    nrows = math.ceil(len(w1s) / ncols)
    fig = Figure(figsize=(5.0 * ncols + 1.4, 4.2 * nrows + 1.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.84, bottom=0.1, top=0.88, wspace=0.25, hspace=0.4)
    im = None
    starred = False
    annotate = len(sas) * len(sbs) <= 64  # numbers stay legible up to the paper's 6 x 8 panels
    for i, a in enumerate(w1s):
        ax = axes[i // ncols][i % ncols]
        im = ax.imshow(grid[i], origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_xticks(range(len(sbs)), [f"{v:g}" for v in sbs])
        ax.set_yticks(range(len(sas)), [f"{v:g}" for v in sas])
        if i // ncols == nrows - 1 or i + ncols >= len(w1s):
            ax.set_xlabel("sigma_beta (RGB)")
        if i % ncols == 0:
            ax.set_ylabel("sigma_alpha (px)")
        ax.set_title(f"w1 = {a:g}")
        if annotate:
            for j in range(len(sas)):
                for k in range(len(sbs)):
                    if np.isfinite(grid[i, j, k]):
                        ax.text(k, j, f"{grid[i, j, k]:.1f}" if scale == 100.0 else f"{grid[i, j, k]:.3g}",
                                ha="center", va="center", fontsize=9, color="w")
        if best.w1 == a and best.sigma_alpha in sas and best.sigma_beta in sbs:
            ax.scatter([sbs.index(best.sigma_beta)], [sas.index(best.sigma_alpha)], marker="*", s=160,
                       facecolors="none", edgecolors="r")
            starred = True
    for i in range(len(w1s), nrows * ncols):
        axes[i // ncols][i % ncols].axis("off")
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.87, 0.1, 0.02, 0.78)), label=title)
    where = "red star" if starred else "a refined point, off this grid"
    fig.suptitle(f"coarse grid: {title}; best: w1={best.w1:g}, sigma_alpha={best.sigma_alpha:g}, "
                 f"sigma_beta={best.sigma_beta:g} ({where})")
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
    atomic_write_bytes(out_dir / "heatmap.png", heatmap_png(config, records, best, title, images))
    scored: dict[str, int] = {}
    for r in rows:
        scored[str(r["images"])] = scored.get(str(r["images"]), 0) + 1
    atomic_write_json(out_dir / "best.json", best_json(best, records[param_key(best)], key, config, images, len(rows),
                                                       run_info, dict(sorted(scored.items(), key=lambda x: -int(x[0])))))
