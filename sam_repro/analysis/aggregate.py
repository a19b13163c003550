"""Runs -> a `Report`: mean ± t-interval per (cell, arm), SAM − SGD per cell, and the paper's value beside them.

`build_report(runs)` places every run in a cell and an arm (`grouping.py`). Each (cell, arm) gets the mean ±
t-interval of the final `test_error` of its finished runs; each arm other than SGD gets its difference to the SGD
arm of the same cell (paired by seed or Welch, see `stats.py`). A cell belongs to the paper table that has a cell
with its dataset and model (and label noise, for Table 4); the paper's value is shown only where every key the
paper prints agrees with ours. Unfinished runs are listed, never averaged, and a missing number is written as
missing, never filled in. Table 4 is reported by the paper as accuracy; its rows (ours included, as
100 − test_error) stay in accuracy.

Every order derives from the runs sorted by source and from the sort keys of `grouping.py`, so the same runs give
the same report in any process (the renderers in `render.py` are pure functions of it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sam_repro.analysis.grouping import (
    BASELINE,
    Grouping,
    arm_order,
    cell_order,
    freeze,
    is_number,
    is_run_specific,
    mixed_config_warnings,
    place_run,
    sort_key,
)
from sam_repro.analysis.runs import RunRecord
from sam_repro.analysis.stats import Difference, Estimate, difference, mean_ci
from sam_repro.errors import ConfigError
from sam_repro.paper import PaperCell, PaperTable, PaperValue, normalise_epochs, paper_tables
from sam_repro.run_keys import DUPLICATE_NEUTRAL, flatten, matches

# Arms the paper reports in every table: shown (as missing) even when we ran only one of them.
PAPER_ARMS = ("sgd", "sam")
DUPLICATE = "duplicate"  # the status under "Runs not averaged" of a run that repeats another's configuration


@dataclass(frozen=True)
class Row:
    """One (cell, arm, metric) of a table, in the table's unit."""

    cell: Mapping[str, Any]
    arm: str
    metric: str
    ours: Estimate | None
    paper: PaperValue | None
    diff: Difference | None  # ours: this arm − the SGD arm of the same cell
    paper_diff: Decimal | None  # the paper's: this arm − its SGD value
    diff_note: str | None  # why `diff` is missing, when it is
    not_finished: int  # runs of this cell and arm that were listed, not averaged
    seeds: tuple[int | None, ...] = ()
    epochs_used: int | float | None = None  # SGD only: set when its runs are the doubled-epoch ones (see below)
    extras: Mapping[str, Estimate | None] = field(default_factory=dict)  # `extra_metrics`, over the same runs
    sgd_epochs: int | float | None = None  # other arms: the doubled epochs of the SGD runs `diff` is taken against
    values: tuple[float, ...] = ()  # the averaged values, by seed: what `ours` is the mean of
    sources: tuple[str, ...] = ()  # the averaged runs (the report's figures draw these and no others)


@dataclass
class TableReport:
    id: int | None  # None: runs that belong to none of the paper's tables
    title: str
    unit: str
    columns: tuple[str, ...]  # the cell keys shown
    metrics: tuple[str, ...]
    rows: list[Row]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Exclusion:
    source: str
    status: str
    reason: str | None


@dataclass(frozen=True)
class BaselineChoice:
    """The paper's baseline rule for one cell: SGD at E epochs against SGD at 2E, the lower mean error shown."""

    cell: Mapping[str, Any]  # the cell at the standard epochs E
    means: tuple[float | None, float | None]  # mean final test error at E and at 2E (None: no finished run)
    used: int | float  # the epochs of the runs shown as SGD


@dataclass
class Report:
    tables: list[TableReport]
    runs: list[RunRecord]
    grouping: Grouping
    excluded: list[Exclusion]
    warnings: list[str] = field(default_factory=list)
    baseline_choices: list[BaselineChoice] = field(default_factory=list)
    extra_metrics: tuple[str, ...] = ()


def build_report(
    runs: Sequence[RunRecord],
    table: str | int = "auto",
    group_by: Iterable[str] = (),
    paper: Mapping[int, PaperTable] | None = None,
    sgd_best_of_doubled: bool = True,
    extra_metrics: Sequence[str] = (),
) -> Report:
    """Group `runs` into the paper's tables. `table`: "auto" (each cell to the table it belongs to, the rest under
    "Other runs") or a table id (only that table's cells, and every cell of the paper's table, run or not).
    `paper`: the paper's tables (default: the packaged ones, `sam_repro.paper`).
    `sgd_best_of_doubled`: the paper's baseline rule (see `_best_of_doubled_epochs`).
    `extra_metrics`: summary.json keys (e.g. `memorized`, `best_test_error`) shown as mean ± interval beside the
    test error, over the same runs; none by default."""
    paper = paper if paper is not None else paper_tables()
    runs = sorted(runs, key=lambda r: r.source)  # every order below derives from this one
    grouping = Grouping.parse(group_by)
    selected = _parse_table(table, paper)
    for key in grouping.extra_cell_keys + grouping.arm_keys:
        if all(run.value(key) is None for run in runs):
            raise ConfigError(f"--group-by {key}: no run has this config key (a dotted key of config.yaml)")

    groups, homes, excluded, duplicates = _group_runs(runs, grouping, paper, selected)
    excluded_sources = {e.source for e in excluded}
    choices = _best_of_doubled_epochs(groups, excluded_sources) if sgd_best_of_doubled else []
    epochs_used = {freeze(dict(c.cell)): c.used for c in choices if c.used != c.cell["epochs"]}

    warnings = [
        f"{copy}: the same configuration as {kept} (spelled differently); counted once"
        for copy, kept in sorted(duplicates.items())
    ]
    warnings += mixed_config_warnings(groups, excluded_sources)
    by_table: dict[int | None, list[tuple]] = defaultdict(list)
    for cell in groups:
        home = homes[cell] if cell in homes else _NOWHERE
        if selected is not None and home is None:
            home = _NOWHERE  # outside the selected table: not shown
        if home is not _NOWHERE:
            by_table[home].append(cell)
    if selected is not None:
        outside = sum(1 for cell in groups if not paper[selected].contains(dict(cell)))
        if outside:
            warnings.append(f"{outside} cell(s) outside Table {selected} not shown (use --table auto to see them)")

    reports = []
    table_ids = [selected] if selected is not None else [t for t in sorted(paper) if t in by_table]
    for table_id in table_ids:
        reports.append(
            _table_report(paper[table_id], by_table.get(table_id, []), groups, grouping, excluded_sources,
                          include_missing_cells=selected is not None, warnings=warnings, epochs_used=epochs_used,
                          extra_metrics=tuple(extra_metrics))
        )  # fmt: skip
    if selected is None and by_table.get(None):
        reports.append(
            _table_report(
                None,
                by_table[None],
                groups,
                grouping,
                excluded_sources,
                False,
                warnings,
                epochs_used,
                tuple(extra_metrics),
            )
        )
    excluded.sort(key=lambda e: e.source)
    return Report(reports, runs, grouping, excluded, warnings, choices, tuple(extra_metrics))


def _group_runs(
    runs: Sequence[RunRecord], grouping: Grouping, paper: Mapping[int, PaperTable], selected: int | None
) -> tuple[dict[tuple, dict[str, list[RunRecord]]], dict[tuple, Any], list[Exclusion], dict[str, str]]:
    """cell -> arm -> runs (the cell kept as a sorted tuple so that it can be a dict key), each cell's table id, the
    runs left out of the means (unfinished, no test error, duplicates) and the duplicates (copy -> the run kept)."""
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    excluded: list[Exclusion] = []
    duplicates = duplicate_runs(runs)
    homes: dict[tuple, Any] = {}
    for run in runs:
        if run.source in duplicates:  # one run, spelled twice: counted once, the copy named
            excluded.append(Exclusion(run.source, DUPLICATE, f"the same configuration as {duplicates[run.source]}"))
            continue
        place = place_run(run, grouping, paper, selected)
        homes[freeze(place.cell)] = place.table.id if place.table is not None else None
        groups[freeze(place.cell)][grouping.arm(run)].append(run)
        if not run.finished:
            excluded.append(Exclusion(run.source, run.status, run.reason))
        elif not is_number(run.summary.get("test_error")):
            excluded.append(Exclusion(run.source, run.status, "finished, but summary.json has no finite test_error"))
    return groups, homes, excluded, duplicates


def _best_of_doubled_epochs(
    groups: dict[tuple, dict[str, list[RunRecord]]], excluded: set[str]
) -> list[BaselineChoice]:
    """The paper's baseline rule [P §3.1]: a non-SAM run may train for twice the epochs, and the better of the
    standard and doubled budgets is reported. A cell (at E epochs, with SGD runs) takes the SGD runs of the cell
    that equals it except for 2E epochs *and holds SGD runs only* (a cell with other optimizers at 2E is an
    experiment of its own and keeps its SGD); the SGD arm with the lower mean final test error is shown, the other
    one is dropped from the tables (its runs stay in runs.csv). Changes `groups` in place."""
    choices = []
    for frozen in sorted(groups, key=lambda c: cell_order(dict(c))):
        cell = dict(frozen)
        epochs = cell.get("epochs")
        if frozen not in groups or BASELINE not in groups[frozen] or not is_number(epochs):
            continue
        doubled_epochs = normalise_epochs(2 * epochs)
        doubled = freeze({**cell, "epochs": doubled_epochs})
        if set(groups.get(doubled, {})) != {BASELINE}:
            continue
        arms = (groups[frozen][BASELINE], groups[doubled][BASELINE])
        if not _same_but_epochs(arms[0] + arms[1]):  # another experiment, not this one at twice the budget
            continue
        means = tuple(_mean_error(runs, excluded) for runs in arms)
        use_doubled = means[1] is not None and (means[0] is None or means[1] < means[0])
        if use_doubled:
            groups[frozen][BASELINE] = arms[1]
        del groups[doubled]
        choices.append(BaselineChoice(cell, means, doubled_epochs if use_doubled else epochs))
    return choices


# What may differ between the SGD runs at E and at 2E epochs of one cell: the epochs, and what TABLE_NEUTRAL allows.
_BUDGET_KEYS = ("trainer.epochs", "trainer.epoch_scale")


def _same_but_epochs(runs: list[RunRecord]) -> bool:
    """The runs are one experiment at different budgets: their configs agree in every key but the epochs."""
    flats = [{k: v for k, v in flatten(r.config).items() if not is_run_specific(k) and k not in _BUDGET_KEYS}
             for r in runs]  # fmt: skip
    keys = {k for flat in flats for k in flat}
    return all(len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) == 1 for k in keys)


def duplicate_runs(runs: Sequence[RunRecord]) -> dict[str, str]:
    """{source of a copy: source of the run it repeats} over runs whose resolved configs agree in every key that
    can change a result (`run_keys.DUPLICATE_NEUTRAL` aside), seed included: the same run however it was spelled
    (two directories, or a run read from disk and from W&B). The run kept is the first by source among those that
    can be averaged (finished, with a finite test error), else the first by source."""
    kept: dict[str, str] = {}
    copies: dict[str, str] = {}
    for run in sorted(runs, key=lambda r: (not (r.finished and is_number(r.summary.get("test_error"))), r.source)):
        flat = {k: v for k, v in flatten(run.config).items() if not matches(k, DUPLICATE_NEUTRAL)}
        key = json.dumps(flat, sort_keys=True, default=str)
        if key in kept:
            copies[run.source] = kept[key]
        else:
            kept[key] = run.source
    return copies


def _mean_error(runs: list[RunRecord], excluded: set[str]) -> float | None:
    """Mean final test error of the averaged runs (`excluded` holds every run without a finite one)."""
    values = [float(r.summary["test_error"]) for r in runs if r.source not in excluded]
    return sum(values) / len(values) if values else None


_NOWHERE = object()


def _parse_table(table: str | int, paper: Mapping[int, PaperTable]) -> int | None:
    if str(table) == "auto":
        return None
    if str(table).isdigit() and int(table) in paper:
        return int(table)
    raise ConfigError(f"--table {table}: choose one of {', '.join(map(str, sorted(paper)))} or auto")


def _table_report(
    spec: PaperTable | None,
    cells: list[tuple],
    groups: Mapping[tuple, Mapping[str, list[RunRecord]]],
    grouping: Grouping,
    excluded: set[str],
    include_missing_cells: bool,
    warnings: list[str],
    epochs_used: Mapping[tuple, int | float] | None = None,
    extra_metrics: tuple[str, ...] = (),
) -> TableReport:
    unit = spec.unit if spec else "error"
    metrics = spec.metrics if spec else ("test_error",)
    rows: list[tuple[tuple, Row]] = []
    matched_paper_cells: set[int] = set()
    for frozen in cells:
        cell = dict(frozen)
        arms = groups[frozen]
        for metric in metrics:
            paper_cell = spec.match(cell, metric) if spec else None
            if paper_cell is not None:
                matched_paper_cells.add(paper_cell.order)
            shown_arms = set(arms)
            if paper_cell is not None:  # the paper's arms, as missing rows when we ran none of that optimizer
                shown_arms |= set(PAPER_ARMS) - {arm.split("[")[0] for arm in arms}
            # Sorted, not set order: set order follows string hashes, which change between processes.
            shown = sorted(shown_arms, key=arm_order)
            samples = {arm: _samples(arms.get(arm, []), metric, unit, excluded, warnings) for arm in shown}
            for arm in shown:
                row = _row(cell, arm, metric, samples, paper_cell, arms.get(arm, []), excluded)
                if extra_metrics:
                    row = dataclasses.replace(row, extras=_extras(arms.get(arm, []), extra_metrics, excluded))
                if epochs_used and frozen in epochs_used:  # every row the doubled SGD budget touches says so
                    used = epochs_used[frozen]
                    row = dataclasses.replace(
                        row, **({"epochs_used": used} if arm == BASELINE else {"sgd_epochs": used})
                    )
                order = paper_cell.order if paper_cell is not None else math.inf
                rows.append(((order, cell_order(cell), metrics.index(metric), arm_order(arm)), row))
    if include_missing_cells and spec is not None:
        # Cells of the paper nobody ran: shown so that the table's coverage is visible.
        for paper_cell in spec.cells:
            if paper_cell.order in matched_paper_cells:
                continue
            cell = {key: paper_cell.keys.get(key) for key in grouping.columns}
            cell["label_noise"] = paper_cell.keys["label_noise"]
            for arm in PAPER_ARMS:
                row = _row(cell, arm, paper_cell.metric, {}, paper_cell, [], excluded)
                key = (paper_cell.order, cell_order(cell), 0, arm_order(arm))
                rows.append((key, row))
    rows.sort(key=lambda item: item[0])
    ordered = [row for _, row in rows]
    return TableReport(
        spec.id if spec else None,
        spec.title if spec else "Other runs (no table of the paper)",
        unit,
        _shown_columns(ordered, grouping, spec),
        metrics,
        ordered,
        spec.notes if spec else (),
    )


def _samples(
    runs: list[RunRecord], metric: str, unit: str, excluded: set[str], warnings: list[str]
) -> dict[int | None, list[float]]:
    """Values of the finished runs by seed, converted to the table's unit."""
    by_seed: dict[int | None, list[float]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.source):
        if run.source in excluded:
            continue
        value = run.summary.get(metric)
        if not is_number(value):
            warnings.append(f"{run.source}: finished, but summary.json has no finite {metric}")
            continue
        by_seed[run.seed].append(100.0 - value if unit == "accuracy" else float(value))
    return by_seed


def _extras(runs: list[RunRecord], keys: tuple[str, ...], excluded: set[str]) -> dict[str, Estimate | None]:
    """Mean ± interval of each summary key over the averaged runs that record it (None where none does)."""
    out = {}
    for key in keys:
        values = [
            float(r.summary[key])
            for r in sorted(runs, key=lambda r: r.source)
            if r.source not in excluded and is_number(r.summary.get(key))
        ]
        out[key] = mean_ci(values) if values else None
    return out


def _row(
    cell: Mapping[str, Any],
    arm: str,
    metric: str,
    samples: Mapping[str, Mapping[int | None, list[float]]],
    paper_cell: PaperCell | None,
    runs: list[RunRecord],
    excluded: set[str],
) -> Row:
    mine = samples.get(arm, {})
    values = [v for seed in sorted(mine, key=sort_key) for v in mine[seed]]
    ours = mean_ci(values) if values else None
    diff, diff_note = None, None
    if arm != BASELINE:
        baseline = samples.get(BASELINE, {})
        if not baseline:
            diff_note = "no SGD run" if values else None
        elif values:
            diff = difference(mine, baseline)
    paper = paper_cell.values.get(arm.split("[")[0]) if paper_cell is not None else None
    paper_sgd = paper_cell.values.get(BASELINE) if paper_cell is not None else None
    paper_diff = paper.decimal - paper_sgd.decimal if paper and paper_sgd and arm != BASELINE else None
    not_finished = sum(1 for run in runs if run.source in excluded)
    seeds = tuple(sorted(mine, key=sort_key))
    sources = tuple(
        r.source
        for r in sorted(runs, key=lambda r: r.source)
        if r.source not in excluded and is_number(r.summary.get(metric))
    )
    return Row(
        dict(cell), arm, metric, ours, paper, diff, paper_diff, diff_note, not_finished, seeds,
        values=tuple(values), sources=sources,
    )  # fmt: skip


def _shown_columns(rows: list[Row], grouping: Grouping, spec: PaperTable | None) -> tuple[str, ...]:
    """Cell keys worth a column: the paper's keys, epochs, --group-by keys, and any other key that is set."""
    always = set(spec.keys if spec else ("dataset", "model", "augment")) | {"epochs"} | set(grouping.extra_cell_keys)
    shown = []
    for column in grouping.columns:
        values = {row.cell.get(column) for row in rows}
        if column in always or values - {None, 0.0}:
            shown.append(column)
    return tuple(shown)
