"""A W&B Report per paper table: one section per cell, SGD beside SAM.

`report_spec(table, entity, project, runs)` describes the report as plain JSON (what `sam-wandb report --dry-run`
writes); `build_report(spec)` turns it into a `wandb_workspaces.reports.v2.Report` (the optional extra
`sam-repro[wandb-report]`), which `.save()` uploads.

A section is one cell of the paper's table (dataset, model, augment, epochs, label noise). Its runs are filtered by
W&B group, which the trainer sets to the run's cell (`sam_repro.paper.run_group`), and grouped by job type, which is
the optimizer: the test-error curves of SGD and SAM in two colours, seeds aggregated, and a runs table of the final
and best test error beside the paper's value (`paper/test_error`, `paper/ci95`, in every run's summary).

Sections come from the run directories given (`runs`), each run in the cell sam-tables puts it in (one decision,
`grouping.place_run`): a cell of the paper, or a row of its own (a shortened run, a training subset) with no paper
value; a run sam-tables lists in another table or under "Other runs" is listed under `other_runs`. Without runs,
every cell of the table, with the groups that the cell's preset commands give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from sam_repro.analysis.grouping import Placement, cell_label, cell_order, freeze, place_run
from sam_repro.analysis.runs import RunRecord
from sam_repro.errors import ConfigError
from sam_repro.paper import (
    PaperCell,
    PaperTable,
    as_error,
    hyperparameters,
    paper_table,
    run_group,
)

SPEC_VERSION = 1
RUN_COLUMNS = (
    "run:displayName",
    "run:jobType",
    "config:seed.value",
    "run:state",
    "summary:test_error",
    "summary:best_test_error",
    "summary:paper/test_error",
    "summary:paper/ci95",
    "summary:paper/same_setting",
)
PANELS = (
    {"kind": "line", "title": "test error (%) per epoch", "x": "epoch", "y": ["test_error"]},
    {"kind": "line", "title": "training loss per step", "x": "step", "y": ["steps/train_loss"]},
    {"kind": "line", "title": "training error (%) per step", "x": "step", "y": ["steps/train_error"]},
    {"kind": "line", "title": "SAM sharpness per step", "x": "step", "y": ["steps/sharpness"]},
)


def cell_of_run(run: RunRecord, table: PaperTable) -> Placement | None:
    """Where a run goes in `table`'s report: the cell sam-tables puts it in (`grouping.place_run`, the one
    decision), or None when sam-tables shows it in another table or under "Other runs"."""
    place = place_run(run, only=table.id)
    return place if place.table is not None else None


def _preset_groups(table: PaperTable) -> dict[int, set[str]]:
    """{cell order: groups} of the runs the table's preset commands would start (hyperparameters.yaml)."""
    groups: dict[int, set[str]] = {}
    for settings in hyperparameters().values():
        experiment = next((o.split("=", 1)[1] for o in settings["overrides"] if o.startswith("experiment=")), None)
        if not str(experiment).startswith(f"table{table.id}/"):
            continue
        config = {
            "experiment": experiment,
            "dataset": {"name": settings["dataset"], "label_noise": settings["label_noise"], "train_subset": None},
            "model": {"name": settings["model"]},
            "augment": {"name": settings["augment"]},
            "trainer": {"epochs": settings["epochs"], "epoch_scale": 1.0},
        }
        keys = {k: settings[k] for k in ("dataset", "model", "augment", "epochs", "label_noise")}
        cell = table.match({**keys, "train_subset": None}, "test_error")
        if cell is not None:
            groups.setdefault(cell.order, set()).add(run_group(config))
    return groups


def _paper_values(cell: PaperCell) -> dict[str, dict[str, Any]]:
    return {
        optimizer: {"test_error": as_error(value, cell.table), "ci95": value.half_width, "printed": value.text}
        for optimizer, value in cell.values.items()
        if value is not None
    }


def _run_entry(run: RunRecord) -> dict[str, Any]:
    summary = run.summary
    return {
        "source": run.source,
        "group": run_group(run.config),
        "optimizer": run.value("optimizer.name"),
        "seed": run.seed,
        "status": run.status,
        "test_error": summary.get("test_error"),
        "best_test_error": summary.get("best_test_error"),
        "paper_same_setting": summary.get("paper/same_setting"),
    }


def report_spec(
    table_id: int | str, entity: str | None, project: str, runs: Iterable[RunRecord] | None = None
) -> dict[str, Any]:
    """The report of paper table `table_id` as JSON-ready data: its sections (one per cell, in the table's order)
    with their run filters, panels, runs table columns, the paper's values and, given `runs`, the runs found."""
    table = paper_table(table_id)
    cells = {c.order: c for c in table.cells if c.metric == "test_error"}
    sections = []
    others: list[str] = []
    if runs is None:
        groups = _preset_groups(table)
        for order in sorted(groups):
            sections.append(_section(cells[order].keys, sorted(groups[order]), _paper_values(cells[order]), None))
    else:
        # cell -> its runs, in sam-tables' order: the paper's cells as the paper lists them, then our own rows
        members: dict[tuple, list[RunRecord]] = {}
        orders: dict[tuple, tuple] = {}
        for run in sorted(runs, key=lambda r: r.source):
            place = cell_of_run(run, table)
            if place is None:
                others.append(run.source)
                continue
            key = freeze(place.cell)
            members.setdefault(key, []).append(run)
            order = place.paper_cell.order if place.paper_cell is not None else math.inf
            orders[key] = (order, cell_order(place.cell))
        for key in sorted(members, key=orders.__getitem__):
            cell = dict(key)
            found = table.match(cell, "test_error")
            keys = dict(found.keys) if found is not None else {k: v for k, v in cell.items() if v is not None}
            groups = sorted({run_group(r.config) for r in members[key]})
            paper = _paper_values(found) if found is not None else {}
            sections.append(_section(keys, groups, paper, members[key]))
    return {
        "version": SPEC_VERSION,
        "table": table.id,
        "title": f"Table {table.id}: {table.title} (SGD vs SAM)",
        "description": (
            f"One section per cell of the paper's Table {table.id}: runs filtered by W&B group (the cell), coloured by "
            "job type (the optimizer). Paper values are test error in percent, mean ± 95% interval."
        ),
        "entity": entity,
        "project": project,
        "sections": sections,
        "other_runs": others,
    }


def _section(
    cell: Mapping[str, Any], groups: list[str], paper: dict[str, Any], runs: list[RunRecord] | None
) -> dict[str, Any]:
    return {
        "title": cell_label(cell),
        "cell": dict(cell),
        "filter": {"group": groups},
        "color_by": "job_type",
        "paper": paper,
        "panels": [dict(p) for p in PANELS],
        "runs_table": list(RUN_COLUMNS),
        **({"runs": [_run_entry(r) for r in runs]} if runs is not None else {}),
    }


def _paper_line(paper: Mapping[str, Mapping[str, Any]]) -> str:
    shown = []
    for optimizer, value in paper.items():
        interval = f" ± {value['ci95']:g}" if value.get("ci95") is not None else ""
        shown.append(f"{optimizer.upper()} {value['test_error']:g}{interval}")
    return "Paper (test error %): " + ", ".join(shown) if shown else "The paper prints no value for this cell."


def report_library():
    """wandb_workspaces' reports module and its filter expressions, or one line saying how to install them."""
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        raise ConfigError("sam-wandb report needs wandb-workspaces: pip install 'sam-repro[wandb-report]'") from None
    return wr, expr


def build_report(spec: Mapping[str, Any]):
    """The `wandb_workspaces` Report of a spec (no network until `.save()`, unless the spec names no entity: then
    the library asks W&B for the API key's default one)."""
    wr, expr = report_library()
    blocks: list = [wr.P(spec["description"])]
    for section in spec["sections"]:
        runset = wr.Runset(
            entity=spec["entity"] or "",
            project=spec["project"],
            name=section["title"],
            filters=expr.And(expr.Metric("Group").isin(section["filter"]["group"])),
            groupby=["JobType"],  # one colour per optimizer, seeds aggregated
            visible_columns=list(section["runs_table"]),
        )
        panels = [wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"])) for p in section["panels"]]
        blocks += [
            wr.H2(section["title"]),
            wr.P(_paper_line(section["paper"])),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ]
    owner = {"entity": spec["entity"]} if spec["entity"] else {}  # none: the API key's default entity
    return wr.Report(project=spec["project"], title=spec["title"][:128], blocks=blocks, **owner)
