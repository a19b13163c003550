"""Figures of the report: test error per epoch for each cell, and ours-vs-paper bars for each table.

Figures are built on `matplotlib.figure.Figure` directly (the Agg canvas, no pyplot), so that importing this module
never changes the caller's backend and nothing needs a display. Colours are fixed per optimizer (SGD blue, SAM
orange, others in a fixed order) so that every figure of a report reads the same way.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from sam_repro.analysis.aggregate import Report, Row, TableReport
from sam_repro.analysis.grouping import arm_order, cell_label
from sam_repro.analysis.render import (
    MARKDOWN_LEGEND,
    METRIC_LABELS,
    UNIT_LABELS,
    VALUE_COLUMNS,
    extra_columns,
    render_notices_markdown,
    render_table_markdown,
    table_heading,
)
from sam_repro.analysis.runs import RunRecord, load_metrics
from sam_repro.files import atomic_write_bytes, atomic_write_text

ARM_COLOURS = {"sgd": "#1f77b4", "sam": "#ff7f0e"}
OTHER_COLOURS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DPI = 120


@dataclass(frozen=True)
class Curve:
    """Test error (%) of one run by epoch."""

    epochs: np.ndarray
    values: np.ndarray
    finished: bool


def arm_colours(arms: Sequence[str]) -> dict[str, str]:
    """SGD and SAM keep their colours; other arms take the next free colour in sorted order."""
    others = iter(OTHER_COLOURS * (1 + len(arms) // len(OTHER_COLOURS)))
    return {arm: ARM_COLOURS.get(arm) or next(others) for arm in sorted(arms)}


def curve_band(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, and per epoch the mean, min and max over the runs that reached it."""
    epochs = np.unique(np.concatenate([c.epochs for c in curves]))
    table = np.full((len(curves), len(epochs)), np.nan)
    for i, curve in enumerate(curves):
        table[i, np.searchsorted(epochs, curve.epochs)] = curve.values
    return epochs, np.nanmean(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)


def error_curves_figure(
    title: str,
    arms: Mapping[str, Sequence[Curve]],
    paper: Mapping[str, float],
    memorized: Mapping[str, Sequence[Curve]] | None = None,
) -> Figure:
    """Mean test error per epoch of each arm's finished runs, shaded between the best and worst seed.

    Unfinished runs are drawn as thin dotted lines; `paper` (arm -> test error %) as dashed horizontal lines.
    The y axis is logarithmic: the first epochs (tens of percent) and the end of training (a few percent, where
    SAM and SGD differ) both stay readable. With `memorized` (label-noise runs: the share of flipped training
    labels the network predicts, per epoch), a second panel beside it shows that, on a linear 0-100 axis.
    """
    figure = Figure(figsize=(12.0 if memorized else 7.0, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if memorized else 1, 1)
    colours = arm_colours(list(arms))
    _draw_curves(axes, arms, colours, "%")
    for arm in sorted(arms, key=arm_order):
        if arm in paper:
            axes.axhline(
                paper[arm], color=colours[arm], linestyle="--", linewidth=1.0, label=f"{arm}, paper: {paper[arm]:g}%"
            )
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_ylabel("test error (%)")
    axes.legend(fontsize=8, loc="upper right", title="shaded: min–max over seeds", title_fontsize=7)
    if memorized:
        right = figure.add_subplot(1, 2, 2)
        _draw_curves(right, memorized, {**colours, **arm_colours(list(memorized))}, "%")
        right.set_ylim(0, 100)
        right.set_ylabel("memorized: flipped training labels predicted (%)")
        right.legend(fontsize=8, loc="upper left", title="shaded: min–max over seeds", title_fontsize=7)
    for ax in figure.axes:
        ax.set_xlabel("epoch")
        ax.grid(True, which="major", alpha=0.3)
    figure.suptitle("\n".join(textwrap.wrap(title, 90 if not memorized else 150)), fontsize=10)  # wraps, never clips
    return figure


def _draw_curves(axes, arms: Mapping[str, Sequence[Curve]], colours: Mapping[str, str], unit: str) -> None:
    """Each arm's finished runs as their mean with a min-max band, its unfinished ones as dotted lines."""
    for arm in sorted(arms, key=arm_order):
        colour = colours[arm]
        finished = [c for c in arms[arm] if c.finished and len(c.epochs)]
        if finished:
            epochs, mean, low, high = curve_band(finished)
            label = f"{arm} (mean of {len(finished)}, final {mean[-1]:.2f}{unit})"
            axes.plot(epochs, mean, color=colour, linewidth=1.8, label=label)
            if len(finished) > 1:
                axes.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
        unfinished = [c for c in arms[arm] if not c.finished and len(c.epochs)]
        for i, curve in enumerate(unfinished):
            label = f"{arm}, {len(unfinished)} unfinished (not averaged)" if i == 0 else None
            axes.plot(curve.epochs, curve.values, color=colour, linewidth=0.8, linestyle=":", label=label)


def table_bars_figure(table: TableReport) -> Figure | None:
    """Ours (solid, 95% interval) beside the paper (hatched, its interval) for every cell we ran; None if none."""
    cells: dict[tuple, dict[str, Row]] = {}
    for row in table.rows:
        cells.setdefault((tuple(row.cell.items()), row.metric), {})[row.arm] = row
    cells = {key: arms for key, arms in cells.items() if any(r.ours for r in arms.values())}
    if not cells:
        return None
    arms = sorted({arm for by_arm in cells.values() for arm in by_arm}, key=arm_order)
    colours = arm_colours(arms)
    width = 0.8 / (2 * len(arms))
    figure = Figure(figsize=(max(6.0, 1.3 * len(cells) + 2.0), 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(cells))
    for a, arm in enumerate(arms):
        ours = [cells[key].get(arm) for key in cells]
        offset = (2 * a - len(arms) + 0.5) * width
        _bars(
            axes,
            positions + offset,
            width,
            [r.ours.mean if r and r.ours else math.nan for r in ours],
            [r.ours.half_width if r and r.ours else None for r in ours],
            colours[arm],
            f"{arm}, ours",
            None,
        )
        _bars(
            axes,
            positions + offset + width,
            width,
            [r.paper.value if r and r.paper else math.nan for r in ours],
            [r.paper.half_width if r and r.paper else None for r in ours],
            colours[arm],
            f"{arm}, paper",
            "///",
        )
    axes.set_xticks(positions, [_cell_tick(key, table) for key in cells], fontsize=8)
    axes.set_ylabel(UNIT_LABELS[table.unit].split(",")[0])
    name = f"Table {table.id}: {table.title}" if table.id is not None else table.title
    axes.set_title(f"{name}\nours: mean ± 95% interval over seeds; hatched: the paper", fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=min(4, 2 * len(arms)), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return figure


def _bars(axes, x, width, heights, half_widths, colour, label, hatch) -> None:
    errors = np.array([h if h is not None else 0.0 for h in half_widths])
    kwargs = {"facecolor": "white", "edgecolor": colour, "hatch": hatch} if hatch else {"color": colour}
    axes.bar(x, heights, width, label=label, yerr=errors, capsize=2, error_kw={"elinewidth": 0.8}, **kwargs)


def _cell_tick(key: tuple, table: TableReport) -> str:
    cell, metric = dict(key[0]), key[1]
    parts = []
    for column in table.columns:
        value = cell.get(column)
        if value is None or (column == "label_noise" and value == 0):
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append({"epochs": f"{text} ep", "label_noise": f"noise {text}"}.get(column, text))
    if len(table.metrics) > 1:
        parts.append(METRIC_LABELS.get(metric, metric))
    return "\n".join(parts)


def save_figure(
    figure: Figure,
    path: str | os.PathLike,
    provenance: Mapping[str, Any] | None = None,
    *,
    dpi: float | str = "figure",
    tight: bool = False,
) -> Path:
    """The one figure writer (the report's figures and sam-analyze's plots): `figure` as a PNG, written atomically
    (`sam_repro.files`), without the creation-time metadata matplotlib would otherwise embed, so that the same
    figure gives the same bytes. With a `provenance` record (command, git commit, machine, versions, time), the
    record goes into the PNG's `Description` text chunk and `Software` names sam-repro; without one, no `Software`
    chunk either. `tight` crops to the drawn area (`bbox_inches="tight"`)."""
    metadata: dict[str, str | None] = {"Software": None}
    if provenance is not None:
        metadata = {"Software": "sam-repro", "Description": json.dumps(provenance, sort_keys=True)}
    options: dict[str, Any] = {"bbox_inches": "tight"} if tight else {}
    return atomic_write_bytes(path, lambda f: figure.savefig(f, format="png", dpi=dpi, metadata=metadata, **options))


# ----------------------------------------------------------------------------------------------------------------
# The report: figures for every table and cell, and index.md tying them to the tables
# ----------------------------------------------------------------------------------------------------------------


def run_curve(run: RunRecord, key: str = "test_error") -> Curve | None:
    """The curve of `key` (test_error, memorized, ...) in a run directory's metrics.jsonl (None for runs without
    one, e.g. from W&B, or without that key)."""
    if run.directory is None:
        return None
    records = [r for r in load_metrics(run.directory) if r.get(key) is not None and "epoch" in r]
    if not records:
        return None
    epochs = np.array([r["epoch"] for r in records], dtype=float)
    values = np.array([r[key] for r in records], dtype=float)
    return Curve(epochs, values, run.finished)


def cell_slug(cell: Mapping[str, object]) -> str:
    """A file name for a cell: cifar10-wrn28_10-basic-200ep (+ -noise0.2, -subset5000, -key=value)."""
    parts = []
    for key, value in cell.items():
        if value is None or (key == "label_noise" and value == 0):
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(
            {
                "dataset": text,
                "model": text,
                "augment": text,
                "epochs": f"{text}ep",
                "label_noise": f"noise{text}",
                "train_subset": f"subset{text}",
            }.get(key, f"{key}={text}")
        )
    slug = "-".join(parts)
    return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in slug)


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """bars/table<N>.png, curves/<cell>.png and index.md (which also holds the tables) under `out_dir`."""
    out = Path(out_dir)
    runs_by_cell: dict[tuple, dict[str, list[RunRecord]]] = {}
    for run in report.runs:
        cell = tuple(report.grouping.cell(run).items())
        runs_by_cell.setdefault(cell, {}).setdefault(report.grouping.arm(run), []).append(run)

    written: list[Path] = []
    columns = (*VALUE_COLUMNS, *extra_columns(report))
    lines = ["# SAM vs SGD: report", "", MARKDOWN_LEGEND, ""] + render_notices_markdown(report)
    slugs: set[str] = set()
    for table in report.tables:
        name = f"table{table.id}" if table.id is not None else "other"
        lines += [f"## {table_heading(table)}", ""] + render_table_markdown(table, columns)
        bars = table_bars_figure(table)
        if bars is not None:
            written.append(save_figure(bars, out / "bars" / f"{name}.png"))
            lines += [f"![{table_heading(table)}: ours vs paper](bars/{name}.png)", ""]
        cells = list(dict.fromkeys(tuple(row.cell.items()) for row in table.rows))
        for cell in cells:
            arms, memorized = (
                {
                    arm: [c for r in sorted(runs, key=lambda r: r.source) if (c := run_curve(r, key))]
                    for arm, runs in runs_by_cell.get(cell, {}).items()
                }
                for key in ("test_error", "memorized")
            )
            arms = {arm: curves for arm, curves in arms.items() if curves}
            memorized = {arm: curves for arm, curves in memorized.items() if curves}
            if not arms:
                continue
            slug = cell_slug(dict(cell))
            while slug in slugs:  # two cells that only differ in characters a file name cannot hold
                slug += "_"
            slugs.add(slug)
            paper = {
                row.arm: (100.0 - row.paper.value if table.unit == "accuracy" else row.paper.value)
                for row in table.rows
                if tuple(row.cell.items()) == cell and row.metric == "test_error" and row.paper
            }
            figure = error_curves_figure(cell_label(dict(cell)), arms, paper, memorized or None)
            written.append(save_figure(figure, out / "curves" / f"{slug}.png"))
            what = "test error and memorized share" if memorized else "test error"
            lines += [f"**{cell_label(dict(cell))}**", "", f"![{what} per epoch](curves/{slug}.png)", ""]
    index = atomic_write_text(out / "index.md", "\n".join(lines))
    return [index, *written]
