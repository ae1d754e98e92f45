"""A self-contained HTML report (plus the same numbers as JSON) for a run of the MF-RAE pipeline.

`write_report(out_dir, report, figures, title=..., note=...)` writes

* `out_dir/report.json`: `report` as given, made JSON-safe (numpy / torch scalars and arrays -> numbers and
  lists, paths -> strings, NaN / inf -> null);
* `out_dir/report.html`: one file with no external resources and no scripts. Every figure is a matplotlib
  PNG (`mfrae.plots`) embedded as a base64 data URI. Sections: note, samples (all models side by side, one
  row per class; or single image panels), reconstructions (originals above their reconstructions), training
  curves per stage (loss, log-scale optional, gradient norm, and the FD measured during training, from each
  run's `metrics.jsonl`), quality against NFE and GFLOPs (plots and table), time per stage (bar chart and
  table), and the raw report;
* `out_dir/report_<name>.png`: every figure of the page once more as a file, so documents can link them
  (`ReportPaths.figures` lists them).

All caller text is HTML-escaped. A missing or partly unreadable `metrics.jsonl` gives a note in the page,
not an error: the report is written at the end of long runs and should not be lost to one bad file.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from mfrae import plots
from mfrae.eval.samples import check_uint8_nhwc, to_uint8_nhwc
from mfrae.images import from_uint8_nhwc

ImagesLike = Tensor | np.ndarray  # float [N, 3, H, W] in [0, 1], or uint8 [N, H, W, 3]


#################################################################################
#                                 Inputs                                        #
#################################################################################


@dataclass
class ImagePanel:
    """A grid of images. With `labels`, one row per class (classes in increasing order, at most `ncols`
    images each, empty cells white) and the class name at the left of each row; without, `ncols` images a
    row in the given order. Alternatively `path` names an existing PNG / JPEG to embed as is."""

    title: str
    images: ImagesLike | None = None
    labels: Sequence[int] | Tensor | np.ndarray | None = None
    ncols: int | None = None  # default: the largest class count (with labels), else a near-square grid
    path: str | Path | None = None
    caption: str = ""
    class_names: Sequence[str] | None = None  # row labels; default str(label)
    cell_px: int | None = None  # displayed size of one image (default: `mfrae.plots._display_scale`)


@dataclass
class SampleComparison:
    """Samples of several models for the same requested classes, side by side: one row per class, one
    column block per model (`per_class` images of the class each)."""

    title: str
    images: Mapping[str, ImagesLike]  # model name (the column header) -> its images
    labels: Sequence[int] | Tensor | np.ndarray  # the requested classes [N], the same for every model
    per_class: int = 1
    class_names: Sequence[str] | None = None
    caption: str = ""


@dataclass
class ReconstructionPanel:
    """Originals and their reconstructions (same count and size), shown as pairs of rows: `ncols`
    originals, then their reconstructions below. The caption adds the MSE and PSNR over all pairs."""

    title: str
    originals: ImagesLike
    reconstructions: ImagesLike
    ncols: int = 10
    caption: str = ""
    cell_px: int | None = None


@dataclass
class QualityRow:
    """One row of the quality-against-cost table and one point of its plots; None shows as a dash (and
    leaves the point out). Rows of one `family` (default: the model name) are joined by a line."""

    model: str
    nfe: int
    gflops: float | None = None  # per image, generator (and decoder, if the caller includes it)
    fd: float | None = None
    class_accuracy: float | None = None  # fraction in [0, 1]
    images_per_s: float | None = None
    family: str | None = None  # e.g. "MFD" for its 1- and 2-step samplers


@dataclass
class ReportFigures:
    """Everything the page shows besides the title and note.

    `runs` maps a stage name to its run folder (its `metrics.jsonl` is read) or directly to a metrics file;
    `stage_seconds` maps a stage name to its wall-clock seconds; `log_loss` draws losses on a log scale;
    `fd_reference` draws labelled horizontal lines on the FD-against-cost plots (e.g. the FD of real data)."""

    samples: Sequence[ImagePanel] = ()
    comparison: SampleComparison | None = None
    reconstructions: Sequence[ReconstructionPanel] = ()
    runs: Mapping[str, str | Path] = field(default_factory=dict)
    quality: Sequence[QualityRow] = ()
    fd_reference: Mapping[str, float] = field(default_factory=dict)
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    log_loss: bool = True


class ReportPaths(NamedTuple):
    json: Path
    html: Path
    figures: tuple[Path, ...] = ()  # the report_<name>.png files


class RenderedFigure(NamedTuple):
    name: str  # file stem: report_<name>.png
    png: bytes


class Page:
    """The figures of one page as they are rendered: each figure becomes PNG bytes once, embedded in the
    HTML and kept for its file."""

    def __init__(self) -> None:
        self.figures: list[RenderedFigure] = []

    def image(self, name: str, fig: Figure, alt: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "figure"
        taken = {f.name for f in self.figures}
        unique, k = slug, 2
        while unique in taken:
            unique, k = f"{slug}_{k}", k + 1
        png = plots.figure_png(fig)
        self.figures.append(RenderedFigure(unique, png))
        return plots.png_html(png, alt)


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


def _as_float(images: ImagesLike, where: str) -> Tensor:
    """Images as float [N, 3, H, W] in [0, 1] (uint8 NHWC arrays are checked and divided by 255)."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"{where}: expected float images [N, 3, H, W] in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        return images.detach().float().cpu()
    if isinstance(images, np.ndarray):
        return from_uint8_nhwc(check_uint8_nhwc(images, where))
    raise ValueError(f"{where}: images must be a float tensor [N, 3, H, W] or a uint8 array [N, H, W, 3], "
                     f"got {type(images).__name__}")


def _as_uint8(images: ImagesLike, where: str) -> np.ndarray:
    if isinstance(images, Tensor):
        return to_uint8_nhwc(images)
    if isinstance(images, np.ndarray):
        return check_uint8_nhwc(images, where)
    raise ValueError(f"{where}: images must be a float tensor [N, 3, H, W] or a uint8 array [N, H, W, 3], "
                     f"got {type(images).__name__}")


def _labels(labels: Any, count: int, where: str) -> Tensor:
    array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if array.shape != (count,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers of shape ({count},), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def _figure(title: str, body: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><h3>{html.escape(title)}</h3>{body}{cap}</figure>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _image_panel_html(page: Page, panel: ImagePanel, index: int) -> str:
    where = f"samples[{index}] ({panel.title!r})"
    if panel.path is not None:
        path = Path(panel.path)
        if not path.is_file():
            return _figure(panel.title, _note(f"image file not found: {path}"), panel.caption)
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"{where}: {path} is not a .png / .jpg / .jpeg file")
        uri = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return _figure(panel.title, f'<img alt="{html.escape(panel.title)}" src="{uri}">', panel.caption)
    if panel.images is None:
        raise ValueError(f"{where}: give images or path")
    images = _as_float(panel.images, where)
    if panel.labels is not None:
        labels = _labels(panel.labels, len(images), where)
        per_class = panel.ncols or int(torch.bincount(labels - labels.min()).max())
        fig = plots.sample_comparison_figure({panel.title: images}, labels, class_names=panel.class_names,
                                             per_class=per_class, cell_px=panel.cell_px)
        caption = panel.caption or "One row per class; the class is at the left of each row."
    else:
        fig = plots.image_grid_figure(images, ncols=panel.ncols or math.ceil(math.sqrt(len(images))),
                                      cell_px=panel.cell_px)
        caption = panel.caption
    return _figure(panel.title, page.image(f"samples_{index}", fig, panel.title), caption)


def _comparison_html(page: Page, comparison: SampleComparison) -> str:
    where = f"comparison ({comparison.title!r})"
    images = {str(name): _as_float(batch, f"{where} images[{name!r}]") for name, batch in comparison.images.items()}
    if not images:
        raise ValueError(f"{where}: no models in images")
    labels = _labels(comparison.labels, len(next(iter(images.values()))), where)
    fig = plots.sample_comparison_figure(images, labels, class_names=list(comparison.class_names or []) or None,
                                         per_class=comparison.per_class)
    caption = comparison.caption or ("One row per requested class, one column block per model "
                                     f"({comparison.per_class} image(s) of the class each).")
    return _figure(comparison.title, page.image("samples", fig, comparison.title), caption)


def _reconstruction_html(page: Page, panel: ReconstructionPanel, index: int) -> str:
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
    fig = plots.image_grid_figure(from_uint8_nhwc(cells), ncols=ncols, row_names=["orig", "recon"] * rows,
                                  cell_px=panel.cell_px)
    # Error on the 8-bit images shown, in [0, 1] units: MSE and PSNR = 10 log10(1 / MSE).
    mse = float(np.mean((originals.astype(np.float64) - recons.astype(np.float64)) ** 2)) / 255.0**2
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else math.inf
    stats = f"MSE {mse:.4g}, PSNR {psnr:.2f} dB over {n} images (pixels in [0, 1])."
    caption = f"{panel.caption} {stats}".strip()
    return _figure(panel.title, page.image(f"reconstructions_{index}", fig, panel.title), caption)


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


def _curve(records: list[dict[str, Any]], key: str) -> dict[float, list[float]]:
    """step -> [value] of one logged key (records without a numeric value for it are left out)."""
    return {r["step"]: [r[key]] for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)}


def _stage_curves_html(page: Page, stage: str, source: str | Path, log_loss: bool) -> str:
    log = read_metrics(source)
    if log is None:
        return _figure(stage, _note(f"no metrics file at {Path(source)}"))
    size = (4.8, 3.0)
    loss_keys = ["loss"] + sorted({k for r in log.records for k in r if k.endswith("_loss") and k != "loss"})
    losses = {k: c for k in loss_keys if (c := _curve(log.records, k))}
    body = ""
    if losses:
        fig = plots.curves_figure(losses, xlabel="step", ylabel="loss", title=f"{stage}: loss", logy=log_loss,
                                  size=size)
        body += page.image(f"curves_{stage}_loss", fig, f"{stage}: loss")
    grads = _curve(log.records, "grad_norm")
    if grads:
        fig = plots.curves_figure({"grad_norm": grads}, xlabel="step", ylabel="pre-clip gradient norm",
                                  title=f"{stage}: gradient norm", size=size)
        body += page.image(f"curves_{stage}_grad_norm", fig, f"{stage}: gradient norm")
    # Quality during training (`eval/fd_*` of mfrae.train.evaluation), when the run measured it.
    fd_keys = sorted({k for r in log.records for k in r if k.startswith("eval/fd_")})
    fds = {k[len("eval/fd_"):]: c for k in fd_keys if (c := _curve(log.records, k))}
    if fds:
        title = f"{stage}: FD of EMA samples during training"
        fig = plots.curves_figure(fds, xlabel="step", ylabel="FD", title=title, size=size)
        body += page.image(f"curves_{stage}_fd", fig, title)
    if not body:
        body = _note("no loss, gradient norm or FD values in the metrics file")
    notes = f"{len(log.records)} records from {log.path}"
    if log.skipped:
        notes += f"; {log.skipped} unreadable line(s) skipped"
    return _figure(stage, f'<div class="charts">{body}</div>', notes)


#################################################################################
#                                 Quality against cost                          #
#################################################################################


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


def _cost_plots_html(page: Page, rows: Sequence[QualityRow], reference: Mapping[str, float]) -> str:
    """FD against NFE and against GFLOPs per image, one line per family of samplers; empty if no row has
    an FD. On the GFLOPs plot each point is annotated with its NFE."""
    by_nfe: dict[str, list[tuple[float, float]]] = {}
    by_flops: dict[str, list[tuple[float, float]]] = {}
    notes: dict[str, list[str]] = {}
    for row in rows:
        if not _finite(row.fd):
            continue
        family = str(row.family or row.model)
        by_nfe.setdefault(family, []).append((float(row.nfe), float(row.fd)))
        if _finite(row.gflops):
            by_flops.setdefault(family, []).append((float(row.gflops), float(row.fd)))
            notes.setdefault(family, []).append(f"{int(row.nfe)} NFE")
    body = ""
    if by_nfe:
        fig = plots.cost_figure(by_nfe, xlabel="NFE (network evaluations per image)", ylabel="FD",
                                title="FD against NFE", reference=reference)
        body += page.image("fd_vs_nfe", fig, "FD against NFE")
    if by_flops:
        fig = plots.cost_figure(by_flops, xlabel="GFLOPs per image", ylabel="FD",
                                title="FD against GFLOPs per image", annotate=notes, reference=reference)
        body += page.image("fd_vs_gflops", fig, "FD against GFLOPs per image")
    return f'<div class="charts">{body}</div>' if body else ""


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


def _stage_times_html(page: Page, stage_seconds: Mapping[str, float]) -> str:
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
    fig = plots.bar_figure({n: [s] for n, s in items}, ylabel="seconds", title="time per stage",
                           value_format="{:.0f} s", size=(5.6, 3.2))
    return f'<div class="charts">{page.image("stage_seconds", fig, "time per stage")}{table}</div>'


#################################################################################
#                                 Page                                          #
#################################################################################

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
figure { display: inline-block; vertical-align: top; margin: 0.5em 1.2em 1em 0; max-width: 100%; }
figure h3 { margin: 0 0 0.3em; font-size: 1em; } figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-style: italic; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{body}</section>'


def _render(report: Mapping[str, Any], figures: ReportFigures, title: str, note: str) -> tuple[str, Page]:
    page = Page()
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    if figures.comparison is not None or figures.samples:
        body = _comparison_html(page, figures.comparison) if figures.comparison is not None else ""
        body += "".join(_image_panel_html(page, p, i) for i, p in enumerate(figures.samples))
        parts.append(_section("samples", "Samples", body))
    if figures.reconstructions:
        parts.append(_section("reconstructions", "Reconstructions", "".join(
            _reconstruction_html(page, p, i) for i, p in enumerate(figures.reconstructions))))
    if figures.runs:
        parts.append(_section("curves", "Training curves", "".join(
            _stage_curves_html(page, str(stage), source, figures.log_loss) for stage, source in figures.runs.items())))
    if figures.quality:
        parts.append(_section("quality", "Quality against cost",
                              _cost_plots_html(page, figures.quality, figures.fd_reference)
                              + _quality_table(figures.quality)))
    if figures.stage_seconds:
        parts.append(_section("timing", "Time per stage", _stage_times_html(page, figures.stage_seconds)))
    raw = html.escape(json.dumps(json_safe(report), indent=2, allow_nan=False))
    parts.append(_section("raw", "Report data", f"<details><summary>report.json</summary><pre>{raw}</pre></details>"))
    text = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    return text, page


def render_html(report: Mapping[str, Any], figures: ReportFigures, title: str, note: str) -> str:
    """The report page as one HTML string (see the module docstring for its sections)."""
    return _render(report, figures, title, note)[0]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_report(out_dir: str | Path, report: Mapping[str, Any], figures: ReportFigures | None = None, *,
                 title: str = "MF-RAE report", note: str = "") -> ReportPaths:
    """Write `out_dir/report.json` (`report`, JSON-safe), the self-contained `out_dir/report.html` and each
    of its figures as `out_dir/report_<name>.png`.

    Everything is built before the first file is written (a bad figure leaves no files), and each file is
    written to a temporary name and renamed, so a reader never sees half a file."""
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    figures = figures or ReportFigures()
    out = Path(out_dir)
    text_json = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
    text_html, page = _render(report, figures, title, note)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for rendered in page.figures:
        path = out / f"report_{rendered.name}.png"
        _write_atomic(path, rendered.png)
        pngs.append(path)
    paths = ReportPaths(out / "report.json", out / "report.html", tuple(pngs))
    _write_atomic(paths.json, text_json.encode("utf-8"))
    _write_atomic(paths.html, text_html.encode("utf-8"))
    return paths
