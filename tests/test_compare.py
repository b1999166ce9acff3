"""``deeplab compare``: two real runs on the shipped sample (DIAGNOSTIC degraded-GT scores, two CRF
settings) put side by side in one markdown table and one trimap figure, values read from each run's
metrics.json and trimap.json."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from deeplab_v1.cli import main, resolve_experiment
from deeplab_v1.compare import CompareError, compare_runs, read_run
from deeplab_v1.config import load_config
from deeplab_v1.runner import Runner

COMMON = ["stages=[test, crf, evaluate]", "data.max_test_images=3", "crf_search.enabled=false",
          "crf.use_search=false", "crf.workers=1", "evaluation.trimap_widths=[1, 2, 5, 10, 20]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two evaluated runs of crf-demo on 3 sample images: a weak and a strong bilateral kernel."""
    base = tmp_path_factory.mktemp("runs")
    out = []
    for name, w1 in (("weak", 1), ("strong", 10)):
        cfg = load_config(resolve_experiment("crf-demo"), COMMON + [
            f"output_dir={base / name}", f"crf.params={{w1: {w1}, sigma_alpha: 30, sigma_beta: 3}}"])
        Runner(cfg, progress=False).run()
        out.append(base / name)
    return out


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| run |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_one_table_with_every_run_and_method(runs, tmp_path):
    text, written = compare_runs(runs, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.md").read_text() == text
    rows = _table_rows(text)
    head = rows["measure %"]
    assert head == ["weak DCNN (DIAGNOSTIC)", "weak DCNN-CRF (DIAGNOSTIC)", "strong DCNN (DIAGNOSTIC)",
                    "strong DCNN-CRF (DIAGNOSTIC)"]
    for i, (run, method) in enumerate((r, m) for r in runs for m in ("dcnn", "crf")):
        metrics = json.loads((run / "metrics.json").read_text())[method]
        trimap = json.loads((run / "trimap.json").read_text())[method]
        assert rows["**mIoU**"][i] == f"{100 * metrics['miou']:.2f}"
        assert rows["pixel accuracy"][i] == f"{100 * metrics['pixel_accuracy']:.2f}"
        assert rows["trimap pixel acc., 5 px"][i] == f"{100 * trimap['pixel_accuracy'][2]:.2f}"
        assert rows["trimap mIoU, 20 px"][i] == f"{100 * trimap['miou'][4]:.2f}"
        iou = metrics["per_class_iou"]
        assert rows["IoU person"][i] == ("n/a" if iou[15] is None else f"{100 * iou[15]:.2f}")
    # the same degraded scores, so the DCNN columns agree; the two CRFs do not
    assert rows["**mIoU**"][0] == rows["**mIoU**"][2] and rows["**mIoU**"][1] != rows["**mIoU**"][3]
    assert "trimap mIoU, 40 px" not in rows  # not measured by these runs
    assert "**DIAGNOSTIC**" in text


@pytest.mark.slow
def test_one_trimap_figure_in_three_formats(runs, tmp_path):
    _, written = compare_runs(runs, tmp_path / "cmp")
    assert [p.name for p in written] == ["compare.md", "trimap.png", "trimap.pdf", "trimap.svg"]
    with Image.open(written[1]) as im:
        assert im.width > 1000 and im.height > 400
    assert written[2].read_bytes().startswith(b"%PDF") and b"<svg" in written[3].read_bytes()[:2000]
    texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", written[3].read_text())]
    for label in ("weak DCNN", "weak DCNN-CRF", "strong DCNN", "strong DCNN-CRF"):
        assert f"{label} (DIAGNOSTIC)" in texts  # every run's curves are in the legend, each says DIAGNOSTIC
    # issue #21: the title of a figure made from degraded-GT scores opens with DIAGNOSTIC
    assert any(t.startswith("DIAGNOSTIC (every run: degraded-GT scores") for t in texts)


def test_the_legend_is_off_the_curves(runs, tmp_path):
    """The legend's box overlaps neither panel (it sits below them), and lies inside the figure."""
    from deeplab_v1.compare import compare_title, trimap_curves
    from deeplab_v1.evaluation.plots import draw_trimap

    results = [read_run(p) for p in runs]
    fig = draw_trimap(trimap_curves(results), title=compare_title(results))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    title = fig._suptitle.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width  # not cut at the edges


def test_the_command_prints_the_table_and_writes_under_runs(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(runs[0]), str(runs[1])]) == 0
    out = capsys.readouterr().out
    assert "| measure % |" in out and (tmp_path / "runs" / "compare" / "compare.md").is_file()
    assert (tmp_path / "runs" / "compare" / "trimap.svg").is_file()


def test_runs_of_the_same_name_are_told_apart(runs, tmp_path):
    copy = tmp_path / "other" / "weak"
    copy.mkdir(parents=True)
    for name in ("metrics.json", "trimap.json"):
        (copy / name).write_bytes((runs[0] / name).read_bytes())
    text, _ = compare_runs([runs[0], copy], tmp_path / "cmp")
    head = _table_rows(text)["measure %"]
    assert head[0].startswith(f"{runs[0].parent.name}/weak DCNN") and head[2].startswith("other/weak DCNN")


def test_a_run_that_was_not_evaluated_is_a_one_line_error(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.json: not found; run `deeplab evaluate`" in err[0]
    assert not (tmp_path / "cmp").exists()  # every run is read before anything is written
    with pytest.raises(CompareError, match="no such run folder"):
        read_run(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(CompareError, match="not readable JSON"):
        read_run(tmp_path / "bad")
