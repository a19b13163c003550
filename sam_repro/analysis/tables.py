"""Our runs beside the paper's tables: the public face of `sam-tables`, kept importable from one place.

The work is done in four modules, one job each:
    sam_repro.paper          the paper's Tables 1-5 (packaged tables.yaml): PaperTable, PaperValue, lookups
    analysis/grouping.py     which runs are averaged together: cells, arms, RUN_SPECIFIC_KEYS, sort orders
    analysis/aggregate.py    runs -> Report: intervals over seeds, SAM − SGD, the SGD baseline rule
    analysis/render.py       Report -> Markdown, CSV, LaTeX; the files sam-tables writes and their provenance

    from sam_repro.analysis.runs import load_runs
    from sam_repro.analysis.tables import build_report, render_markdown
    print(render_markdown(build_report(load_runs(["runs/"]))))
"""

from __future__ import annotations

from sam_repro.analysis.aggregate import (
    PAPER_ARMS,
    BaselineChoice,
    Exclusion,
    Report,
    Row,
    TableReport,
    build_report,
)
from sam_repro.analysis.grouping import BASELINE, RUN_SPECIFIC_KEYS, Grouping, arm_order, cell_label
from sam_repro.analysis.render import (
    CSV_FIELDS,
    MARKDOWN_LEGEND,
    METRIC_LABELS,
    MISSING,
    UNIT_LABELS,
    VALUE_COLUMNS,
    Column,
    format_difference,
    format_estimate,
    format_method,
    provenance,
    render_csv,
    render_latex,
    render_markdown,
    render_notices_markdown,
    render_runs_csv,
    render_table_markdown,
    table_heading,
    write_provenance,
    write_tables,
)
from sam_repro.paper import (
    CELL_KEYS,
    CELL_SOURCES,
    TABLE_IDS,
    TABLES_FILE,
    PaperCell,
    PaperTable,
    PaperValue,
    load_paper_tables,
    parse_paper_value,
)

PAPER_TABLES_FILE = TABLES_FILE  # the name this module used before the tables moved into sam_repro/paper/

__all__ = [
    "BASELINE", "CELL_KEYS", "CELL_SOURCES", "CSV_FIELDS", "MARKDOWN_LEGEND", "METRIC_LABELS", "MISSING",
    "PAPER_ARMS", "PAPER_TABLES_FILE", "RUN_SPECIFIC_KEYS", "TABLE_IDS", "UNIT_LABELS", "VALUE_COLUMNS",
    "BaselineChoice", "Column", "Exclusion", "Grouping", "PaperCell", "PaperTable", "PaperValue", "Report", "Row",
    "TableReport", "arm_order", "build_report", "cell_label", "format_difference", "format_estimate",
    "format_method", "load_paper_tables", "parse_paper_value", "provenance", "render_csv", "render_latex",
    "render_markdown", "render_notices_markdown", "render_runs_csv", "render_table_markdown", "table_heading",
    "write_provenance", "write_tables",
]  # fmt: skip
