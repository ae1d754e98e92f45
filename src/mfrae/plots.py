"""Report figures drawn with matplotlib: curves over seeds, quality against cost, bars over seeds, and image
mosaics (samples of several models side by side, labelled rows of images).

Every figure is a `matplotlib.figure.Figure` built directly and rendered by the Agg canvas, never through
`pyplot`: no global figure registry, no interactive backend, so building figures is safe in worker threads
and on machines without a display. A figure made here is freed when its last reference goes (pyplot's
`close` does not apply to it); rendering does not change it, so one figure may be rendered more than once.

Conventions shared by the functions:

* Non-finite values (NaN, inf) are left out of a plot; on a log axis so are values <= 0. A series left with
  no point still appears in the legend, marked "(no finite value)", so its absence is visible.
* Colours follow the colour-blind-safe Okabe-Ito order, reused cyclically, one per label in input order.
* Bad input raises a one-line ValueError that names the label, key or shape at fault.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110  # output pixels per inch of every PNG written here
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
PLOT_SIZE = (6.0, 3.6)  # inches: 660 x 396 pixels at DPI
TITLE_SIZE, LABEL_SIZE, TICK_SIZE, SMALL_SIZE = 10, 9, 8, 8  # font sizes in points
_EMPTY_SUFFIX = " (no finite value)"


#################################################################################
#                                 Output                                        #
#################################################################################


def figure_png(fig: Figure, *, dpi: float = DPI) -> bytes:
    """The figure as PNG bytes at `dpi`, cropped to its drawn content (plus a thin margin), so text that
    reaches past the figure's nominal edge is kept rather than cut."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    canvas.print_figure(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    return buffer.getvalue()


def write_pngs(figures: Mapping[str, Figure], folder: str | Path, prefix: str) -> dict[str, bytes]:
    """Render each figure to PNG and write it as folder/{prefix}{name}.png; returns the PNG bytes by name."""
    pngs = {name: figure_png(fig) for name, fig in figures.items()}
    for name, png in pngs.items():
        (Path(folder) / f"{prefix}{name}.png").write_bytes(png)
    return pngs


TABLE_PAGE_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}} img{{max-width:100%}}</style></head><body>
<h1>{heading}</h1>
"""  # the head of a plain report page of tables and figures (str.format: title, heading)


def png_html(png: bytes, alt: str) -> str:
    """An `<img>` tag embedding PNG bytes as a base64 data URI (alt text HTML-escaped)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figure_html(fig: Figure, alt: str) -> str:
    """`<img alt=... src="data:image/png;base64,...">` of the rendered figure: no external file is needed."""
    return png_html(figure_png(fig), alt)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG file (parent folders created; written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(figure_png(fig))
    tmp.replace(path)
    return path


#################################################################################
#                                 Helpers                                       #
#################################################################################


def _new_figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _style_axes(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, which="major", color="#e0e0e0", linewidth=0.8)
    ax.set_axisbelow(True)


def _plain_log_axis(axis) -> None:
    """Log-scale ticks at 1, 2 and 5 times powers of ten, written as plain numbers (0.5, 1, 20), not 10^k."""
    axis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _legend(ax: Axes, count: int) -> None:
    """Inside the axes for a few labels; to the right, outside, for many (so it covers no data)."""
    if count > 5:
        ax.legend(fontsize=SMALL_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=SMALL_SIZE, loc="best")


def _check_nonempty(data: Mapping, name: str) -> None:
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{name} must be a non-empty dict of label -> data, got {data!r:.60}")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: expected a number, got {value!r:.40}")
    return float(value)


def _values(values, where: str) -> np.ndarray:
    """A list / tuple / 1-D array of numbers as float64 (non-finite values kept: the caller filters)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not (np.issubdtype(values.dtype, np.number)):
            raise ValueError(f"{where}: expected a 1-D array of numbers, got {values.dtype} {values.shape}")
        return values.astype(np.float64)
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: expected a list of values over seeds, got {type(values).__name__}")
    return np.array([_number(v, where) for v in values], dtype=np.float64)


def _keep(values: np.ndarray, log: bool) -> np.ndarray:
    """The values a plot can draw: finite, and positive on a log axis."""
    ok = np.isfinite(values) & ((values > 0) if log else True)
    return values[ok]


#################################################################################
#                                 Line plots                                    #
#################################################################################


def curve_statistics(points: Mapping[float, Sequence[float]], *, log: bool = False,
                     where: str = "curve") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max, count) of one curve, x increasing: at every x the statistics of its drawable
    values over seeds; x values with no drawable value (or a non-finite x) are left out."""
    if not isinstance(points, Mapping):
        raise ValueError(f"{where}: expected a dict of x -> values over seeds, got {type(points).__name__}")
    rows = []
    for x, values in points.items():
        x = _number(x, f"{where}: x")
        kept = _keep(_values(values, f"{where} at x={x:g}"), log)
        if math.isfinite(x) and kept.size:
            rows.append((x, kept.mean(), kept.min(), kept.max(), kept.size))
    rows.sort(key=lambda row: row[0])
    columns = np.array(rows, dtype=np.float64).reshape(-1, 5).T
    return columns[0], columns[1], columns[2], columns[3], columns[4].astype(np.int64)


def curves_figure(curves: dict[str, dict[float, list[float]]], *, xlabel: str, ylabel: str, title: str,
                  logy: bool = False, size: tuple[float, float] = PLOT_SIZE) -> Figure:
    """One line per label through the mean over seeds at each x (sorted by x), with a shaded band from the
    minimum to the maximum over seeds when some point has more than one value.

    `axes[0].lines[i]` is the line of the i-th label (in input order), so callers and tests can read the
    plotted means back."""
    _check_nonempty(curves, "curves")
    fig, ax = _new_figure(size)
    for i, (label, points) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        x, mean, low, high, count = curve_statistics(points, log=logy, where=f"curves[{label!r}]")
        name = str(label) if x.size else f"{label}{_EMPTY_SUFFIX}"
        ax.plot(x, mean, color=colour, linewidth=1.6, marker="o" if x.size <= 30 else None, markersize=3,
                label=name)
        if np.any(count > 1):
            ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
    if logy:
        ax.set_yscale("log")
    _style_axes(ax, title, xlabel, ylabel + (" (log scale)" if logy else ""))
    _legend(ax, len(curves))
    return fig


def cost_figure(points: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
                logx: bool = True, annotate: dict[str, list[str]] | None = None, logy: bool = False,
                reference: Mapping[str, float] | None = None, size: tuple[float, float] = PLOT_SIZE) -> Figure:
    """Quality against cost (e.g. FD against NFE or GFLOPs per image): for each label a line with markers
    through its (cost, value) points, sorted by cost.

    `annotate[label][j]` is written next to the j-th point of `points[label]` (in the order given, e.g.
    "1 step"); `reference` draws labelled horizontal dashed lines (e.g. the FD of real data, the floor).
    `axes[0].lines[i]` is the i-th label's line; reference lines come after them."""
    _check_nonempty(points, "points")
    annotate = annotate or {}
    unknown = sorted(set(annotate) - set(points))
    if unknown:
        raise ValueError(f"annotate: labels {unknown} are not in points ({sorted(points)})")
    fig, ax = _new_figure(size)
    for i, (label, pairs) in enumerate(points.items()):
        where = f"points[{label!r}]"
        if not isinstance(pairs, (list, tuple)):
            raise ValueError(f"{where}: expected a list of (cost, value) pairs, got {type(pairs).__name__}")
        notes = list(annotate.get(label, [""] * len(pairs)))
        if len(notes) != len(pairs):
            raise ValueError(f"annotate[{label!r}]: {len(notes)} annotations for {len(pairs)} points")
        rows = []
        for j, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"{where}[{j}]: expected a (cost, value) pair, got {pair!r:.40}")
            cost, value = _number(pair[0], f"{where}[{j}] cost"), _number(pair[1], f"{where}[{j}] value")
            if _keep(np.array([cost]), logx).size and _keep(np.array([value]), logy).size:
                rows.append((cost, value, str(notes[j])))
        rows.sort(key=lambda row: row[0])
        colour = PALETTE[i % len(PALETTE)]
        name = str(label) if rows else f"{label}{_EMPTY_SUFFIX}"
        ax.plot([r[0] for r in rows], [r[1] for r in rows], color=colour, linewidth=1.4, marker="o",
                markersize=5, label=name)
        for cost, value, note in rows:
            if note:
                ax.annotate(note, (cost, value), xytext=(5, 4), textcoords="offset points", fontsize=SMALL_SIZE,
                            color=colour)
    for k, (name, value) in enumerate((reference or {}).items()):
        value = _number(value, f"reference[{name!r}]")
        if _keep(np.array([value]), logy).size:
            ax.axhline(value, color="#555555", linestyle=("--", ":", "-.")[k % 3], linewidth=1.0, label=str(name))
    if logx:
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
    if logy:
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
    ax.margins(x=0.15, y=0.1)  # room for the annotations of the outermost points
    _style_axes(ax, title, xlabel + (" (log scale)" if logx else ""), ylabel + (" (log scale)" if logy else ""))
    _legend(ax, len(points) + len(reference or {}))
    return fig


#################################################################################
#                                 Bars                                          #
#################################################################################


def bar_figure(groups: dict[str, list[float]], *, ylabel: str, title: str, value_format: str | None = None,
               size: tuple[float, float] = PLOT_SIZE) -> Figure:
    """One bar per label at the mean of its finite values (one per seed), each value as a dot on the bar,
    and an error bar from the minimum to the maximum when there is more than one value.

    `value_format` (e.g. "{:.0f} s") writes the mean above each bar. `axes[0].patches[i]` is the i-th
    label's bar; a label with no finite value gets a bar of height 0 and "n/a" above it."""
    _check_nonempty(groups, "groups")
    fig, ax = _new_figure(size)
    labels = [str(label) for label in groups]
    for i, (label, values) in enumerate(groups.items()):
        kept = _keep(_values(values, f"groups[{label!r}]"), False)
        colour = PALETTE[i % len(PALETTE)]
        mean = float(kept.mean()) if kept.size else 0.0
        ax.bar(i, mean, width=0.65, color=colour, alpha=0.85)
        if kept.size > 1:
            ax.errorbar(i, mean, yerr=[[mean - kept.min()], [kept.max() - mean]], color="#222222",
                        capsize=4, linewidth=1.0)
            ax.scatter(np.full(kept.size, i, dtype=np.float64), kept, s=12, color="#222222", zorder=3)
        if value_format is not None or not kept.size:  # above the bar and its error bar
            text = value_format.format(mean) if kept.size and value_format is not None else "n/a"
            top = float(kept.max()) if kept.size else 0.0
            ax.annotate(text, (i, max(top, mean)), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=SMALL_SIZE)
    ax.set_xticks(range(len(labels)), labels)
    if len(labels) > 5 or max(len(s) for s in labels) > 10:
        ax.tick_params(axis="x", labelrotation=30)
        for text in ax.get_xticklabels():
            text.set_horizontalalignment("right")
    ax.margins(y=0.12)
    _style_axes(ax, title, "", ylabel)
    ax.grid(False, axis="x")
    return fig


def scatter_panels_figure(panels: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str, ncols: int = 3,
                          limit: float | None = None, panel_size: float = 2.6) -> Figure:
    """Point clouds in 2-D, one panel per label: the reference points (e.g. data) in grey under the points of
    the label (e.g. a model's samples) in colour. `panels[label] = (reference [N, 2], points [M, 2])`; the
    axes are shared and square, from -limit to limit (default: the largest absolute coordinate).
    `axes[i].collections[1]` holds the i-th label's points."""
    _check_nonempty(panels, "panels")
    arrays = {}
    for label, pair in panels.items():
        ref, pts = (np.asarray(a, dtype=np.float64) for a in pair)
        if ref.ndim != 2 or pts.ndim != 2 or ref.shape[1] != 2 or pts.shape[1] != 2:
            raise ValueError(f"panels[{label!r}] needs two [N, 2] arrays, got {ref.shape} and {pts.shape}")
        arrays[label] = (ref, pts)
    if limit is None:
        limit = max(float(np.nanmax(np.abs(np.concatenate(pair)))) for pair in arrays.values()) * 1.05
    cols = min(ncols, len(arrays))
    rows = math.ceil(len(arrays) / cols)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + 0.4), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    for i, (label, (ref, pts)) in enumerate(arrays.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.scatter(ref[:, 0], ref[:, 1], s=2, color="#b8b8b8", linewidths=0)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, color=PALETTE[i % len(PALETTE)], linewidths=0)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_title(str(label), fontsize=SMALL_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
    return fig


#################################################################################
#                                 Image mosaics                                 #
#################################################################################


def _pixels(images: torch.Tensor, where: str) -> np.ndarray:
    """Float images [N, C, H, W] (C = 1 or 3, values in [0, 1]) -> float32 numpy [N, H, W, 3], clamped."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor [N, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"{where}: expected float images [N, 3, H, W] in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")
    pixels = images.detach().float().clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def _display_scale(height: int, cell_px: int | None) -> float:
    """Output pixels per image pixel: small images are enlarged by a whole factor to about 64 pixels (so
    nearest-neighbour enlargement keeps every pixel square); images above 128 pixels are shrunk to 128."""
    if cell_px is not None:
        if cell_px < 1:
            raise ValueError(f"cell_px must be >= 1, got {cell_px}")
        return cell_px / height
    if height < 64:
        return float(max(1, 64 // height))
    return min(1.0, 128 / height)


class Mosaic(NamedTuple):
    canvas: np.ndarray  # float32 [height, width, 3] in [0, 1]
    group_centres: list[float]  # x of the centre of each column block, in canvas pixels
    row_centres: list[float]  # y of the centre of each row


def _mosaic(cells: np.ndarray, rows: int, cols: int, groups: int, gap: int, row_gap: int,
            group_gap: int) -> Mosaic:
    """[rows * cols, H, W, 3] cells (row-major; NaN cells are empty) laid out on one RGB canvas: `gap` pixels
    between neighbouring cells of a block of cols // groups columns, `group_gap` between blocks, `row_gap`
    between rows. Gaps are light grey, empty cells white (so a black-background image keeps its edge)."""
    _, h, w, _ = cells.shape
    per_group = cols // groups
    block = per_group * w + (per_group - 1) * gap
    width = groups * block + (groups - 1) * group_gap
    height = rows * h + (rows - 1) * row_gap
    canvas = np.full((height, width, 3), 0.85, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            group, within = divmod(c, per_group)
            left = group * (block + group_gap) + within * (w + gap)
            top = r * (h + row_gap)
            cell = cells[r * cols + c]
            canvas[top: top + h, left: left + w] = 1.0 if np.isnan(cell).any() else cell
    group_centres = [g * (block + group_gap) + (block - 1) / 2 for g in range(groups)]
    row_centres = [r * (h + row_gap) + (h - 1) / 2 for r in range(rows)]
    return Mosaic(canvas, group_centres, row_centres)


def _image_figure(canvas: np.ndarray, scale: float, left_in: float, top_in: float,
                  title: str | None) -> tuple[Figure, Axes]:
    """A figure holding `canvas` at `scale` output pixels per canvas pixel, with `left_in` / `top_in`
    inches kept free for row labels and column headers (the title goes above those)."""
    image_w, image_h = canvas.shape[1] * scale / DPI, canvas.shape[0] * scale / DPI
    title_in = 0.35 if title else 0.0
    pad = 0.05
    width, height = left_in + image_w + pad, top_in + title_in + image_h + pad
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((left_in / width, pad / height, image_w / width, image_h / height))
    nearest = scale >= 1 and float(scale).is_integer()
    ax.imshow(canvas, interpolation="nearest" if nearest else "antialiased", aspect="equal")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0, labelsize=LABEL_SIZE)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE, y=1.0 - 0.05 / height, va="top")
    return fig, ax


def _text_inches(texts: Sequence[str], size: float = LABEL_SIZE) -> float:
    """A generous estimate of the width of the longest line of `texts` (0.6 em a character)."""
    longest = max((len(line) for t in texts for line in t.splitlines()), default=0)
    return longest * 0.6 * size / 72


def _check_labels(labels: torch.Tensor, count: int, where: str) -> np.ndarray:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor [N], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if labels.numel() != count:
        raise ValueError(f"{where}: {count} images but {labels.numel()} labels")
    return labels.cpu().numpy().astype(np.int64)


def _class_names(classes: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(int(c)) for c in classes]
    if classes.min() < 0 or classes.max() >= len(class_names):
        raise ValueError(f"labels {classes.tolist()} do not all index class_names ({len(class_names)} names)")
    return [str(class_names[int(c)]) for c in classes]


def sample_comparison_figure(images: dict[str, torch.Tensor], labels: torch.Tensor, *,
                             class_names: list[str] | None = None, per_class: int = 1, title: str | None = None,
                             cell_px: int | None = None) -> Figure:
    """Samples of several models side by side: one row per class (increasing label), one column block per
    model (its first `per_class` images of that class, left to right; a class with fewer images leaves
    white cells), model names above the blocks and class names at the left of the rows.

    `images[name]` is [N, 3, H, W] in [0, 1], generated for the requested classes `labels` [N] (the same for
    every model). `cell_px` is the displayed size of one image (default: see `_display_scale`)."""
    _check_nonempty(images, "images")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    pixels = {name: _pixels(batch, f"images[{name!r}]") for name, batch in images.items()}
    shapes = {name: p.shape[1:] for name, p in pixels.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"images: the models' image sizes differ: {shapes}")
    label_array = None
    for name, p in pixels.items():
        label_array = _check_labels(labels, p.shape[0], f"images[{name!r}]")
    if label_array.size == 0:
        raise ValueError("labels: no images to show (N = 0)")
    classes = np.unique(label_array)
    rows, models = len(classes), list(pixels)
    h, w = next(iter(shapes.values()))[:2]
    cells = np.full((rows, len(models), per_class, h, w, 3), np.nan, dtype=np.float32)
    for r, cls in enumerate(classes):
        members = np.flatnonzero(label_array == cls)[:per_class]
        for m, name in enumerate(models):
            cells[r, m, : len(members)] = pixels[name][members]
    cols = len(models) * per_class
    mosaic = _mosaic(cells.reshape(rows * cols, h, w, 3), rows, cols, len(models), gap=max(1, w // 32),
                     row_gap=max(1, h // 16), group_gap=max(4, w // 4))
    scale = _display_scale(h, cell_px)
    block_px = (mosaic.group_centres[0] * 2 + 1) * scale
    # Model names wrapped to their block's width (about 6.5 output pixels a character at LABEL_SIZE and DPI).
    headers = [textwrap.fill(str(name), max(6, int(block_px // 6.5)), break_long_words=False) for name in models]
    row_names = _class_names(classes, class_names)
    header_lines = max(header.count("\n") + 1 for header in headers)
    fig, ax = _image_figure(mosaic.canvas, scale, left_in=_text_inches(row_names) + 0.15,
                            top_in=header_lines * LABEL_SIZE * 1.3 / 72 + 0.12, title=title)
    ax.xaxis.tick_top()
    ax.set_xticks(mosaic.group_centres, headers, fontsize=LABEL_SIZE)
    ax.set_yticks(mosaic.row_centres, row_names, fontsize=LABEL_SIZE)
    return fig


def image_grid_figure(images: torch.Tensor, *, ncols: int, row_names: Sequence[str] | None = None,
                      title: str | None = None, cell_px: int | None = None) -> Figure:
    """Images [N, 3, H, W] in [0, 1], `ncols` a row in the given order (the last row filled with white
    cells), with `row_names[i]` at the left of row i when given (one name per row)."""
    pixels = _pixels(images, "images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if pixels.shape[0] == 0:
        raise ValueError("images: no images to show (N = 0)")
    n, h, w, _ = pixels.shape
    rows = math.ceil(n / ncols)
    if row_names is not None and len(row_names) != rows:
        raise ValueError(f"row_names: {len(row_names)} names for {rows} rows of {ncols} images")
    cells = np.full((rows * ncols, h, w, 3), np.nan, dtype=np.float32)
    cells[:n] = pixels
    gap = max(1, w // 16)
    mosaic = _mosaic(cells, rows, ncols, 1, gap=gap, row_gap=gap, group_gap=0)
    scale = _display_scale(h, cell_px)
    names = [str(name) for name in row_names] if row_names is not None else []
    fig, ax = _image_figure(mosaic.canvas, scale, left_in=_text_inches(names) + 0.1 if names else 0.05,
                            top_in=0.05, title=title)
    ax.set_xticks([])
    ax.set_yticks(mosaic.row_centres if names else [], names)
    return fig
