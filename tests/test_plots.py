"""mfrae.plots: the figures draw what they are given (means over seeds, min..max bands, skipped NaN), the
PNGs decode, the image mosaics grow with their content, and bad input gives a one-line ValueError."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mfrae import plots


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_curves_figure_draws_the_mean_and_a_min_max_band():
    curves = {"a": {2.0: [3.0, 5.0, 10.0], 0.0: [1.0, 2.0], 1.0: [float("nan"), 4.0]},
              "b": {0.0: [float("nan")], 5.0: [7.0]}}
    ax = plots.curves_figure(curves, xlabel="step", ylabel="FD", title="t").axes[0]
    a, b = ax.lines[0], ax.lines[1]
    assert list(a.get_xdata()) == [0.0, 1.0, 2.0]  # sorted by x
    assert np.allclose(a.get_ydata(), [np.mean([1.0, 2.0]), 4.0, np.mean([3.0, 5.0, 10.0])])  # NaN left out
    assert list(b.get_xdata()) == [5.0] and list(b.get_ydata()) == [7.0]  # the all-NaN point is skipped
    band = ax.collections[0].get_paths()[0].vertices  # only "a" has several values at a point
    assert len(ax.collections) == 1
    assert band[:, 1].min() == pytest.approx(1.0) and band[:, 1].max() == pytest.approx(10.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_png_size_and_html():
    fig = plots.curves_figure({"a": {0: [1.0], 1: [2.0]}}, xlabel="x", ylabel="y", title="t", logy=True)
    image = _decode(plots.figure_png(fig))
    width, height = image.size  # 6 x 3.6 in at 110 dpi, cropped to the drawn content
    assert 500 < width <= 700 and 300 < height <= 420 and 1.3 < width / height < 2.0
    tag = plots.figure_html(fig, 'a "quoted" <alt>')
    assert tag.startswith('<img alt="a &quot;quoted&quot; &lt;alt&gt;" src="data:image/png;base64,')
    assert _decode(__import__("base64").b64decode(re.search(r"base64,([^\"]+)", tag).group(1))).size == image.size


def test_save_figure(tmp_path):
    fig = plots.bar_figure({"x": [1.0, 2.0, 6.0], "y": [float("nan")]}, ylabel="s", title="t")
    path = plots.save_figure(fig, tmp_path / "sub" / "bar.png")
    assert _decode(path.read_bytes()).format == "PNG"
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches[:2]] == pytest.approx([3.0, 0.0])  # mean; no finite value -> 0


def test_cost_figure_sorts_points_and_annotates():
    fig = plots.cost_figure({"mfd": [(2.0, 20.0), (1.0, 30.0)], "teacher": [(49.0, 10.0)]}, xlabel="NFE",
                            ylabel="FD", title="t", annotate={"mfd": ["2 steps", "1 step"]},
                            reference={"floor": 5.0})
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [1.0, 2.0] and list(ax.lines[0].get_ydata()) == [30.0, 20.0]
    assert ax.get_xscale() == "log" and list(ax.lines[2].get_ydata()) == [5.0, 5.0]
    notes = {t.get_text(): t.xy for t in ax.texts}
    assert notes == {"1 step": (1.0, 30.0), "2 steps": (2.0, 20.0)}


def test_sample_comparison_grows_with_classes_and_models():
    def size(classes: int, models: int, per_class: int = 1) -> tuple[int, int]:
        labels = torch.arange(classes * 2) % classes
        images = {f"model {m}": torch.rand(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(m))
                  for m in range(models)}
        fig = plots.sample_comparison_figure(images, labels, per_class=per_class)
        return _decode(plots.figure_png(fig)).size

    w, h = size(3, 2)
    w_rows, h_rows = size(6, 2)
    w_cols, h_cols = size(3, 4)
    assert h_rows > 1.7 * h * 0.9 and abs(w_rows - w) <= 2  # twice the classes: about twice as tall
    assert w_cols > 1.6 * w and abs(h_cols - h) <= 2  # twice the models: about twice as wide
    assert size(3, 2, per_class=2)[0] > 1.5 * w


def test_sample_comparison_places_each_class_on_its_row():
    labels = torch.tensor([2, 0, 1])
    images = torch.stack([torch.full((3, 8, 8), 0.2 * (int(c) + 1)) for c in labels])
    fig = plots.sample_comparison_figure({"m": images}, labels, class_names=["zero", "one", "two"])
    ax = fig.axes[0]
    canvas = ax.images[0].get_array()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["zero", "one", "two"]
    for row, tick in enumerate(ax.get_yticks()):
        assert canvas[int(round(tick)), 4, 0] == pytest.approx(0.2 * (row + 1))


def test_bad_input_is_one_line_value_error():
    labels = torch.arange(4)
    cases = [
        lambda: plots.curves_figure({}, xlabel="x", ylabel="y", title="t"),
        lambda: plots.curves_figure({"a": {0: 1.0}}, xlabel="x", ylabel="y", title="t"),
        lambda: plots.cost_figure({"a": [(1, 2)]}, xlabel="x", ylabel="y", title="t", annotate={"a": []}),
        lambda: plots.bar_figure({}, ylabel="y", title="t"),
        lambda: plots.sample_comparison_figure({}, labels),
        lambda: plots.sample_comparison_figure({"m": torch.rand(3, 3, 8, 8)}, labels),
        lambda: plots.sample_comparison_figure({"m": torch.rand(4, 3, 8, 8)}, labels, class_names=["a"]),
    ]
    for case in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"images\['m'\]: 3 images but 4 labels"):
        cases[5]()
