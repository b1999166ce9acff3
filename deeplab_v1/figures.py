"""Figures for people and papers: label colours and overlays (``deeplab predict``), the qualitative
figure of the paper's Fig. 4 (image, ground truth, DCNN, DCNN-CRF), a readable CRF-search heatmap and the
trimap curves of several runs (Fig. 5).

Every matplotlib figure is drawn on a bare ``Figure`` with the Agg canvas (no pyplot state, no display)
and saved by :func:`save_figure` as PNG, PDF and SVG side by side, atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write_bytes
from .data.io import IGNORE_LABEL, VOC_CLASSES, voc_palette
from .evaluation.plots import draw_trimap

__all__ = ["FIGURE_FORMATS", "colorize", "blend", "side_by_side", "new_figure", "save_figure",
           "qualitative_figure", "search_heatmap", "trimap_figure", "class_names"]

#: The formats every figure is written in (``<stem>.png``, ``.pdf``, ``.svg``).
FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf", "svg")


# --------------------------------------------------------------------------------------- label images
def colorize(label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Palette colours of a label map.

    Args:
        label: (H, W) integer class indices 0..255 (255: void).
        palette: (256, 3) uint8 RGB (``data.layouts.palette``); None: the VOC colour map.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: ``label`` is not 2-D or holds values outside 0..255.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"a label map must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must be within 0..255, got {label.min()}..{label.max()}")
    return (voc_palette() if palette is None else np.asarray(palette, np.uint8))[label.astype(np.uint8)]


def blend(image_rgb: np.ndarray, label: np.ndarray, alpha: float = 0.6, palette: np.ndarray | None = None) -> np.ndarray:
    """The label's colours over the image: ``alpha`` x colour + (1 - alpha) x image, background (0) and
    void (255) pixels left as the image.

    Args:
        image_rgb: (H, W, 3) uint8 RGB 0..255.
        label: (H, W) class indices, the image's size.
        alpha: opacity of the colours, 0..1.
        palette: as ``colorize``'s.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: the sizes differ.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.shape[:2] != np.asarray(label).shape:
        raise ValueError(f"image {image_rgb.shape[:2]} and label {np.asarray(label).shape} sizes differ")
    colours = colorize(label, palette).astype(np.float32)
    out = image_rgb.astype(np.float32)
    objects = (label != 0) & (label != IGNORE_LABEL)
    out[objects] = alpha * colours[objects] + (1.0 - alpha) * out[objects]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:  # Pillow >= 10.1 scales its built-in font
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - older Pillow: the small bitmap font
        return ImageFont.load_default()


def side_by_side(panels: Sequence[tuple[str, np.ndarray]], *, max_height: int = 480) -> np.ndarray:
    """Panels in a row, each under a caption strip (e.g. image | DCNN | DCNN-CRF).

    Args:
        panels: (caption, (H, W, 3) uint8 RGB) pairs, all of the same size.
        max_height: panels taller than this are scaled down (pixels), so a large photo stays viewable.

    Returns:
        (caption + H', n * W' + gaps, 3) uint8 RGB.

    Raises:
        ValueError: no panels, or panels of different sizes.
    """
    if not panels:
        raise ValueError("side_by_side: no panels")
    shapes = {np.asarray(p).shape for _, p in panels}
    if len(shapes) != 1:
        raise ValueError(f"side_by_side: panels of different sizes {sorted(shapes)}")
    h, w = next(iter(shapes))[:2]
    scale = min(1.0, max_height / h)
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    caption_h, gap = max(18, ph // 14), 4
    canvas = Image.new("RGB", (len(panels) * pw + (len(panels) - 1) * gap, caption_h + ph), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(int(caption_h * 0.75))
    for i, (caption, panel) in enumerate(panels):
        x = i * (pw + gap)
        im = Image.fromarray(np.ascontiguousarray(panel, dtype=np.uint8))
        if scale < 1.0:
            im = im.resize((pw, ph), Image.Resampling.LANCZOS)
        canvas.paste(im, (x, caption_h))
        draw.text((x + 4, caption_h * 0.1), caption, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


# ----------------------------------------------------------------------------------- matplotlib figures
def new_figure(width: float, height: float, *, layout: str | None = None) -> Figure:
    """A bare matplotlib ``Figure`` (inches) on the Agg canvas; ``layout="constrained"`` to let
    matplotlib place titles, labels and colour bars."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 110) -> list[Path]:
    """Write ``fig`` as ``<stem>.png``, ``.pdf`` and ``.svg`` (``FIGURE_FORMATS``) next to ``path``,
    each atomically; parent folders are created. Returns the paths written, PNG first."""
    path = Path(path)
    written = []
    for fmt in FIGURE_FORMATS:
        out = path.with_suffix(f".{fmt}")
        buf = io.BytesIO()
        # a fixed date keeps the PDF/SVG bytes reproducible from run to run
        metadata = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
        # editable text in SVG, TrueType (not Type 3) fonts in PDF: what journals and editors want
        with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
            fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
        atomic_write_bytes(out, buf.getvalue())
        written.append(out)
    return written


#: The qualitative figure's width in inches: a page's text width (about 1,000 px at 110 dpi).
PAGE_WIDTH_IN = 9.0


def qualitative_figure(rows: Sequence[Mapping], path: str | os.PathLike, *, title: str | None = None,
                       names: Sequence[str] | None = None, palette: np.ndarray | None = None) -> list[Path]:
    """The paper's Fig. 4: one row per image -- image, ground truth, DCNN, DCNN-CRF -- and a colour key of
    the classes shown.

    The figure is ``PAGE_WIDTH_IN`` wide whatever the images' sizes: the panels share the width, each row
    as tall as its image's aspect asks, with narrow gaps (issue #21: it was 3,250 px wide with large gaps).
    The key (below the panels) lists only the classes some panel shows, in the palette's colours.

    Args:
        rows: mappings with ``image`` ((H, W, 3) uint8 RGB), ``gt``, ``dcnn``, ``crf`` ((H, W) class
            indices; ``crf`` may be None when the CRF did not run) and ``caption`` (the row's label, e.g.
            the image id and the CRF's gain near boundaries).
        path: where to write (``.png``; ``.pdf`` and ``.svg`` beside it).
        title: optional figure title (wrapped to the width).
        names: the name of each class index (default: :func:`class_names`, the VOC names).
        palette: (256, 3) uint8 RGB colours of the label values (default: the VOC colour map).

    Returns:
        The files written (``save_figure``).

    Raises:
        ValueError: no rows.
    """
    import textwrap

    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("qualitative_figure: no rows")
    with_crf = any(r.get("crf") is not None for r in rows)
    heads = ["Image", "Ground truth", "DCNN output"] + (["DCNN-CRF output"] if with_crf else [])
    caption_w = 1.3  # inches for the row captions at the left
    col_w = (PAGE_WIDTH_IN - caption_w) / len(heads)
    ratios = [r["image"].shape[0] / r["image"].shape[1] for r in rows]
    text = textwrap.fill(title, 95) if title else ""
    present = sorted({int(c) for r in rows for k in ("gt", "dcnn", "crf") if r.get(k) is not None
                      for c in np.unique(r[k])})
    names = list(names) if names is not None else class_names(IGNORE_LABEL)
    key = [c for c in present if c < len(names) or c == IGNORE_LABEL]
    key_rows = -(-len(key) // 6)
    height = sum(col_w * q for q in ratios) + 0.3 + 0.25 * (text.count("\n") + 1 if text else 0) + 0.3 * key_rows + 0.2
    fig = new_figure(PAGE_WIDTH_IN, height, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.01, hspace=0.01)
    axes = np.atleast_2d(fig.subplots(len(rows), len(heads), squeeze=False, gridspec_kw={"height_ratios": ratios}))
    for i, r in enumerate(rows):
        panels = [r["image"], colorize(r["gt"], palette), colorize(r["dcnn"], palette)]
        if with_crf:
            panels.append(colorize(r["crf"], palette) if r.get("crf") is not None else np.full_like(r["image"], 255))
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=10)
        # horizontal, left of the row: readable however short the row is
        axes[i, 0].set_ylabel(r.get("caption", ""), fontsize=8, rotation=0, ha="right", va="center")
    palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="black", linewidth=0.5,
                     label="void (not scored)" if c == IGNORE_LABEL else names[c]) for c in key]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=9,
                   title="colour key", title_fontsize=9, frameon=False)
    if text:
        fig.suptitle(text, fontsize=11)
    return save_figure(fig, path)


def search_heatmap(results: Sequence[Mapping], path: str | os.PathLike, *, objective_name: str = "mIoU",
                   grid: Sequence[Sequence[float]] | None = None, title: str | None = None,
                   best: tuple[float, float, float] | None = None) -> list[Path]:
    """The CRF search's heatmap (``crf.search.report.heatmap_figure``, the one drawing of it: one panel per
    w1, cells labelled in %, the search's best outlined and named in the title, halving's dropped
    configurations grey and in parentheses) written as PNG, PDF and SVG.

    Args:
        results: the lines of ``crf_search/results.jsonl`` (``w1``, ``sigma_alpha``, ``sigma_beta``,
            ``objective`` as a fraction, optional ``images``).
        path: where to write (``.png``; ``.pdf`` and ``.svg`` beside it).
        objective_name, grid, title, best: as ``heatmap_figure``'s (``best``: ``best.json``'s parameters, the
            ones the CRF used; default: the best of the results scored on the most images).

    Returns:
        The files written, PNG first.

    Raises:
        ValueError: no configuration with an objective (on the grid).
    """
    from crf.search.report import heatmap_figure

    return save_figure(heatmap_figure(results, grid=grid, objective_name=objective_name, title=title,
                                      best=best), path)


def trimap_figure(curves: Mapping[str, Mapping], path: str | os.PathLike, *, title: str | None = None) -> list[Path]:
    """The paper's Fig. 5 for several runs (``deeplab_v1.evaluation.plots.draw_trimap``: pixel accuracy and
    mIoU against the trimap width, one colour per run, DCNN dashed, DCNN-CRF solid, the legend below the
    panels) written as PNG, PDF and SVG.

    Args:
        curves: a label such as ``"run-a DCNN-CRF"`` -> ``TrimapAccumulator.result()`` (``widths``,
            ``pixel_accuracy``, ``miou``; fractions 0..1, None for empty bands).
        path: where to write (``.png``; ``.pdf`` and ``.svg`` beside it).
        title: optional figure title (DIAGNOSTIC first for degraded-GT scores).

    Returns:
        The files written.

    Raises:
        ValueError: no curves, or a curve without ``widths``/``pixel_accuracy``/``miou``.
    """
    return save_figure(draw_trimap(curves, title=title), path)


def class_names(num_classes: int) -> list[str]:
    """The VOC class names of 0..num_classes-1 (``class<i>`` past the 21 VOC classes)."""
    return [VOC_CLASSES[i] if i < len(VOC_CLASSES) else f"class{i}" for i in range(num_classes)]
