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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from sam_repro.analysis.aggregate import Report, Row, TableReport
from sam_repro.analysis.grouping import BASELINE, arm_order, cell_label
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
from sam_repro.analysis.variants import VariantsReport
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
    finals: Mapping[str, float] | None = None,
) -> Figure:
    """Mean test error per epoch of each arm's finished runs, shaded between the best and worst seed.

    Unfinished runs are drawn as thin dotted lines; `paper` (arm -> test error %) as dashed horizontal lines.
    The y axis is logarithmic: the first epochs (tens of percent) and the end of training (a few percent, where
    SAM and SGD differ) both stay readable. With `memorized` (label-noise runs: the share of flipped training
    labels the network predicts, per epoch), a second panel beside it shows that, on a linear 0-100 axis.
    `finals` (arm -> the table's value) is the number each legend entry gives, so the legend says what the table
    row says; without it, the mean of the curves' last points. Curves of one or two epochs are drawn as points
    (a line through one point is invisible); legends sit outside the axes, right of the data.
    """
    figure = Figure(figsize=(12.0 if memorized else 7.0, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if memorized else 1, 1)
    colours = arm_colours(list(arms))
    _draw_curves(axes, arms, colours, "%", finals)
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
    low, high = axes.get_ylim()
    axes.set_ylim(max(low, 0.01), min(high, 100.0))  # an error lies in (0, 100]
    axes.legend(**_OUTSIDE, title="shaded: min–max over seeds", title_fontsize=7)
    if memorized:
        right = figure.add_subplot(1, 2, 2)
        _draw_curves(right, memorized, {**colours, **arm_colours(list(memorized))}, "%")
        right.set_ylim(0, 100)
        right.set_ylabel("memorized: flipped training labels predicted (%)")
        right.legend(**_OUTSIDE, title="shaded: min–max over seeds", title_fontsize=7)
    for ax in figure.axes:
        low, high = ax.get_xlim()
        if high - low < 2:  # one epoch: whole epochs either side, not ticks at 0.005
            ax.set_xlim((low + high) / 2 - 1, (low + high) / 2 + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, which="major", alpha=0.3)
    figure.suptitle("\n".join(textwrap.wrap(title, 90 if not memorized else 150)), fontsize=10)  # wraps, never clips
    return figure


_OUTSIDE = {"fontsize": 8, "loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


def _draw_curves(
    axes,
    arms: Mapping[str, Sequence[Curve]],
    colours: Mapping[str, str],
    unit: str,
    finals: Mapping[str, float] | None = None,
) -> None:
    """Each arm's finished runs as their mean with a min-max band, its unfinished ones as dotted lines; curves of
    fewer than 3 epochs with markers, so that one-epoch cells are seen."""
    for arm in sorted(arms, key=arm_order):
        colour = colours[arm]
        finished = [c for c in arms[arm] if c.finished and len(c.epochs)]
        if finished:
            epochs, mean, low, high = curve_band(finished)
            final = finals[arm] if finals and arm in finals else mean[-1]
            label = f"{arm} (mean of {len(finished)}, final {final:.2f}{unit})"
            axes.plot(epochs, mean, color=colour, linewidth=1.8, label=label, marker="o" if len(epochs) < 3 else None)
            if len(finished) > 1:
                axes.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
            if len(finished) > 1 and len(epochs) < 3:  # a band over one or two epochs is not seen: each seed's points
                for curve in finished:
                    axes.scatter(curve.epochs, curve.values, s=10, color=colour, alpha=0.6, linewidths=0)
        unfinished = [c for c in arms[arm] if not c.finished and len(c.epochs)]
        for i, curve in enumerate(unfinished):
            label = f"{arm}, {len(unfinished)} unfinished (not averaged)" if i == 0 else None
            marker = "." if len(curve.epochs) < 3 else None
            axes.plot(
                curve.epochs, curve.values, color=colour, linewidth=0.8, linestyle=":", label=label, marker=marker
            )


MIN_SEEDS_FOR_INTERVAL = 3  # a t-interval over 2 seeds spans ±6.4 standard deviations: drawn as points only


def table_bars_figure(table: TableReport) -> Figure | None:
    """Ours (solid) beside the paper (hatched, its interval) for every cell we ran; None if none.

    Each of our bars is the table's mean with the runs it averages as points on it; its 95% interval is drawn
    only over at least MIN_SEEDS_FOR_INTERVAL runs (fewer: the points alone, and the legend says so). The axis
    covers what the unit can be, 0-100%."""
    cells: dict[tuple, dict[str, Row]] = {}
    for row in table.rows:
        cells.setdefault((tuple(row.cell.items()), row.metric), {})[row.arm] = row
    cells = {key: arms for key, arms in cells.items() if any(r.ours for r in arms.values())}
    if not cells:
        return None
    arms = sorted({arm for by_arm in cells.values() for arm in by_arm}, key=arm_order)
    colours = arm_colours(arms)
    width = 0.8 / (2 * len(arms))
    figure = Figure(figsize=(max(6.0, 1.3 * len(cells) + 3.5), 4.5), dpi=DPI, layout="constrained")
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
            [r.ours.half_width if r and r.ours and r.ours.n >= MIN_SEEDS_FOR_INTERVAL else None for r in ours],
            colours[arm],
            f"{arm}, ours",
            None,
        )
        for x, row in zip(positions + offset, ours):
            if row is not None and row.values:
                shown = list(row.values)  # in the table's unit, as the mean
                jitter = np.linspace(-0.25, 0.25, len(shown)) * width if len(shown) > 1 else np.zeros(1)
                axes.scatter(x + jitter, shown, s=12, color="black", zorder=3, linewidths=0)
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
    axes.scatter([], [], s=12, color="black", linewidths=0, label="our runs, one point each")
    axes.set_xticks(positions, [_cell_tick(key, table) for key in cells], fontsize=8)
    axes.set_ylabel(UNIT_LABELS[table.unit].split(",")[0])
    low, high = axes.get_ylim()
    axes.set_ylim(max(low, 0.0), min(high, 100.0))  # what an error or accuracy in percent can be
    name = f"Table {table.id}: {table.title}" if table.id is not None else table.title
    what = (
        f"ours: mean, each run a point, 95% interval over ≥ {MIN_SEEDS_FOR_INTERVAL} runs (none drawn over fewer); "
        "hatched: the paper"
    )
    figure.suptitle("\n".join([name, *textwrap.wrap(what, 70)]), fontsize=10)  # wraps, never clips
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(**_OUTSIDE)
    return figure


def gain_vs_cost_figure(report: VariantsReport) -> Figure | None:
    """The price of SAM's gain: each variant's gain over SGD (SGD's error minus its own, points; paired 95% interval
    over at least MIN_SEEDS_FOR_INTERVAL seeds) against its time relative to SGD's (passes relative to SGD's where
    no benchmark ratio is known). A variant with fewer seeds (a hyperparameter probe, or one still running) is drawn
    hollow and faded. One panel per setting; None when no variant has both numbers."""
    settings = []
    for row in report.rows:
        x = row.cost.ratio if row.cost.ratio is not None else row.passes_vs_sgd
        gain = -row.vs_sgd.mean if row.vs_sgd is not None else (0.0 if row.variant == BASELINE else None)
        if x is None or gain is None:
            continue
        if not settings or settings[-1][0] != row.setting:
            settings.append((row.setting, []))
        settings[-1][1].append((row, x, gain))
    if not settings:
        return None
    figure = Figure(figsize=(7.5, 6.0 * len(settings)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    colours = arm_colours([row.variant for _, points in settings for row, _, _ in points])
    for index, (setting, points) in enumerate(settings):
        axes = figure.add_subplot(len(settings), 1, index + 1)
        axes.axhline(0.0, color="grey", linewidth=0.8)
        labels = []
        for row, x, gain in points:
            diff = row.vs_sgd
            yerr = diff.half_width if diff is not None and diff.half_width is not None else None
            if diff is not None and diff.n < MIN_SEEDS_FOR_INTERVAL:
                yerr = None
            marker = "s" if row.cost.ratio is None else "o"
            seeds = row.error.n if row.error is not None else 0
            few = seeds < MIN_SEEDS_FOR_INTERVAL  # a probe or a variant still running: hollow and faded
            axes.errorbar(
                x,
                gain,
                yerr=yerr,
                fmt=marker,
                color=colours[row.variant],
                capsize=3,
                markersize=6,
                markerfacecolor="none" if few else colours[row.variant],
                alpha=0.5 if few else 1.0,
            )
            labels.append((row.variant, x, gain, few))
        _annotate_apart(axes, labels)
        axes.set_xlabel("time relative to SGD (benchmark ratio; squares: passes)")
        axes.set_ylabel("gain over SGD (test-error points)")
        axes.set_title(cell_label(setting), fontsize=9)
        axes.grid(True, alpha=0.3)
    what = (
        f"higher is better, further left is cheaper; bars: paired 95% interval over ≥ {MIN_SEEDS_FOR_INTERVAL} "
        f"seeds; hollow: fewer than {MIN_SEEDS_FOR_INTERVAL} seeds"
    )
    figure.suptitle("\n".join(["The price of SAM's gain", *textwrap.wrap(what, 80)]), fontsize=10)
    return figure


def _clear(box: tuple[float, float, float, float], placed: Sequence[tuple], frame: Sequence[float]) -> bool:
    """Whether a label's box (left, bottom, right, top) lies inside `frame` and overlaps none of `placed`."""
    inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
    return inside and all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed)


def _annotate_apart(axes, labels: Sequence[tuple[str, float, float, bool]]) -> None:
    """Label each point beside it: right, left, above right, below right, above left or below left, whichever is
    first clear of the markers, the labels already placed (top to bottom) and the frame; failing all six, further
    down on the right with a leader line. Variants of the same cost and gain (ASAM and GSAM) stay readable."""
    axes.figure.draw_without_rendering()  # the constrained layout sizes the axes: positions in points are final
    to_points = 72.0 / axes.figure.dpi
    height = 8.5  # a 7-point label's line, in points
    offsets = [(5.0, -height / 2), (-5.0, -height / 2), (5.0, 2.0), (5.0, -2.0 - height), (-5.0, 2.0)]
    offsets += [(-5.0, -2.0 - height)] + [(5.0, -2.0 - height * k) for k in range(2, 8)]
    # each label's point in points, highest first
    located = sorted(
        (
            (text, x, y, faded, *(value * to_points for value in axes.transData.transform((x, y))))
            for text, x, y, faded in labels
        ),
        key=lambda item: (-item[2], item[1]),
    )
    # (left, bottom, right, top) in points of every marker, and of each label once placed
    placed: list[tuple[float, float, float, float]] = [(px - 4, py - 4, px + 4, py + 4) for *_, px, py in located]
    frame = [value * to_points for value in axes.get_window_extent().extents]  # the label stays inside the axes

    for text, x, y, faded, px, py in located:
        width = 4.2 * len(text)
        for dx, dy in offsets:
            left = px + dx if dx > 0 else px + dx - width
            box = (left, py + dy, left + width, py + dy + height)
            if _clear(box, placed, frame):
                break
        placed.append(box)
        leader = {"arrowprops": {"arrowstyle": "-", "linewidth": 0.4, "alpha": 0.5}} if abs(dy) > 2 * height else {}
        axes.annotate(
            text,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=7,
            va="bottom",
            ha="left" if dx > 0 else "right",
            alpha=0.6 if faded else 1.0,
            **leader,
        )


def _bars(axes, x, width, heights, half_widths, colour, label, hatch) -> None:
    errors = np.array([h if h is not None else 0.0 for h in half_widths])
    kwargs = {"facecolor": "white", "edgecolor": colour, "hatch": hatch} if hatch else {"color": colour}
    yerr = errors if errors.any() else None
    axes.bar(x, heights, width, label=label, yerr=yerr, capsize=2, error_kw={"elinewidth": 0.8}, **kwargs)


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
    """bars/table<N>.png, curves/<cell>.png and index.md (which also holds the tables) under `out_dir`.

    A cell's curves are those of the runs its table rows average (`Row.sources`: the SGD row's doubled-epoch runs
    where the paper's rule chose them), solid, with the row's value in the legend; the runs of the cell that did
    not finish their schedule are dotted; a duplicate or a budget the row did not use is not drawn."""
    out = Path(out_dir)
    runs_by_cell: dict[tuple, dict[str, list[RunRecord]]] = {}
    for run in report.runs:
        cell = tuple(report.grouping.cell(run).items())
        runs_by_cell.setdefault(cell, {}).setdefault(report.grouping.arm(run), []).append(run)
    by_source = {run.source: run for run in report.runs}

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
            rows = {
                row.arm: row for row in table.rows if tuple(row.cell.items()) == cell and row.metric == "test_error"
            }
            drawn: dict[str, list[tuple[RunRecord, bool]]] = {}
            for arm, row in rows.items():
                averaged = [(by_source[source], True) for source in row.sources]
                unfinished = [(r, False) for r in runs_by_cell.get(cell, {}).get(arm, []) if not r.finished]
                drawn[arm] = averaged + sorted(unfinished, key=lambda item: item[0].source)
            arms, memorized = (
                {
                    arm: [replace(c, finished=averaged) for r, averaged in runs if (c := run_curve(r, key))]
                    for arm, runs in drawn.items()
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
            as_error = (lambda v: 100.0 - v) if table.unit == "accuracy" else (lambda v: v)
            paper = {arm: as_error(row.paper.value) for arm, row in rows.items() if row.paper}
            finals = {arm: as_error(row.ours.mean) for arm, row in rows.items() if row.ours}
            figure = error_curves_figure(cell_label(dict(cell)), arms, paper, memorized or None, finals)
            written.append(save_figure(figure, out / "curves" / f"{slug}.png"))
            what = "test error and memorized share" if memorized else "test error"
            lines += [f"**{cell_label(dict(cell))}**", "", f"![{what} per epoch](curves/{slug}.png)", ""]
    index = atomic_write_text(out / "index.md", "\n".join(lines))
    return [index, *written]
