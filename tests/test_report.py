"""The report writer: strict JSON, a self-contained HTML page with the expected sections, charts and
images, escaped text, and graceful handling of missing / damaged metrics files."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from mfrae.report import (
    ImagePanel,
    QualityRow,
    ReconstructionPanel,
    ReportFigures,
    Series,
    class_grid,
    json_safe,
    log_ticks,
    nice_ticks,
    read_metrics,
    svg_line_chart,
    write_report,
)


def _write_metrics(path, steps=range(10, 210, 10), extra_line: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 0.5 + s / 100, "lr": 1e-3}) for s in steps]
    if extra_line is not None:
        lines.append(extra_line)
    path.write_text("\n".join(lines) + "\n")


def _figures(tmp_path) -> ReportFigures:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(30, 3, 8, 8, generator=g)
    labels = torch.arange(30) % 3
    _write_metrics(tmp_path / "runs" / "teacher" / "metrics.jsonl")
    _write_metrics(tmp_path / "runs" / "cmt.jsonl", extra_line='{"step": 21')  # a line cut off by a kill
    return ReportFigures(
        samples=[ImagePanel("teacher, 50 steps", images, labels, ncols=4),
                 ImagePanel("MFT <script>alert(1)</script>", images[:6], labels[:6])],
        reconstructions=[ReconstructionPanel("RAE", images[:12], images[:12].flip(-1), ncols=6)],
        runs={"teacher": tmp_path / "runs" / "teacher", "cmt": tmp_path / "runs" / "cmt.jsonl",
              "mfd": tmp_path / "runs" / "mfd"},  # mfd: no such run
        quality=[QualityRow("teacher", 50, 0.61, 3.2, 0.95, 210.0), QualityRow("MFT", 1, 0.012, None, None, None)],
        stage_seconds={"encoder": 31.5, "decoder": 120.0, "teacher <b>": 200.0},
    )


def test_report_files(tmp_path):
    report = {"fd": np.float32(1.5), "nan": float("nan"), "tensor": torch.tensor([1, 2]), "path": tmp_path,
              "nested": {"steps": np.int64(3), "tuple": (1.0, math.inf)}}
    paths = write_report(tmp_path / "out", report, _figures(tmp_path), title="Demo <script>x</script>",
                         note="The encoder stands in for DINOv2 & is trained on digits.")
    data = json.loads(paths.json.read_text())  # strict JSON (NaN / inf became null)
    assert data == {"fd": 1.5, "nan": None, "tensor": [1, 2], "path": str(tmp_path),
                    "nested": {"steps": 3, "tuple": [1.0, None]}}
    page = paths.html.read_text()
    for section in ("samples", "reconstructions", "curves", "quality", "timing", "raw"):
        assert f'<section id="{section}">' in page
    # 2 charts (loss, grad norm) for each of the two runs that have metrics + the stage-time bar chart.
    assert page.count("<svg") == 5
    # 2 sample grids + 1 reconstruction grid, all embedded.
    assert page.count("<img") == 3
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 3
    # Self-contained and script-free: caller text is escaped, nothing is loaded from elsewhere.
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "&amp; is trained" in page and "teacher &lt;b&gt;" in page
    assert not re.search(r'(src|href)="(http|//)', page)
    assert "no metrics file" in page and "1 unreadable line(s) skipped" in page
    # Every chart is well-formed XML.
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        ET.fromstring(svg)
    assert "95.0%" in page and "&ndash;" in page  # accuracy as a percentage, missing values as dashes


def test_report_without_figures_and_bad_input(tmp_path):
    paths = write_report(tmp_path, {"a": 1})
    assert json.loads(paths.json.read_text()) == {"a": 1}
    assert "<svg" not in paths.html.read_text()
    with pytest.raises(TypeError, match=r"report\['x'\]\['y'\]: cannot write a value of type object"):
        write_report(tmp_path, {"x": {"y": object()}})
    with pytest.raises(ValueError, match=r"reconstructions\[0\].*differ in shape"):
        write_report(tmp_path, {}, ReportFigures(reconstructions=[
            ReconstructionPanel("r", torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))]))


def test_image_panel_from_png_path(tmp_path):
    from mfrae.images import save_image_grid

    png = save_image_grid(torch.rand(4, 3, 8, 8), tmp_path / "grid.png")
    figures = ReportFigures(samples=[ImagePanel("file", path=png), ImagePanel("gone", path=tmp_path / "no.png")])
    page = write_report(tmp_path / "out", {}, figures).html.read_text()
    assert page.count("<img") == 1 and "image file not found" in page


def test_class_grid_puts_each_class_on_its_row():
    # Class c images are filled with the value 50 * (c + 1); the grid must show them row by row.
    labels = np.array([2, 0, 1, 0, 2, 2])
    images = np.stack([np.full((4, 4, 3), 50 * (c + 1), np.uint8) for c in labels])
    grid = class_grid(images, labels, ncols=3, scale=1)
    assert grid.shape[0] == 3 * (4 + 2) + 2  # three rows of 4 px cells with 2 px padding
    margin = grid.shape[1] - (3 * (4 + 2) + 2)
    for row, cls in enumerate((0, 1, 2)):
        top = 2 + row * 6
        count = int(np.sum(labels == cls))
        for col in range(3):
            left = margin + 2 + col * 6
            value = grid[top + 1, left + 1, 0]
            assert value == (50 * (cls + 1) if col < count else 0), (row, col, value)


def test_ticks():
    assert nice_ticks(0.0, 9.3) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    ticks = nice_ticks(-0.37, 0.81)
    assert ticks[0] <= -0.37 and ticks[-1] >= 0.81
    assert log_ticks(0.03, 40.0) == [0.01, 0.1, 1.0, 10.0, 100.0]
    assert log_ticks(0.3, 4.0) == pytest.approx([0.2, 0.5, 1.0, 2.0, 5.0])


def test_line_chart_skips_bad_points_and_labels_axes():
    svg = svg_line_chart([Series("loss", [0, 1, 2, 3], [1.0, float("nan"), 0.0, 0.1]), Series("empty", [], [])],
                         "t", "step", "loss", log_y=True)
    ET.fromstring(svg)
    assert "loss (log scale)" in svg and "step" in svg
    assert "<polyline" not in svg and svg.count("<circle") == 2  # two isolated points, no line through NaN / 0
    assert ">loss<" in svg and ">empty<" in svg  # legend entries
    assert "no data" in svg_line_chart([Series("x", [1], [float("inf")])], "t", "x", "y")


def test_read_metrics(tmp_path):
    assert read_metrics(tmp_path / "none") is None
    _write_metrics(tmp_path / "metrics.jsonl", steps=[1, 2], extra_line='["not", "a", "record"]')
    log = read_metrics(tmp_path)
    assert [r["step"] for r in log.records] == [1, 2] and log.skipped == 1


def test_json_safe_rejects_non_string_keys():
    assert json_safe({1: 2}) == {"1": 2}
    with pytest.raises(TypeError, match="JSON keys must be strings"):
        json_safe({(1, 2): 3})
