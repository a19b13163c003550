"""A `Report` as Markdown, CSV and LaTeX, and the files sam-tables writes.

Pure functions of the report: rows come sorted from `aggregate.py` and floats are formatted with fixed precision,
so the same runs give byte-identical files. The columns of a table row are, in order, the cell keys shown, the
optimizer, the metric (tables with several, e.g. Table 2's top-1 and top-5), then `VALUE_COLUMNS`; the CSV's are
`CSV_COLUMNS`. A new column is one more `Column` in those lists (or a longer tuple passed as `columns=`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sam_repro.analysis.aggregate import Exclusion, Report, Row, TableReport
from sam_repro.analysis.grouping import ABSENT, BASELINE, cell_label, is_number, value_label
from sam_repro.analysis.runs import RunRecord
from sam_repro.analysis.stats import Difference, Estimate
from sam_repro.files import atomic_write_json, atomic_write_text
from sam_repro.paper import TABLES_FILE, normalise_epochs

MISSING = "missing"
METRIC_LABELS = {"test_error": "top-1", "test_error_top5": "top-5"}
UNIT_LABELS = {"error": "test error (%), lower is better", "accuracy": "test accuracy (%), higher is better"}

MARKDOWN_LEGEND = (
    "ours: mean ± 95% t-interval over the finished runs (their number in parentheses) of the final test error; "
    "paper: Foret et al. (ICLR 2021), ± = 95% interval over 5 runs. ours − SGD: this optimizer minus SGD in the "
    'same cell, paired by seed when both ran the same seeds, Welch\'s interval otherwise (column "difference"). '
    '"missing": no finished run; "—": not reported.'
)


# ----------------------------------------------------------------------------------------------------------------
# Numbers as text
# ----------------------------------------------------------------------------------------------------------------


def number_text(value: float, decimals: int, sign: bool = False) -> str:
    text = f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"
    if re.fullmatch(r"[-+]?0\.?0*", text):  # never print "-0.00", nor "+0.00"
        return text.lstrip("+-")
    return text


def format_estimate(estimate: Estimate | None, not_finished: int = 0, decimals: int = 2) -> str:
    """An estimate as text: "2.71 ± 0.08 (5)"; "2.71 (1)" without an interval; "missing" without finished runs."""
    if estimate is None:
        return f"{MISSING} (0 of {not_finished} finished)" if not_finished else MISSING
    text = number_text(estimate.mean, decimals)
    if estimate.half_width is not None:
        text += f" ± {number_text(estimate.half_width, decimals)}"
    return f"{text} ({estimate.n})"


def format_difference(diff: Difference | None, note: str | None, decimals: int = 2) -> str:
    if diff is None:
        return note or ABSENT
    text = number_text(diff.mean, decimals, sign=True)
    return text + (f" ± {number_text(diff.half_width, decimals)}" if diff.half_width is not None else "")


def format_method(diff: Difference | None) -> str:
    if diff is None:
        return ""
    if diff.method == "paired":
        return f"paired, {diff.n} seeds"
    df = f", df {diff.df:.1f}" if diff.df is not None else ""
    return f"Welch, {diff.n} runs{df}"


def format_paper_diff(value: Decimal | None) -> str:
    if value is None:
        return ABSENT
    return f"{value:+}" if value != 0 else "0"


# ----------------------------------------------------------------------------------------------------------------
# The columns of a table
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column after the cell keys, the optimizer and the metric: its heading and the text of a row."""

    heading: str
    text: Callable[[Row], str]


def _ours(row: Row) -> str:
    text = format_estimate(row.ours, row.not_finished)
    return text + (f", {value_label(row.epochs_used)} ep" if row.epochs_used is not None else "")


def _difference(row: Row) -> str:
    text = format_difference(row.diff, row.diff_note)
    return text + (f" (vs SGD at {value_label(row.sgd_epochs)} ep)" if row.diff and row.sgd_epochs is not None else "")


VALUE_COLUMNS = (
    Column("ours", _ours),
    Column("paper", lambda row: row.paper.display() if row.paper else ABSENT),
    Column("ours − SGD", lambda row: _difference(row) if row.arm != BASELINE else ""),
    Column("paper − SGD", lambda row: format_paper_diff(row.paper_diff) if row.arm != BASELINE else ""),
    Column("difference", lambda row: format_method(row.diff)),
)


def extra_columns(report: Report) -> tuple[Column, ...]:
    """A column per `extra_metrics` key the report was built with (e.g. `memorized`)."""
    return tuple(
        Column(key.replace("_", " "), lambda row, key=key: format_estimate(row.extras.get(key)))
        for key in report.extra_metrics
    )


def _header(table: TableReport, columns: Sequence[Column]) -> list[str]:
    header = [c.replace("_", " ") for c in table.columns] + ["optimizer"]
    if len(table.metrics) > 1:
        header.append("metric")
    return header + [column.heading for column in columns]


def _cells(table: TableReport, row: Row, columns: Sequence[Column]) -> list[str]:
    cells = [value_label(row.cell.get(c)) for c in table.columns] + [row.arm]
    if len(table.metrics) > 1:
        cells.append(METRIC_LABELS.get(row.metric, row.metric))
    return cells + [column.text(row) for column in columns]


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def table_heading(table: TableReport) -> str:
    name = f"Table {table.id}: {table.title}" if table.id is not None else table.title
    return f"{name} — {UNIT_LABELS[table.unit]}"


def render_table_markdown(table: TableReport, columns: Sequence[Column] = VALUE_COLUMNS) -> list[str]:
    """One table as Markdown lines (no heading), its notes below it."""
    header = _header(table, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cells(table, row, columns)) + " |" for row in table.rows]
    lines.append("")
    if table.unit == "accuracy":
        lines += ["Ours as accuracy = 100 − test error.", ""]
    if table.notes:
        lines += [f"- {note}" for note in table.notes] + [""]
    return lines


def render_notices_markdown(report: Report) -> list[str]:
    """The warnings and the runs left out of the means, as Markdown sections (they come before the tables)."""
    lines = []
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    if report.excluded:
        lines += ["## Runs not averaged", "", "| run | status | reason |", "|---|---|---|"]
        lines += [f"| {e.source} | {e.status} | {e.reason or ABSENT} |" for e in report.excluded]
        lines.append("")
    if report.baseline_choices:
        lines += [
            "## SGD: best of the standard and doubled epochs",
            "",
            "As the paper [§3.1]: where SGD-only runs at twice a cell's epochs exist, the SGD row shows the "
            'budget with the lower mean test error (marked ", N ep" when it is the doubled one).',
            "",
            "| cell | SGD at E | SGD at 2E | shown |",
            "|---|---|---|---|",
        ]
        for choice in report.baseline_choices:
            epochs = choice.cell["epochs"]
            means = [MISSING if m is None else number_text(m, 2) for m in choice.means]
            lines.append(
                f"| {cell_label(choice.cell)} | {means[0]} ({value_label(epochs)} ep) | "
                f"{means[1]} ({value_label(normalise_epochs(2 * epochs))} ep) | {value_label(choice.used)} ep |"
            )
        lines.append("")
    return lines


def render_markdown(report: Report, columns: Sequence[Column] = VALUE_COLUMNS) -> str:
    """The tables, with the warnings and the runs left out before them (read before the numbers they qualify)."""
    lines = ["# SAM vs SGD: our runs beside the paper", "", MARKDOWN_LEGEND, ""] + render_notices_markdown(report)
    columns = (*columns, *extra_columns(report))
    for table in report.tables:
        lines += [f"## {table_heading(table)}", ""] + render_table_markdown(table, columns)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------------


def _csv_number(value: float | None, decimals: int = 4) -> str:
    return "" if value is None else number_text(value, decimals)


def _csv_diff(row: Row, text: Callable[[Difference], Any]) -> str:
    return "" if row.diff is None else str(text(row.diff))


# Every field after the table and the cell keys: (name, text of a row). Numbers as plain text, empty when missing.
CSV_COLUMNS: tuple[tuple[str, Callable[[TableReport, Row], str]], ...] = (
    ("optimizer", lambda table, row: row.arm),
    ("metric", lambda table, row: row.metric),
    ("unit", lambda table, row: table.unit),
    ("n", lambda table, row: str(row.ours.n if row.ours else 0)),
    ("mean", lambda table, row: _csv_number(row.ours.mean if row.ours else None)),
    ("ci95", lambda table, row: _csv_number(row.ours.half_width if row.ours else None)),
    ("seeds", lambda table, row: " ".join(value_label(s) for s in row.seeds)),
    ("not_finished", lambda table, row: str(row.not_finished)),
    ("paper", lambda table, row: row.paper.text if row.paper else ""),
    ("paper_value", lambda table, row: _csv_number(row.paper.value if row.paper else None)),
    ("paper_ci95", lambda table, row: _csv_number(row.paper.half_width if row.paper else None)),
    ("diff_vs_sgd", lambda table, row: _csv_diff(row, lambda d: _csv_number(d.mean))),
    ("diff_ci95", lambda table, row: _csv_diff(row, lambda d: _csv_number(d.half_width))),
    ("diff_method", lambda table, row: _csv_diff(row, lambda d: d.method)),
    ("diff_n", lambda table, row: _csv_diff(row, lambda d: d.n)),
    ("diff_df", lambda table, row: _csv_diff(row, lambda d: _csv_number(d.df, 2))),
    ("paper_diff_vs_sgd", lambda table, row: str(row.paper_diff) if row.paper_diff is not None else ""),
    ("epochs_used", lambda table, row: value_label(row.epochs_used) if row.epochs_used is not None else ""),
)
CSV_FIELDS = ("table",) + tuple(name for name, _ in CSV_COLUMNS)


def render_csv(report: Report) -> str:
    """One line per (table, cell, optimizer, metric)."""
    columns = report.grouping.columns
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extras = [
        (
            f"{key}{suffix}",
            lambda row, key=key, part=part: _csv_number(
                getattr(row.extras.get(key), part, None) if row.extras.get(key) else None
            ),
        )
        for key in report.extra_metrics
        for suffix, part in (("_mean", "mean"), ("_ci95", "half_width"))
    ]
    writer.writerow(("table",) + columns + CSV_FIELDS[1:] + tuple(name for name, _ in extras))
    for table in report.tables:
        for row in table.rows:
            writer.writerow(
                [table.id if table.id is not None else "other"]
                + ["" if row.cell.get(c) is None else value_label(row.cell.get(c)) for c in columns]
                + [text(table, row) for _, text in CSV_COLUMNS]
                + [text(row) for _, text in extras]
            )
    return buffer.getvalue()


def render_runs_csv(report: Report) -> str:
    """Every run read, whether averaged or not: the audit trail of the tables."""
    return runs_csv(report.runs, report.grouping.columns, report.grouping.cell, report.grouping.arm, report.excluded)


def runs_csv(
    runs: Sequence[RunRecord],
    columns: Sequence[str],
    cell_of: Callable[[RunRecord], Mapping[str, Any]],
    arm_of: Callable[[RunRecord], str],
    excluded: Sequence[Exclusion],
    arm_heading: str = "optimizer",
) -> str:
    """One line per run: its cell, its arm (the optimizer, or the variant), seed, status, test error and whether it
    was averaged (and why not)."""
    left_out = {e.source: e for e in excluded}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("run", *columns, arm_heading, "seed", "status", "test_error", "averaged", "reason"))
    for run in runs:
        cell = cell_of(run)
        error = run.summary.get("test_error")
        writer.writerow(
            [run.source]
            + ["" if cell.get(c) is None else value_label(cell.get(c)) for c in columns]
            + [
                arm_of(run),
                value_label(run.seed),
                run.status,
                _csv_number(error) if is_number(error) else "",
                "no" if run.source in left_out else "yes",
                left_out[run.source].reason if run.source in left_out else "",
            ]
        )
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# LaTeX
# ----------------------------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
}  # fmt: skip


def _latex(text: str) -> str:
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return escaped.replace("±", r"$\pm$").replace("−", "$-$").replace("—", "--").replace("<", r"$<$")


def render_latex(report: Report, columns: Sequence[Column] = VALUE_COLUMNS) -> str:
    """One booktabs tabular per table (needs \\usepackage{booktabs})."""
    parts = ["% SAM vs SGD: our runs beside the paper (generated by sam-tables; needs \\usepackage{booktabs})", ""]
    columns = (*columns, *extra_columns(report))
    for table in report.tables:
        header = _header(table, columns)
        parts += [
            f"% {table_heading(table)}",
            r"\begin{tabular}{" + "l" * len(header) + "}",
            r"\toprule",
            " & ".join(_latex(h) for h in header) + r" \\",
            r"\midrule",
        ]
        parts += [" & ".join(_latex(c) for c in _cells(table, row, columns)) + r" \\" for row in table.rows]
        parts += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def write_tables(report: Report, out_dir: str | os.PathLike, latex: bool = False) -> list[Path]:
    """tables.md, tables.csv, runs.csv (and tables.tex) in `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = {
        "tables.md": render_markdown(report),
        "tables.csv": render_csv(report),
        "runs.csv": render_runs_csv(report),
    }
    if latex:
        outputs["tables.tex"] = render_latex(report)
    written = []
    for name, text in outputs.items():
        written.append(atomic_write_text(out / name, text))
    return written


def provenance(command: Sequence[str], inputs: Sequence[str], n_runs: int) -> dict[str, Any]:
    """Where a set of tables came from: the one provenance record (`engine.provenance.provenance`: command, code
    version, machine, packages, time) with the tables' inputs, run count and the paper's tables they were set
    beside. Kept out of the tables themselves (it carries a timestamp), so that the tables stay byte-identical for
    identical runs. `created` is the same instant in UTC, the name readers of provenance.json have always used."""
    from datetime import datetime, timezone

    from sam_repro.engine.provenance import provenance as record

    return record(
        command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        inputs=list(inputs),
        runs=n_runs,
        paper_tables={
            "path": TABLES_FILE.name,
            "sha256": hashlib.sha256(TABLES_FILE.read_bytes()).hexdigest() if TABLES_FILE.exists() else None,
        },
    )


def write_provenance(out_dir: str | os.PathLike, command: Sequence[str], inputs: Sequence[str], n_runs: int) -> Path:
    return atomic_write_json(Path(out_dir) / "provenance.json", provenance(command, inputs, n_runs))
