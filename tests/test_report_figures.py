"""The report tells what a run is in one sentence, and draws its figures (paper Fig. 4 qualitative rows,
a readable CRF-search heatmap, the trimap) as PNG, PDF and SVG: on a real run of crf-demo on the sample."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
from PIL import Image

from deeplab_v1.cli import main, resolve_experiment
from deeplab_v1.config import load_config
from deeplab_v1.figures import FIGURE_FORMATS, search_heatmap
from deeplab_v1.runner import Runner
from deeplab_v1.stages.report import _search_results, headline, qualitative_rows
from crf.search.report import heatmap_cells
from crf.trimap import trimap_band
from deeplab_v1.data.io import VOC_CLASSES

QUICK = ["data.max_test_images=3", "crf_search.num_images=3", "crf_search.w1=[3, 5]", "crf_search.sigma_alpha=[30]",
         "crf_search.sigma_beta=[3, 5]", "crf.workers=1", "crf_search.workers=1"]


def _crf_demo(tmp_path_factory, name: str, overrides: list[str]) -> Runner:
    out = tmp_path_factory.mktemp(name)
    runner = Runner(load_config(resolve_experiment("crf-demo"), overrides + [f"output_dir={out}"]), progress=False)
    runner.run()
    return runner


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Runner:
    return _crf_demo(tmp_path_factory, "demo", QUICK)


#: A successive-halving search of the 2 x 2 x 2 grid on 3 images: rungs of 1 and 3 images, no refinement
#: (the floor lowered explicitly: by default 3 images are searched as the grid).
HALVING = QUICK[:2] + ["crf_search.sigma_alpha=[30, 50]", "crf_search.strategy=halving", "crf_search.eta=3",
                       "crf_search.halving_floor=1", "crf_search.rounds=0", "crf.workers=1", "crf_search.workers=1"]


@pytest.fixture(scope="module")
def halving_run(tmp_path_factory) -> Runner:
    return _crf_demo(tmp_path_factory, "halving", HALVING)


def _svg_texts(path) -> list[str]:
    """Every text drawn in an SVG written with ``svg.fonttype: none`` (one string per ``<text>``)."""
    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text())]


@pytest.mark.slow
def test_halving_figure_marks_exactly_the_dropped_configurations(halving_run):
    """Issue #21: every cell was marked "(dropped early)", the best included, since results.jsonl lists a
    finalist once per rung; and the outlined best must be best.json's (the CRF's parameters)."""
    layout = halving_run.layout
    reached: dict[tuple, int] = {}
    for line in (layout.crf_search / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        key = tuple(float(rec["params"][k]) for k in ("w1", "sigma_alpha", "sigma_beta"))
        reached[key] = max(reached.get(key, 0), int(rec["images"]))
    best = json.loads((layout.crf_search / "best.json").read_text())
    dropped = {k for k, n in reached.items() if n < best["images"]}
    assert dropped and len(dropped) < len(reached) == 8  # some dropped, some finalists
    best_key = (best["w1"], best["sigma_alpha"], best["sigma_beta"])
    assert best_key not in dropped
    s = halving_run.cfg.crf_search.search
    data = heatmap_cells(_search_results(layout.crf_search / "results.jsonl"), grid=(s.w1, s.sigma_alpha, s.sigma_beta),
                         best=best_key)
    assert {k for k, c in data["cells"].items() if c["dropped"]} == dropped
    assert data["best"] == best_key and data["best_on_grid"]
    # the drawn figure: a value in parentheses for exactly the dropped cells, the finalists' plain
    texts = _svg_texts(layout.root / "figures" / "crf_search.svg")
    in_parentheses = [t for t in texts if re.fullmatch(r"\(\d+\.\d+\)", t)]  # (colour-bar ticks have none)
    assert sorted(in_parentheses) == sorted(c["text"] for c in data["cells"].values() if c["dropped"])
    assert len(in_parentheses) == len(dropped)
    assert all(c["text"] in texts for c in data["cells"].values())
    assert any(t.startswith("DIAGNOSTIC degraded-GT scores: CRF search") for t in texts)
    title = " ".join(texts)  # the title's lines, each a text of its own
    assert f"w1={best['w1']:g}, sigma_alpha={best['sigma_alpha']:g}, sigma_beta={best['sigma_beta']:g}" in title
    assert "red box" in title and "dropped early by successive halving, scored on 1 of 3 images" in title


def test_headline_says_what_the_run_is(tmp_path):
    default = load_config(resolve_experiment(None), [f"output_dir={tmp_path / 'd'}"])
    text = headline(default)
    assert text.startswith("A pipeline check, not a result") and "random weights" in text
    assert "62.25 / 67.64" in text and "train_aug" in text
    assert headline(load_config(resolve_experiment("crf-demo"), [f"output_dir={tmp_path / 'c'}"])).startswith(
        "DIAGNOSTIC run")
    init = tmp_path / "init.pth"
    init.write_bytes(b"")
    real = headline(load_config(resolve_experiment(None), [f"output_dir={tmp_path / 'r'}", f"model.init={init}"]))
    assert "pipeline check" not in real and "DIAGNOSTIC" not in real and "init.pth" in real


@pytest.mark.slow
def test_report_opens_with_the_headline_and_links_the_figures(demo_run):
    report = demo_run.layout.report.read_text()
    lines = report.splitlines()
    metrics = json.loads(demo_run.layout.metrics.read_text())
    assert lines[2] == f"**{headline(demo_run.cfg)}**" and "DIAGNOSTIC" in lines[2]
    assert f"DCNN {100 * metrics['dcnn']['miou']:.2f} %" in lines[2]  # the run's own numbers in the sentence
    for name in ("qualitative", "crf_search"):
        assert f"(figures/{name}.png)" in report


@pytest.mark.slow
def test_every_figure_in_png_pdf_and_svg(demo_run):
    folder = demo_run.layout.root / "figures"
    for name in ("qualitative", "crf_search", "trimap"):
        for fmt in FIGURE_FORMATS:
            assert (folder / f"{name}.{fmt}").stat().st_size > 1000, (name, fmt)
        assert (folder / f"{name}.pdf").read_bytes().startswith(b"%PDF")
        with Image.open(folder / f"{name}.png") as im:
            assert im.width >= 600  # the 2 x 1 x 2 search grid of this run: 682 px
    assert "DIAGNOSTIC" in (folder / "trimap.svg").read_text()


def test_qualitative_rows_are_the_crfs_largest_gains_and_losses_near_boundaries(demo_run):
    """Issue #21: rows picked by the CRF's gain in the 5 px trimap band (largest gains, largest losses),
    not by "least changed" (often all-background DCNN output)."""
    ctx = demo_run.ctx
    gains = {}
    for s in ctx.test_samples():
        gt = np.array(Image.open(s.label))
        dcnn = np.array(Image.open(ctx.layout.prediction("dcnn", s.id)))
        crf = np.array(Image.open(ctx.layout.prediction("crf", s.id)))
        band = trimap_band(gt, 5)
        gains[s.id] = 100 * (np.mean(crf[band] == gt[band]) - np.mean(dcnn[band] == gt[band]))
    rows = qualitative_rows(ctx, per_end=1)
    assert len(rows) == 2
    ids = [r["id"] for r in rows]
    order = sorted(gains, key=gains.get, reverse=True)
    # the largest gain and the largest loss; with no loss (or no gain), the next largest change instead
    chosen = [i for i in order if gains[i] > 0][:1] + [i for i in order[::-1] if gains[i] < 0][:1]
    chosen += sorted((i for i in order if i not in chosen), key=lambda i: -abs(gains[i]))[: 2 - len(chosen)]
    assert ids == sorted(chosen, key=gains.get, reverse=True) and ids[0] == order[0]
    for r in rows:
        assert r["band_gain"] == pytest.approx(gains[r["id"]])
        assert r["caption"].startswith(r["id"]) and "5 px band" in r["caption"]
        assert r["image"].shape[:2] == r["gt"].shape == r["dcnn"].shape == r["crf"].shape
        assert r["image"].dtype == np.uint8 and r["image"].shape[2] == 3
    assert len(qualitative_rows(ctx)) == 3  # at most 2 x 2 rows: every one of the 3 images


def test_qualitative_figure_has_a_colour_key_and_fits_a_page(demo_run):
    folder = demo_run.layout.root / "figures"
    rows = qualitative_rows(demo_run.ctx)
    present = sorted({int(c) for r in rows for k in ("gt", "dcnn", "crf") for c in np.unique(r[k])})
    texts = _svg_texts(folder / "qualitative.svg")
    key = texts[texts.index("colour key") + 1:]
    names = ["void (not scored)" if c == 255 else VOC_CLASSES[c] for c in present]
    assert sorted(key) == sorted(names)  # the classes shown, and only those
    with Image.open(folder / "qualitative.png") as im:
        assert im.width <= 1000 and im.height <= 1400  # a page at 110 dpi (it was 3,250 px wide)
    assert any(t.startswith("DIAGNOSTIC") for t in texts)


def test_run_prints_the_headline_last(demo_run, capsys):
    out = str(demo_run.layout.root)
    assert main(["run", "crf-demo", "--no-progress", *[x for o in QUICK + [f"output_dir={out}"] for x in ("--set", o)]]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == headline(demo_run.cfg)


def test_heatmap_labels_every_cell_of_the_coarse_grid(tmp_path):
    rows = [{"w1": w, "sigma_alpha": a, "sigma_beta": b, "objective": 0.4 + w / 100 + a / 1000 + b / 10000}
            for w in (3, 5) for a in (30, 50) for b in (3, 5)]
    rows.append({"w1": 4, "sigma_alpha": 40, "sigma_beta": 4, "objective": 0.9})  # a refined point, off the grid
    rows.append({"w1": 3, "sigma_alpha": 30, "sigma_beta": 4, "objective": None})  # failed
    written = search_heatmap(rows, tmp_path / "h.png", grid=([3, 5], [30, 50], [3, 5]))
    assert [p.suffix for p in written] == [".png", ".pdf", ".svg"]
    svg = written[2].read_text()
    for r in rows[:8]:
        assert f"{100 * r['objective']:.1f}" in svg
    texts = _svg_texts(written[2])
    assert "90.0" not in texts and "w1 = 4" not in texts  # the off-grid point has no cell, no panel ...
    title = " ".join(texts)  # ... but as the best (the refinement's) the title names it
    assert "best (refined, off this grid; the CRF's parameters): w1=4, sigma_alpha=40, sigma_beta=4" in title
    with pytest.raises(ValueError, match="no configuration"):
        search_heatmap(rows[-1:], tmp_path / "none.png")
    # successive halving: a configuration scored on fewer images is in parentheses and never the best
    halved = [{**r, "images": 6} for r in rows[:8]]
    halved[7] = {**halved[7], "images": 2, "objective": 0.99}
    svg = search_heatmap(halved, tmp_path / "halved.png")[2].read_text()
    assert "(99.0)" in svg and "dropped early" in svg and f"{100 * halved[0]['objective']:.1f}" in svg
    # a spread under one point keeps two decimals (else neighbouring cells would read the same)
    close = [{**r, "objective": 0.05 + i / 1000} for i, r in enumerate(rows[:8])]
    svg = search_heatmap(close, tmp_path / "close.png")[2].read_text()
    assert all(f"{5 + i / 10:.2f}" in svg for i in range(8))
