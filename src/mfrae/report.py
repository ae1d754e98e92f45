"""A self-contained HTML report (plus the same numbers as JSON) for a run of the MF-RAE pipeline.

`write_report(out_dir, report, figures, title=..., note=...)` writes

* `out_dir/report.json`: `report` as given, made JSON-safe (numpy / torch scalars and arrays -> numbers and
  lists, paths -> strings, NaN / inf -> null);
* `out_dir/report.html`: one file with no external resources and no scripts. Images are embedded as base64
  PNG data URIs; charts are inline SVG drawn here (axes, ticks, legend). Sections: note, samples (one grid
  row per class), reconstructions (originals above their reconstructions), training curves per stage (loss,
  log-scale optional, and gradient norm, from each run's `metrics.jsonl`), quality against NFE and GFLOPs,
  time per stage (bar chart and table), and the raw report.

All caller text is HTML-escaped. A missing or partly unreadable `metrics.jsonl` gives a note in the page,
not an error: the report is written at the end of long runs and should not be lost to one bad file.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mfrae.eval.samples import check_uint8_nhwc, to_uint8_nhwc
from mfrae.images import make_grid

# Line colours (colour-blind-safe Okabe-Ito order), reused cyclically.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

ImagesLike = Tensor | np.ndarray  # float [N, 3, H, W] in [0, 1], or uint8 [N, H, W, 3]


#################################################################################
#                                 Inputs                                        #
#################################################################################


@dataclass
class ImagePanel:
    """A grid of images. With `labels`, one row per class (classes in increasing order, at most `ncols`
    images each, empty cells black) and the class name at the left of each row; without, `ncols` images a
    row in the given order. Alternatively `path` names an existing PNG / JPEG to embed as is."""

    title: str
    images: ImagesLike | None = None
    labels: Sequence[int] | Tensor | np.ndarray | None = None
    ncols: int | None = None  # default: the largest class count (with labels), else a near-square grid
    path: str | Path | None = None
    caption: str = ""
    class_names: Sequence[str] | None = None  # row labels; default str(label)
    scale: int = 2  # integer nearest-neighbour upscaling for display (32 px digits are tiny)


@dataclass
class ReconstructionPanel:
    """Originals and their reconstructions (same count and size), shown as pairs of rows: `ncols`
    originals, then their reconstructions below. The caption adds the MSE and PSNR over all pairs."""

    title: str
    originals: ImagesLike
    reconstructions: ImagesLike
    ncols: int = 10
    caption: str = ""
    scale: int = 2


@dataclass
class QualityRow:
    """One row of the quality-against-cost table; None shows as a dash."""

    model: str
    nfe: int
    gflops: float | None = None  # per image, generator (and decoder, if the caller includes it)
    fd: float | None = None
    class_accuracy: float | None = None  # fraction in [0, 1]
    images_per_s: float | None = None


@dataclass
class ReportFigures:
    """Everything the page shows besides the title and note.

    `runs` maps a stage name to its run folder (its `metrics.jsonl` is read) or directly to a metrics file;
    `stage_seconds` maps a stage name to its wall-clock seconds; `log_loss` draws losses on a log scale."""

    samples: Sequence[ImagePanel] = ()
    reconstructions: Sequence[ReconstructionPanel] = ()
    runs: Mapping[str, str | Path] = field(default_factory=dict)
    quality: Sequence[QualityRow] = ()
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    log_loss: bool = True


class ReportPaths(NamedTuple):
    json: Path
    html: Path


#################################################################################
#                                 JSON                                          #
#################################################################################


def json_safe(value: Any, where: str = "report") -> Any:
    """`value` with numpy / torch numbers and arrays turned into Python numbers and lists, paths and
    dataclasses into strings and dicts, tuples into lists, and non-finite floats into None (strict JSON has
    no NaN). Anything else raises TypeError naming the key path (e.g. `report['runs'][2]`)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Tensor):
        return json_safe(value.detach().cpu().tolist(), where)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), where)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, np.integer)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys must be strings")
            out[str(key)] = json_safe(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where}: cannot write a value of type {type(value).__name__} to JSON")


#################################################################################
#                                 Images                                        #
#################################################################################


def _as_uint8(images: ImagesLike, where: str) -> np.ndarray:
    if isinstance(images, Tensor):
        return to_uint8_nhwc(images)
    if isinstance(images, np.ndarray):
        return check_uint8_nhwc(images, where)
    raise ValueError(f"{where}: images must be a float tensor [N, 3, H, W] or a uint8 array [N, H, W, 3], "
                     f"got {type(images).__name__}")


def _grid(images: np.ndarray, ncols: int | None, padding: int = 2) -> np.ndarray:
    """`make_grid` with grey instead of black padding, so black-background cells stay apart."""
    grid = make_grid(images, nrow=ncols, padding=padding)
    gaps = make_grid(np.full_like(images, 255), nrow=ncols, padding=padding) == 0
    grid[gaps] = 160
    return grid


def _upscale(grid: np.ndarray, scale: int) -> np.ndarray:
    return grid if scale <= 1 else grid.repeat(scale, axis=0).repeat(scale, axis=1)


def _add_row_labels(grid: np.ndarray, names: Sequence[str], cell: int, padding: int) -> np.ndarray:
    """Put `names[i]` at the left of grid row i (rows are `cell` pixels apart after `padding`)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), name, font=font)[2] for name in names]
    margin = max(widths, default=0) + 8
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        box = probe.textbbox((0, 0), name, font=font)
        top = padding + i * cell + (cell - padding - (box[3] - box[1])) // 2 - box[1]
        draw.text((margin - 4 - (box[2] - box[0]), top), name, fill="black", font=font)
    return np.asarray(canvas)


def _labelled_grid(images: np.ndarray, row_names: Sequence[str], ncols: int, scale: int) -> np.ndarray:
    """uint8 images laid out `ncols` a row (the count must be a multiple of ncols), one name per row."""
    padding = 2
    grid = _upscale(_grid(images, ncols, padding), scale)
    return _add_row_labels(grid, row_names, (images.shape[1] + padding) * scale, padding * scale)


def class_grid(images: ImagesLike, labels: Any, ncols: int | None = None,
               class_names: Sequence[str] | None = None, scale: int = 2, where: str = "images") -> np.ndarray:
    """A uint8 HWC mosaic with one row per class (increasing label), its first `ncols` images in order."""
    pixels = _as_uint8(images, where)
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if labels.shape != (pixels.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers of shape ({pixels.shape[0]},), got "
                         f"{labels.dtype} {labels.shape}")
    classes = np.unique(labels)
    ncols = ncols or int(max(np.count_nonzero(labels == c) for c in classes))
    cells = np.zeros((len(classes) * ncols, *pixels.shape[1:]), dtype=np.uint8)
    for row, cls in enumerate(classes):
        members = pixels[labels == cls][:ncols]
        cells[row * ncols: row * ncols + len(members)] = members
    if class_names is not None:
        if any(not 0 <= int(c) < len(class_names) for c in classes):
            raise ValueError(f"{where}: labels {classes.tolist()} do not all index class_names "
                             f"({len(class_names)} names)")
        names = [str(class_names[int(c)]) for c in classes]
    else:
        names = [str(int(c)) for c in classes]
    return _labelled_grid(cells, names, ncols, scale)


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img_tag(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _figure(title: str, body: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><h3>{html.escape(title)}</h3>{body}{cap}</figure>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _image_panel_html(panel: ImagePanel, index: int) -> str:
    where = f"samples[{index}] ({panel.title!r})"
    if panel.path is not None:
        path = Path(panel.path)
        if not path.is_file():
            return _figure(panel.title, _note(f"image file not found: {path}"), panel.caption)
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"{where}: {path} is not a .png / .jpg / .jpeg file")
        uri = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return _figure(panel.title, _img_tag(uri, panel.title), panel.caption)
    if panel.images is None:
        raise ValueError(f"{where}: give images or path")
    if panel.labels is not None:
        grid = class_grid(panel.images, panel.labels, panel.ncols, panel.class_names, panel.scale, where)
        caption = panel.caption or "One row per class; the class is at the left of each row."
    else:
        grid = _upscale(_grid(_as_uint8(panel.images, where), panel.ncols), panel.scale)
        caption = panel.caption
    return _figure(panel.title, _img_tag(_png_data_uri(grid), panel.title), caption)


def _reconstruction_html(panel: ReconstructionPanel, index: int) -> str:
    where = f"reconstructions[{index}] ({panel.title!r})"
    originals = _as_uint8(panel.originals, f"{where} originals")
    recons = _as_uint8(panel.reconstructions, f"{where} reconstructions")
    if originals.shape != recons.shape:
        raise ValueError(f"{where}: originals {originals.shape} and reconstructions {recons.shape} differ in shape")
    if panel.ncols < 1:
        raise ValueError(f"{where}: ncols must be >= 1, got {panel.ncols}")
    n, ncols = originals.shape[0], panel.ncols
    rows = math.ceil(n / ncols)
    cells = np.zeros((2 * rows * ncols, *originals.shape[1:]), dtype=np.uint8)
    for r in range(rows):  # row pairs: originals, then their reconstructions right below
        chunk = slice(r * ncols, min(n, (r + 1) * ncols))
        count = chunk.stop - chunk.start
        cells[2 * r * ncols: 2 * r * ncols + count] = originals[chunk]
        cells[(2 * r + 1) * ncols: (2 * r + 1) * ncols + count] = recons[chunk]
    grid = _labelled_grid(cells, ["orig", "recon"] * rows, ncols, panel.scale)
    # Error on the 8-bit images shown, in [0, 1] units: MSE and PSNR = 10 log10(1 / MSE).
    mse = float(np.mean((originals.astype(np.float64) - recons.astype(np.float64)) ** 2)) / 255.0**2
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else math.inf
    stats = f"MSE {mse:.4g}, PSNR {psnr:.2f} dB over {n} images (pixels in [0, 1])."
    caption = f"{panel.caption} {stats}".strip()
    return _figure(panel.title, _img_tag(_png_data_uri(grid), panel.title), caption)


#################################################################################
#                                 SVG charts                                    #
#################################################################################


def _format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.4g}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range must be finite, got [{low}, {high}]")
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value / step) * step)
        value += step
    if ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten covering [low, high] (> 0); with fewer than three decades also 2x and 5x."""
    if low <= 0 or high <= 0:
        raise ValueError(f"log-scale range must be positive, got [{low}, {high}]")
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    if hi == lo:
        hi += 1
    multiples = (1, 2, 5) if hi - lo < 3 else (1,)
    ticks = [m * 10.0**e for e in range(lo, hi + 1) for m in multiples]
    # Keep the ticks inside the data range plus the round ones just outside it (to frame the data).
    below = max((t for t in ticks if t <= low), default=ticks[0])
    above = min((t for t in ticks if t >= high), default=ticks[-1])
    return [t for t in ticks if below <= t <= above]


class Series(NamedTuple):
    name: str
    x: Sequence[float]
    y: Sequence[float]


def svg_line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str, log_y: bool = False,
                   width: int = 460, height: int = 280) -> str:
    """An inline SVG line chart: axes, ticks with grid lines, axis labels, a title and a legend.

    Non-finite points (and, on a log scale, points <= 0) are left out, breaking the line there. With no
    drawable point the chart says so instead of drawing axes."""
    left, right, top, bottom = 62, 14, 44, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    drawable = []
    for s in series:
        points = [(float(x), float(y)) for x, y in zip(s.x, s.y)]
        keep = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
        drawable.append((s.name, points, keep))
    xs = [x for _, _, keep in drawable for x, _ in keep]
    ys = [y for _, _, keep in drawable for _, y in keep]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>']
    if not xs:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(out)

    x_ticks = nice_ticks(min(xs), max(xs))
    x_lo, x_hi = x_ticks[0], x_ticks[-1]
    if log_y:
        y_ticks = log_ticks(min(ys), max(ys))
        y_lo, y_hi = math.log10(y_ticks[0]), math.log10(y_ticks[-1])
    else:
        y_ticks = nice_ticks(min(ys), max(ys))
        y_lo, y_hi = y_ticks[0], y_ticks[-1]
    y_hi = y_hi if y_hi > y_lo else y_lo + 1.0

    def px(x: float) -> float:
        return left + (x - x_lo) / ((x_hi - x_lo) or 1.0) * plot_w

    def py(y: float) -> float:
        v = math.log10(y) if log_y else y
        return top + plot_h - (v - y_lo) / (y_hi - y_lo) * plot_h

    for t in y_ticks:  # horizontal grid lines and y tick labels
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_format_tick(t)}</text>')
    for t in x_ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" class="axis"/>'
                   f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{_format_tick(t)}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>'
               f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>')
    y_text = html.escape(y_label + (" (log scale)" if log_y else ""))
    out.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">{y_text}</text>')

    legend_x = left
    for i, (name, points, _) in enumerate(drawable):
        colour = PALETTE[i % len(PALETTE)]
        segments: list[list[str]] = [[]]
        for x, y in points:  # a dropped point breaks the line
            if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y):
                segments[-1].append(f"{px(x):.1f},{py(y):.1f}")
            elif segments[-1]:
                segments.append([])
        for seg in segments:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                out.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{colour}"/>')
            elif seg:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="30" y2="30" stroke="{colour}" stroke-width="3"/>'
                   f'<text x="{legend_x + 20}" y="34">{html.escape(name)}</text>')
        legend_x += 28 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)


def svg_bar_chart(items: Sequence[tuple[str, float]], title: str, unit: str = "s", width: int = 460) -> str:
    """An inline SVG horizontal bar chart (one bar per item, value printed at its end) with an x axis."""
    bar, gap, top, bottom = 18, 6, 28, 36
    left = 14 + 7 * max((len(name) for name, _ in items), default=4)
    right = 64
    height = top + bottom + len(items) * (bar + gap)
    values = [max(0.0, float(v)) if math.isfinite(float(v)) else 0.0 for _, v in items]
    ticks = nice_ticks(0.0, max(values, default=0.0) or 1.0)
    plot_w = width - left - right
    scale = plot_w / ticks[-1]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>']
    axis_y = top + len(items) * (bar + gap)
    for t in ticks:
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{axis_y}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{_format_tick(t)}</text>')
    for i, ((name, _), value) in enumerate(zip(items, values)):
        y = top + i * (bar + gap)
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<text x="{left - 6}" y="{y + bar - 5}" text-anchor="end">{html.escape(name)}</text>'
                   f'<rect x="{left}" y="{y}" width="{value * scale:.1f}" height="{bar}" fill="{colour}"/>'
                   f'<text x="{left + value * scale + 4:.1f}" y="{y + bar - 5}">{value:.3g} {html.escape(unit)}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{axis_y}" y2="{axis_y}" class="axis"/>'
               f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{html.escape(unit)}</text></svg>')
    return "".join(out)


#################################################################################
#                                 Metrics files                                 #
#################################################################################


class MetricsLog(NamedTuple):
    path: Path
    records: list[dict[str, Any]]
    skipped: int  # lines that were not a JSON object


def read_metrics(source: str | Path) -> MetricsLog | None:
    """Records of a run's `metrics.jsonl` (`source` is the run folder or the file itself); None if there
    is no such file. Lines that are not JSON objects (e.g. a line cut off when a run was killed) are
    skipped and counted."""
    path = Path(source)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return None
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            skipped += 1
    return MetricsLog(path, records, skipped)


def _curve(records: list[dict[str, Any]], key: str) -> Series:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
              and not isinstance(r.get(key), bool)]
    return Series(key, [p[0] for p in points], [p[1] for p in points])


def _stage_curves_html(stage: str, source: str | Path, log_loss: bool) -> str:
    log = read_metrics(source)
    if log is None:
        return _figure(stage, _note(f"no metrics file at {Path(source)}"))
    loss_keys = ["loss"] + sorted({k for r in log.records for k in r if k.endswith("_loss") and k != "loss"})
    losses = [s for s in (_curve(log.records, k) for k in loss_keys) if s.x]
    grads = [s for s in [_curve(log.records, "grad_norm")] if s.x]
    body = (svg_line_chart(losses, f"{stage}: loss", "step", "loss", log_y=log_loss)
            + svg_line_chart(grads, f"{stage}: gradient norm", "step", "pre-clip gradient norm"))
    # Quality during training (`eval/fd_*` of mfrae.train.evaluation), when the run measured it.
    fd_keys = sorted({k for r in log.records for k in r if k.startswith("eval/fd_")})
    if fd_keys:
        curves = [Series(k[len("eval/fd_"):], c.x, c.y) for k in fd_keys for c in [_curve(log.records, k)] if c.x]
        body += svg_line_chart(curves, f"{stage}: FD of EMA samples during training", "step", "FD")
    notes = f"{len(log.records)} records from {log.path}"
    if log.skipped:
        notes += f"; {log.skipped} unreadable line(s) skipped"
    return _figure(stage, f'<div class="charts">{body}</div>', notes)


#################################################################################
#                                 Tables                                        #
#################################################################################


def _cell(value: float | None, fmt: str) -> str:
    if value is None or not math.isfinite(float(value)):
        return "&ndash;"
    return format(float(value), fmt)


def _quality_table(rows: Sequence[QualityRow]) -> str:
    head = ("<tr><th>model</th><th>NFE</th><th>GFLOPs / image</th><th>FD</th><th>class accuracy</th>"
            "<th>images / s</th></tr>")
    body = []
    for row in rows:
        acc = None if row.class_accuracy is None else 100.0 * float(row.class_accuracy)
        body.append(f"<tr><td>{html.escape(str(row.model))}</td><td>{int(row.nfe)}</td>"
                    f"<td>{_cell(row.gflops, '.4g')}</td><td>{_cell(row.fd, '.3f')}</td>"
                    f"<td>{_cell(acc, '.1f')}{'' if acc is None else '%'}</td><td>{_cell(row.images_per_s, '.4g')}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _stage_times_html(stage_seconds: Mapping[str, float]) -> str:
    items = []
    for name, seconds in stage_seconds.items():
        try:
            items.append((str(name), float(seconds)))
        except (TypeError, ValueError):
            raise ValueError(f"stage_seconds[{name!r}] must be a number of seconds, got {seconds!r}") from None
    total = sum(s for _, s in items if math.isfinite(s))
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{_cell(s, '.1f')}</td>"
                   f"<td>{_cell(100 * s / total if total > 0 else None, '.1f')}</td></tr>" for n, s in items)
    table = (f"<table><tr><th>stage</th><th>seconds</th><th>% of total</th></tr>{rows}"
             f"<tr><th>total</th><th>{total:.1f}</th><th>100.0</th></tr></table>")
    return f'<div class="charts">{svg_bar_chart(items, "time per stage", "s")}{table}</div>'


#################################################################################
#                                 Page                                          #
#################################################################################

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
figure { display: inline-block; vertical-align: top; margin: 0.5em 1.2em 1em 0; }
figure h3 { margin: 0 0 0.3em; font-size: 1em; } figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
img { image-rendering: pixelated; border: 1px solid #ddd; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
svg { font-size: 11px; background: #fff; border: 1px solid #eee; } svg .title { font-weight: bold; font-size: 12px; }
svg .axis { stroke: #333; } svg .grid { stroke: #e4e4e4; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-style: italic; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{body}</section>'


def render_html(report: Mapping[str, Any], figures: ReportFigures, title: str, note: str) -> str:
    """The report page as one HTML string (see the module docstring for its sections)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    if figures.samples:
        parts.append(_section("samples", "Samples",
                              "".join(_image_panel_html(p, i) for i, p in enumerate(figures.samples))))
    if figures.reconstructions:
        parts.append(_section("reconstructions", "Reconstructions",
                              "".join(_reconstruction_html(p, i) for i, p in enumerate(figures.reconstructions))))
    if figures.runs:
        parts.append(_section("curves", "Training curves", "".join(
            _stage_curves_html(str(stage), source, figures.log_loss) for stage, source in figures.runs.items())))
    if figures.quality:
        parts.append(_section("quality", "Quality against cost", _quality_table(figures.quality)))
    if figures.stage_seconds:
        parts.append(_section("timing", "Time per stage", _stage_times_html(figures.stage_seconds)))
    raw = html.escape(json.dumps(json_safe(report), indent=2, allow_nan=False))
    parts.append(_section("raw", "Report data", f"<details><summary>report.json</summary><pre>{raw}</pre></details>"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(out_dir: str | Path, report: Mapping[str, Any], figures: ReportFigures | None = None, *,
                 title: str = "MF-RAE report", note: str = "") -> ReportPaths:
    """Write `out_dir/report.json` (`report`, JSON-safe) and the self-contained `out_dir/report.html`.

    Both files are written to a temporary name and renamed, so a reader never sees half a report."""
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    figures = figures or ReportFigures()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_json = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
    text_html = render_html(report, figures, title, note)  # built before writing: a bad figure leaves no files
    paths = ReportPaths(out / "report.json", out / "report.html")
    for path, text in ((paths.json, text_json), (paths.html, text_html)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths
