"""The report writer: strict JSON, a self-contained HTML page with the expected sections, charts and
images, escaped text, and graceful handling of missing / damaged metrics files."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from PIL import Image

from mfrae.report import (
    ImagePanel,
    QualityRow,
    ReconstructionPanel,
    ReportFigures,
    SampleComparison,
    json_safe,
    read_metrics,
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
        comparison=SampleComparison("all models", {"teacher": images, "MFT <script>alert(1)</script>": images},
                                    labels, per_class=2),
        samples=[ImagePanel("teacher, 50 steps", images, labels, ncols=4), ImagePanel("grid", images[:6])],
        reconstructions=[ReconstructionPanel("RAE", images[:12], images[:12].flip(-1), ncols=6)],
        runs={"teacher": tmp_path / "runs" / "teacher", "cmt": tmp_path / "runs" / "cmt.jsonl",
              "mfd": tmp_path / "runs" / "mfd"},  # mfd: no such run
        quality=[QualityRow("teacher", 50, 0.61, 3.2, 0.95, 210.0), QualityRow("MFT", 1, 0.012, None, None, None),
                 QualityRow("MFT_2", 2, 0.02, 4.0, 0.9, 100.0, family="MFT")],
        fd_reference={"real": 1.0},
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
    # comparison + 2 sample panels + reconstructions + 2 runs x (loss, grad norm) + FD vs NFE / GFLOPs + timing
    assert page.count("<img") == 11 and "<svg" not in page
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) == 11
    assert sorted(p.name for p in paths.figures) == sorted(p.name for p in (tmp_path / "out").glob("report_*.png"))
    assert {"report_samples.png", "report_fd_vs_nfe.png", "report_fd_vs_gflops.png", "report_stage_seconds.png",
            "report_curves_teacher_loss.png"} <= {p.name for p in paths.figures}
    for png in paths.figures:  # every file decodes and is embedded in the page
        assert Image.open(png).format == "PNG"
        assert __import__("base64").b64encode(png.read_bytes()).decode() in page
    # Self-contained and script-free: caller text is escaped, nothing is loaded from elsewhere.
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "&amp; is trained" in page and "teacher &lt;b&gt;" in page
    assert not re.search(r'(src|href)="(http|//)', page)
    assert "no metrics file" in page and "1 unreadable line(s) skipped" in page
    assert "95.0%" in page and "&ndash;" in page  # accuracy as a percentage, missing values as dashes


def test_report_without_figures_and_bad_input(tmp_path):
    paths = write_report(tmp_path, {"a": 1})
    assert json.loads(paths.json.read_text()) == {"a": 1}
    assert "<img" not in paths.html.read_text() and paths.figures == ()
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


def test_read_metrics(tmp_path):
    assert read_metrics(tmp_path / "none") is None
    _write_metrics(tmp_path / "metrics.jsonl", steps=[1, 2], extra_line='["not", "a", "record"]')
    log = read_metrics(tmp_path)
    assert [r["step"] for r in log.records] == [1, 2] and log.skipped == 1


def test_json_safe_rejects_non_string_keys():
    assert json_safe({1: 2}) == {"1": 2}
    with pytest.raises(TypeError, match="JSON keys must be strings"):
        json_safe({(1, 2): 3})
