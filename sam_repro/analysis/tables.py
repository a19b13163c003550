"""Our runs beside the paper's tables: grouping by table cell, intervals, SAM − SGD, and rendering.

Three parts, top to bottom:

1. The paper's numbers (`results/paper/tables.yaml`) as `PaperTable`s, with `PaperTable.lookup` to find one value.
2. `build_report(runs)`: every run is placed in a *cell* (dataset, model, augment, epochs, label noise, train subset,
   plus any `--group-by` keys) and an *arm* (the optimizer name, plus `--group-by optimizer.*` keys). Each
   (cell, arm) gets the mean ± t-interval of the final `test_error` of its finished runs; each arm other than SGD
   gets its difference to the SGD arm of the same cell (paired by seed or Welch, see `stats.py`). A cell belongs to
   the paper table that has a cell with its dataset and model (and label noise, for Table 4); the paper's value is
   shown only where every key the paper prints agrees with ours. Unfinished runs are listed, never averaged, and a
   missing number is written as missing, never filled in.
3. Renderers (Markdown, CSV, LaTeX) that are pure functions of the report: rows are sorted and floats formatted
   with fixed precision, so the same runs give byte-identical files.

Table 4 is reported by the paper as accuracy; its rows (ours included, as 100 − test_error) stay in accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from sam_repro.analysis.runs import RunRecord, flatten_config
from sam_repro.analysis.stats import Difference, Estimate, difference, mean_ci
from sam_repro.errors import ConfigError, DataError

PAPER_TABLES_FILE = Path(__file__).resolve().parents[2] / "results" / "paper" / "tables.yaml"

BASELINE = "sgd"
# Arms the paper reports in every table: shown (as missing) even when we ran only one of them.
PAPER_ARMS = ("sgd", "sam")
TABLE_IDS = (1, 2, 3, 4, 5)

# The cell of a run: name -> dotted config key. `epochs` is computed (epochs x epoch_scale).
CELL_KEYS = ("dataset", "model", "augment", "epochs", "label_noise", "train_subset")
CELL_SOURCES = {
    "dataset": "dataset.name",
    "model": "model.name",
    "augment": "augment.name",
    "label_noise": "dataset.label_noise",
    "train_subset": "dataset.train_subset",
}
METRIC_LABELS = {"test_error": "top-1", "test_error_top5": "top-5"}
UNIT_LABELS = {"error": "test error (%), lower is better", "accuracy": "test accuracy (%), higher is better"}

# Config keys that may differ between the runs of one arm without making them different experiments: seeds,
# paths, logging and execution details. Any other difference is reported as a warning (a mean over runs with
# different learning rates is not a number anyone wants).
RUN_SPECIFIC_KEYS = (
    "seed", "run_root", "experiment", "logger", "hydra", "dataset.root", "dataset.noise_seed", "trainer.device",
    "trainer.progress", "trainer.log_every", "trainer.threads", "trainer.eval_batch_size",
    "trainer.on_corrupt_checkpoint", "trainer.compile", "trainer.channels_last", "trainer.deterministic",
    "trainer.name",  # a label of the trainer preset (absent from older runs): its values are compared one by one
)


# ----------------------------------------------------------------------------------------------------------------
# The paper's tables
# ----------------------------------------------------------------------------------------------------------------

_PAPER_VALUE = re.compile(r"^(?P<value>-?\d+(?:\.\d+)?)(?:±(?P<bound><)?(?P<half_width>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class PaperValue:
    """One printed number: "2.7±0.1", "2.1±<0.1" (only a bound on the interval) or "15.3" (no interval)."""

    text: str
    value: float
    half_width: float | None
    bound: bool

    @property
    def decimal(self) -> Decimal:
        """The value at the paper's printed precision (differences of Decimals keep it: 2.7 - 3.5 = -0.8)."""
        return Decimal(self.text.split("±")[0])

    def display(self) -> str:
        if self.half_width is None:
            return self.text
        value, half_width = self.text.split("±")
        return f"{value} ± {half_width}"


def parse_paper_value(text: str) -> PaperValue:
    match = _PAPER_VALUE.match(text)
    if match is None:
        raise DataError(f"{PAPER_TABLES_FILE}: cannot parse paper value {text!r} (expected e.g. 2.7±0.1)")
    half_width = match["half_width"]
    return PaperValue(
        text, float(match["value"]), float(half_width) if half_width is not None else None, bool(match["bound"])
    )


@dataclass(frozen=True)
class PaperCell:
    """One row of a paper table: the keys the paper prints (label_noise always present) and its values."""

    table: int
    order: int
    keys: Mapping[str, Any]
    metric: str
    values: Mapping[str, PaperValue | None]
    note: str | None = None

    def matches(self, cell: Mapping[str, Any]) -> bool:
        """Our cell reproduces this paper cell: every key the paper prints agrees, on the full training set."""
        if cell.get("train_subset") is not None:
            return False
        return all(_same(cell.get(key), value) for key, value in self.keys.items())


@dataclass(frozen=True)
class PaperTable:
    id: int
    title: str
    unit: str
    keys: tuple[str, ...]
    optimizers: tuple[str, ...]
    cells: tuple[PaperCell, ...]
    notes: tuple[str, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cell.metric for cell in self.cells))

    def contains(self, cell: Mapping[str, Any]) -> bool:
        """The cell is about this table's setting: same dataset and model, and label noise iff the table has it."""
        noisy = (cell.get("label_noise") or 0.0) > 0
        return any(
            _same(cell.get("dataset"), c.keys["dataset"])
            and _same(cell.get("model"), c.keys["model"])
            and (c.keys["label_noise"] > 0) == noisy
            for c in self.cells
        )

    def match(self, cell: Mapping[str, Any], metric: str) -> PaperCell | None:
        return next((c for c in self.cells if c.metric == metric and c.matches(cell)), None)

    def lookup(self, optimizer: str, metric: str | None = None, **keys: Any) -> PaperValue | None:
        """The paper's value for one cell, e.g. `tables[1].lookup("sam", dataset="cifar10", model="wrn28_10",
        epochs=200, augment="basic")`. Keys the paper does not print for that cell may be omitted."""
        keys.setdefault("label_noise", 0.0)
        for cell in self.cells:
            if (metric is None or cell.metric == metric) and all(
                _same(keys.get(k), v) for k, v in cell.keys.items()
            ):
                return cell.values.get(optimizer)
        raise KeyError(f"Table {self.id} has no cell {keys}")


def _same(ours: Any, paper: Any) -> bool:
    """Equality that treats 200 and 200.0 (epochs) and 0.2 and 0.20000001 (label noise) as the same."""
    if isinstance(ours, (int, float)) and isinstance(paper, (int, float)) and not isinstance(ours, bool):
        return math.isclose(ours, paper, rel_tol=1e-9, abs_tol=1e-9)
    return ours == paper


def load_paper_tables(path: str | os.PathLike | None = None) -> dict[int, PaperTable]:
    """Read results/paper/tables.yaml into {table id: PaperTable}."""
    path = Path(path) if path is not None else PAPER_TABLES_FILE
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read the paper's tables ({type(exc).__name__})") from exc
    tables = {}
    for table_id, spec in document["tables"].items():
        keys = tuple(k for k in spec["keys"] if k != "metric")
        optimizers = tuple(spec["optimizers"])
        cells = []
        for order, raw in enumerate(spec["cells"]):
            unknown = set(raw) - set(spec["keys"]) - set(optimizers) - {"note"}
            if unknown:
                raise DataError(f"{path}: Table {table_id} cell {order} has unknown fields {sorted(unknown)}")
            cell_keys = {k: raw[k] for k in keys if raw.get(k) is not None}
            cell_keys.setdefault("label_noise", 0.0)
            values = {o: parse_paper_value(raw[o]) if raw.get(o) is not None else None for o in optimizers}
            metric = raw.get("metric", spec.get("metric", "test_error"))
            cells.append(PaperCell(int(table_id), order, cell_keys, metric, values, raw.get("note")))
        tables[int(table_id)] = PaperTable(
            int(table_id), spec["title"], spec["unit"], keys, optimizers, tuple(cells), tuple(spec.get("notes", ()))
        )
    return tables


# ----------------------------------------------------------------------------------------------------------------
# Grouping runs into cells and arms
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """How runs are split: cell keys (rows) and optimizer keys that refine the arm (e.g. optimizer.rho)."""

    extra_cell_keys: tuple[str, ...] = ()
    arm_keys: tuple[str, ...] = ()

    @classmethod
    def parse(cls, group_by: Iterable[str]) -> Grouping:
        """`--group-by` values: comma-separated dotted config keys; optimizer.* ones refine the arm."""
        keys = [k.strip() for item in group_by for k in item.split(",") if k.strip()]
        keys = [k for k in dict.fromkeys(keys) if k not in CELL_KEYS and k not in CELL_SOURCES.values()]
        arm_keys = tuple(k for k in keys if k.startswith("optimizer.") and k != "optimizer.name")
        cell_keys = tuple(k for k in keys if not k.startswith("optimizer."))
        return cls(cell_keys, arm_keys)

    @property
    def columns(self) -> tuple[str, ...]:
        return CELL_KEYS + self.extra_cell_keys

    def cell(self, run: RunRecord) -> dict[str, Any]:
        cell = {name: _normalise(run.value(CELL_SOURCES[name])) for name in CELL_KEYS if name in CELL_SOURCES}
        cell["label_noise"] = float(cell["label_noise"] or 0.0)
        cell["epochs"] = _epochs(run)
        cell = {name: cell[name] for name in CELL_KEYS}
        for key in self.extra_cell_keys:
            cell[key] = _normalise(run.value(key))
        return cell

    def arm(self, run: RunRecord) -> str:
        name = str(run.value("optimizer.name", "unknown"))
        # A key the run's optimizer does not have (rho of SGD) leaves its arm alone: SGD stays the baseline.
        refinements = ",".join(
            f"{k.removeprefix('optimizer.')}={_label(run.value(k))}" for k in self.arm_keys if run.value(k) is not None
        )
        return f"{name}[{refinements}]" if refinements else name


def _normalise(value: Any) -> Any:
    """Hashable, comparable cell values (lists from YAML become tuples)."""
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _normalise(v)) for k, v in value.items()))
    return value


def _epochs(run: RunRecord) -> int | float | None:
    """Planned epochs of the run (trainer.epochs x trainer.epoch_scale), an int when whole."""
    epochs = run.value("trainer.epochs")
    if epochs is None:
        return None
    return _normalise_epochs(float(epochs) * float(run.value("trainer.epoch_scale", 1.0) or 1.0))


def _sort_key(value: Any) -> tuple:
    """Orders None last, numbers numerically, everything else by its text."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0, str(value))


def _cell_order(cell: Mapping[str, Any]) -> tuple:
    """Cells by dataset, model, augment, epochs, ... in that order, each value by `_sort_key`."""
    return tuple(_sort_key(value) for value in cell.values())


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One (cell, arm, metric) of a table, in the table's unit."""

    cell: Mapping[str, Any]
    arm: str
    metric: str
    ours: Estimate | None
    paper: PaperValue | None
    diff: Difference | None      # ours: this arm − the SGD arm of the same cell
    paper_diff: Decimal | None   # the paper's: this arm − its SGD value
    diff_note: str | None        # why `diff` is missing, when it is
    not_finished: int            # runs of this cell and arm that were listed, not averaged
    seeds: tuple[int | None, ...] = ()
    epochs_used: int | float | None = None  # SGD only: set when its runs are the doubled-epoch ones (see below)


@dataclass
class TableReport:
    id: int | None                # None: runs that belong to none of the paper's tables
    title: str
    unit: str
    columns: tuple[str, ...]      # the cell keys shown
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

    cell: Mapping[str, Any]               # the cell at the standard epochs E
    means: tuple[float | None, float | None]  # mean final test error at E and at 2E (None: no finished run)
    used: int | float                      # the epochs of the runs shown as SGD


@dataclass
class Report:
    tables: list[TableReport]
    runs: list[RunRecord]
    grouping: Grouping
    excluded: list[Exclusion]
    warnings: list[str] = field(default_factory=list)
    baseline_choices: list[BaselineChoice] = field(default_factory=list)


def build_report(
    runs: Sequence[RunRecord],
    table: str | int = "auto",
    group_by: Iterable[str] = (),
    paper: Mapping[int, PaperTable] | None = None,
    sgd_best_of_doubled: bool = True,
) -> Report:
    """Group `runs` into the paper's tables. `table`: "auto" (each cell to the table it belongs to, the rest under
    "Other runs") or a table id (only that table's cells, and every cell of the paper's table, run or not).
    `sgd_best_of_doubled`: the paper's baseline rule (see `_best_of_doubled_epochs`)."""
    paper = paper if paper is not None else load_paper_tables()
    runs = sorted(runs, key=lambda r: r.source)  # every order below derives from this one
    grouping = Grouping.parse(group_by)
    selected = _parse_table(table, paper)
    for key in grouping.extra_cell_keys + grouping.arm_keys:
        if all(run.value(key) is None for run in runs):
            raise ConfigError(f"--group-by {key}: no run has this config key (a dotted key of config.yaml)")

    # cell -> arm -> runs; the cell is kept as a sorted tuple so that it can be a dict key.
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    excluded: list[Exclusion] = []
    for run in runs:
        groups[_freeze(grouping.cell(run))][grouping.arm(run)].append(run)
        if not run.finished:
            excluded.append(Exclusion(run.source, run.status, run.reason))
        elif not _is_number(run.summary.get("test_error")):
            excluded.append(Exclusion(run.source, run.status, "finished, but summary.json has no finite test_error"))
    excluded_sources = {e.source for e in excluded}
    choices = _best_of_doubled_epochs(groups, excluded_sources) if sgd_best_of_doubled else []
    epochs_used = {_freeze(dict(c.cell)): c.used for c in choices if c.used != c.cell["epochs"]}

    warnings = _mixed_config_warnings(groups, excluded_sources)
    by_table: dict[int | None, list[tuple]] = defaultdict(list)
    for cell in groups:
        home = _home_table(dict(cell), paper, selected)
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
                          include_missing_cells=selected is not None, warnings=warnings, epochs_used=epochs_used)
        )
    if selected is None and by_table.get(None):
        reports.append(_table_report(None, by_table[None], groups, grouping, excluded_sources, False, warnings,
                                     epochs_used))
    excluded.sort(key=lambda e: e.source)
    return Report(reports, runs, grouping, excluded, warnings, choices)


def _best_of_doubled_epochs(
    groups: dict[tuple, dict[str, list[RunRecord]]], excluded: set[str]
) -> list[BaselineChoice]:
    """The paper's baseline rule [P §3.1]: a non-SAM run may train for twice the epochs, and the better of the
    standard and doubled budgets is reported. A cell (at E epochs, with SGD runs) takes the SGD runs of the cell
    that equals it except for 2E epochs *and holds SGD runs only* (a cell with other optimizers at 2E is an
    experiment of its own and keeps its SGD); the SGD arm with the lower mean final test error is shown, the other
    one is dropped from the tables (its runs stay in runs.csv). Changes `groups` in place."""
    choices = []
    for frozen in sorted(groups, key=lambda c: _cell_order(dict(c))):
        cell = dict(frozen)
        epochs = cell.get("epochs")
        if frozen not in groups or BASELINE not in groups[frozen] or not _is_number(epochs):
            continue
        doubled_epochs = _normalise_epochs(2 * epochs)
        doubled = _freeze({**cell, "epochs": doubled_epochs})
        if set(groups.get(doubled, {})) != {BASELINE}:
            continue
        arms = (groups[frozen][BASELINE], groups[doubled][BASELINE])
        means = tuple(_mean_error(runs, excluded) for runs in arms)
        use_doubled = means[1] is not None and (means[0] is None or means[1] < means[0])
        if use_doubled:
            groups[frozen][BASELINE] = arms[1]
        del groups[doubled]
        choices.append(BaselineChoice(cell, means, doubled_epochs if use_doubled else epochs))
    return choices


def _normalise_epochs(epochs: float) -> int | float:
    """An int when whole (200.0 -> 200), else rounded to 4 decimals."""
    return int(round(epochs)) if math.isclose(epochs, round(epochs)) else round(epochs, 4)


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


def _home_table(cell: Mapping[str, Any], paper: Mapping[int, PaperTable], selected: int | None) -> Any:
    if selected is not None:
        return selected if paper[selected].contains(cell) else _NOWHERE
    return next((t for t in sorted(paper) if paper[t].contains(cell)), None)


def _freeze(cell: Mapping[str, Any]) -> tuple:
    return tuple(cell.items())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _table_report(
    spec: PaperTable | None,
    cells: list[tuple],
    groups: Mapping[tuple, Mapping[str, list[RunRecord]]],
    grouping: Grouping,
    excluded: set[str],
    include_missing_cells: bool,
    warnings: list[str],
    epochs_used: Mapping[tuple, int | float] | None = None,
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
                if arm == BASELINE and epochs_used and frozen in epochs_used:
                    row = dataclasses.replace(row, epochs_used=epochs_used[frozen])
                order = paper_cell.order if paper_cell is not None else math.inf
                rows.append(((order, _cell_order(cell), metrics.index(metric), arm_order(arm)), row))
    if include_missing_cells and spec is not None:
        # Cells of the paper nobody ran: shown so that the table's coverage is visible.
        for paper_cell in spec.cells:
            if paper_cell.order in matched_paper_cells:
                continue
            cell = {key: paper_cell.keys.get(key) for key in grouping.columns}
            cell["label_noise"] = paper_cell.keys["label_noise"]
            for arm in PAPER_ARMS:
                row = _row(cell, arm, paper_cell.metric, {}, paper_cell, [], excluded)
                key = (paper_cell.order, _cell_order(cell), 0, arm_order(arm))
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


def arm_order(arm: str) -> tuple:
    """Sort key of optimizer arms: SGD (the baseline) first, then SAM, then the other optimizers by name."""
    name = arm.split("[")[0]
    return (0 if name == BASELINE else 1 if name == "sam" else 2, arm)


def _samples(
    runs: list[RunRecord], metric: str, unit: str, excluded: set[str], warnings: list[str]
) -> dict[int | None, list[float]]:
    """Values of the finished runs by seed, converted to the table's unit."""
    by_seed: dict[int | None, list[float]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.source):
        if run.source in excluded:
            continue
        value = run.summary.get(metric)
        if not _is_number(value):
            warnings.append(f"{run.source}: finished, but summary.json has no finite {metric}")
            continue
        by_seed[run.seed].append(100.0 - value if unit == "accuracy" else float(value))
    return by_seed


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
    values = [v for seed in sorted(mine, key=_sort_key) for v in mine[seed]]
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
    seeds = tuple(sorted(mine, key=_sort_key))
    return Row(dict(cell), arm, metric, ours, paper, diff, paper_diff, diff_note, not_finished, seeds)


def _shown_columns(rows: list[Row], grouping: Grouping, spec: PaperTable | None) -> tuple[str, ...]:
    """Cell keys worth a column: the paper's keys, epochs, --group-by keys, and any other key that is set."""
    always = set(spec.keys if spec else ("dataset", "model", "augment")) | {"epochs"} | set(grouping.extra_cell_keys)
    shown = []
    for column in grouping.columns:
        values = {row.cell.get(column) for row in rows}
        if column in always or values - {None, 0.0}:
            shown.append(column)
    return tuple(shown)


def _mixed_config_warnings(
    groups: Mapping[tuple, Mapping[str, list[RunRecord]]], excluded: set[str]
) -> list[str]:
    """Arms whose finished runs differ in more than the seed: their mean would mix experiments."""
    warnings = []
    for cell in sorted(groups, key=lambda c: _cell_order(dict(c))):
        for arm in sorted(groups[cell]):
            runs = [r for r in groups[cell][arm] if r.source not in excluded]
            flats = [flatten_config(r.config) for r in runs]
            keys = sorted({k for flat in flats for k in flat if not _run_specific(k)})
            differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
            if differing:
                warnings.append(
                    f"{cell_label(dict(cell))}, {arm}: averaged runs differ in {', '.join(differing)} "
                    "(split them with --group-by)"
                )
            seeds = [r.seed for r in runs]
            repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=_sort_key)
            if repeated:
                shown = ", ".join(map(str, repeated))
                warnings.append(f"{cell_label(dict(cell))}, {arm}: seed(s) {shown} ran more than once")
    return warnings


def cell_label(cell: Mapping[str, Any]) -> str:
    """`dataset=cifar10, model=wrn28_10, ...` with unset keys (and zero label noise) left out."""
    shown = {k: v for k, v in cell.items() if v is not None and not (k == "label_noise" and v == 0)}
    return ", ".join(f"{k}={_label(v)}" for k, v in shown.items())


def _run_specific(dotted: str) -> bool:
    parts = dotted.split(".")
    return any(p.startswith("_") for p in parts) or any(
        dotted == k or dotted.startswith(k + ".") for k in RUN_SPECIFIC_KEYS
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------

MISSING = "missing"
ABSENT = "—"


def _label(value: Any) -> str:
    """A cell value as text: None -> "—", 0.2 -> "0.2", 200.0 -> "200"."""
    if value is None:
        return ABSENT
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_label(v) for v in value) + "]"
    return str(value)


def _number(value: float, decimals: int, sign: bool = False) -> str:
    text = f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"
    if re.fullmatch(r"[-+]?0\.?0*", text):  # never print "-0.00", nor "+0.00"
        return text.lstrip("+-")
    return text


def format_estimate(estimate: Estimate | None, not_finished: int = 0, decimals: int = 2) -> str:
    """"2.71 ± 0.08 (5)"; "2.71 (1)" without an interval; "missing" without finished runs."""
    if estimate is None:
        return f"{MISSING} (0 of {not_finished} finished)" if not_finished else MISSING
    text = _number(estimate.mean, decimals)
    if estimate.half_width is not None:
        text += f" ± {_number(estimate.half_width, decimals)}"
    return f"{text} ({estimate.n})"


def format_difference(diff: Difference | None, note: str | None, decimals: int = 2) -> str:
    if diff is None:
        return note or ABSENT
    text = _number(diff.mean, decimals, sign=True)
    return text + (f" ± {_number(diff.half_width, decimals)}" if diff.half_width is not None else "")


def format_method(diff: Difference | None) -> str:
    if diff is None:
        return ""
    if diff.method == "paired":
        return f"paired, {diff.n} seeds"
    df = f", df {diff.df:.1f}" if diff.df is not None else ""
    return f"Welch, {diff.n} runs{df}"


def _paper_diff(value: Decimal | None) -> str:
    if value is None:
        return ABSENT
    return f"{value:+}" if value != 0 else "0"


def _header(columns: Sequence[str], metrics: Sequence[str]) -> list[str]:
    header = [c.replace("_", " ") for c in columns] + ["optimizer"]
    if len(metrics) > 1:
        header.append("metric")
    return header + ["ours", "paper", "ours − SGD", "paper − SGD", "difference"]


def _cells(table: TableReport, row: Row) -> list[str]:
    cells = [_label(row.cell.get(c)) for c in table.columns] + [row.arm]
    if len(table.metrics) > 1:
        cells.append(METRIC_LABELS.get(row.metric, row.metric))
    ours = format_estimate(row.ours, row.not_finished)
    if row.epochs_used is not None:
        ours += f", {_label(row.epochs_used)} ep"
    return cells + [
        ours,
        row.paper.display() if row.paper else ABSENT,
        format_difference(row.diff, row.diff_note) if row.arm != BASELINE else "",
        _paper_diff(row.paper_diff) if row.arm != BASELINE else "",
        format_method(row.diff),
    ]


MARKDOWN_LEGEND = (
    "ours: mean ± 95% t-interval over the finished runs (their number in parentheses) of the final test error; "
    "paper: Foret et al. (ICLR 2021), ± = 95% interval over 5 runs. ours − SGD: this optimizer minus SGD in the "
    "same cell, paired by seed when both ran the same seeds, Welch's interval otherwise (column \"difference\"). "
    "\"missing\": no finished run; \"—\": not reported."
)


def table_heading(table: TableReport) -> str:
    name = f"Table {table.id}: {table.title}" if table.id is not None else table.title
    return f"{name} — {UNIT_LABELS[table.unit]}"


def render_table_markdown(table: TableReport) -> list[str]:
    """One table as Markdown lines (no heading), its notes below it."""
    header = _header(table.columns, table.metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cells(table, row)) + " |" for row in table.rows]
    lines.append("")
    if table.unit == "accuracy":
        lines += ["Ours as accuracy = 100 − test error.", ""]
    if table.notes:
        lines += [f"- {note}" for note in table.notes] + [""]
    return lines


def render_notices_markdown(report: Report) -> list[str]:
    """The runs left out of the means, and the warnings, as Markdown sections."""
    lines = []
    if report.excluded:
        lines += ["## Runs not averaged", "", "| run | status | reason |", "|---|---|---|"]
        lines += [f"| {e.source} | {e.status} | {e.reason or ABSENT} |" for e in report.excluded]
        lines.append("")
    if report.baseline_choices:
        lines += ["## SGD: best of the standard and doubled epochs", "",
                  "As the paper [§3.1]: where SGD-only runs at twice a cell's epochs exist, the SGD row shows the "
                  "budget with the lower mean test error (marked \", N ep\" when it is the doubled one).", "",
                  "| cell | SGD at E | SGD at 2E | shown |", "|---|---|---|---|"]
        for choice in report.baseline_choices:
            epochs = choice.cell["epochs"]
            means = [MISSING if m is None else _number(m, 2) for m in choice.means]
            lines.append(f"| {cell_label(choice.cell)} | {means[0]} ({_label(epochs)} ep) | "
                         f"{means[1]} ({_label(_normalise_epochs(2 * epochs))} ep) | {_label(choice.used)} ep |")
        lines.append("")
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    return lines


def render_markdown(report: Report) -> str:
    lines = ["# SAM vs SGD: our runs beside the paper", "", MARKDOWN_LEGEND, ""]
    for table in report.tables:
        lines += [f"## {table_heading(table)}", ""] + render_table_markdown(table)
    return "\n".join(lines + render_notices_markdown(report))


CSV_FIELDS = (
    "table", "optimizer", "metric", "unit", "n", "mean", "ci95", "seeds", "not_finished", "paper", "paper_value",
    "paper_ci95", "diff_vs_sgd", "diff_ci95", "diff_method", "diff_n", "diff_df", "paper_diff_vs_sgd",
    "epochs_used",
)


def _csv_number(value: float | None, decimals: int = 4) -> str:
    return "" if value is None else _number(value, decimals)


def render_csv(report: Report) -> str:
    """One line per (table, cell, optimizer, metric); every number as plain text, empty when missing."""
    columns = report.grouping.columns
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("table",) + columns + CSV_FIELDS[1:])
    for table in report.tables:
        for row in table.rows:
            diff = row.diff
            writer.writerow(
                [table.id if table.id is not None else "other"]
                + ["" if row.cell.get(c) is None else _label(row.cell.get(c)) for c in columns]
                + [
                    row.arm, row.metric, table.unit,
                    row.ours.n if row.ours else 0,
                    _csv_number(row.ours.mean if row.ours else None),
                    _csv_number(row.ours.half_width if row.ours else None),
                    " ".join(_label(s) for s in row.seeds),
                    row.not_finished,
                    row.paper.text if row.paper else "",
                    _csv_number(row.paper.value if row.paper else None),
                    _csv_number(row.paper.half_width if row.paper else None),
                    _csv_number(diff.mean if diff else None),
                    _csv_number(diff.half_width if diff else None),
                    diff.method if diff else "",
                    diff.n if diff else "",
                    _csv_number(diff.df if diff else None, 2),
                    str(row.paper_diff) if row.paper_diff is not None else "",
                    _label(row.epochs_used) if row.epochs_used is not None else "",
                ]
            )
    return buffer.getvalue()


def render_runs_csv(report: Report) -> str:
    """Every run read, whether averaged or not: the audit trail of the tables."""
    columns = report.grouping.columns
    excluded = {e.source: e for e in report.excluded}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("run",) + columns + ("optimizer", "seed", "status", "test_error", "averaged", "reason"))
    for run in report.runs:
        cell = report.grouping.cell(run)
        error = run.summary.get("test_error")
        writer.writerow(
            [run.source]
            + ["" if cell.get(c) is None else _label(cell.get(c)) for c in columns]
            + [report.grouping.arm(run), _label(run.seed), run.status,
               _csv_number(error) if _is_number(error) else "",
               "no" if run.source in excluded else "yes",
               excluded[run.source].reason if run.source in excluded else ""]
        )
    return buffer.getvalue()


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _latex(text: str) -> str:
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return escaped.replace("±", r"$\pm$").replace("−", "$-$").replace("—", "--").replace("<", r"$<$")


def render_latex(report: Report) -> str:
    """One booktabs tabular per table (needs \\usepackage{booktabs})."""
    parts = ["% SAM vs SGD: our runs beside the paper (generated by sam-tables; needs \\usepackage{booktabs})", ""]
    for table in report.tables:
        header = _header(table.columns, table.metrics)
        parts += [
            f"% {table_heading(table)}",
            r"\begin{tabular}{" + "l" * len(header) + "}",
            r"\toprule",
            " & ".join(_latex(h) for h in header) + r" \\",
            r"\midrule",
        ]
        parts += [" & ".join(_latex(c) for c in _cells(table, row)) + r" \\" for row in table.rows]
        parts += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def write_tables(report: Report, out_dir: str | os.PathLike, latex: bool = False) -> list[Path]:
    """tables.md, tables.csv, runs.csv (and tables.tex) in `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = {"tables.md": render_markdown(report), "tables.csv": render_csv(report),
               "runs.csv": render_runs_csv(report)}
    if latex:
        outputs["tables.tex"] = render_latex(report)
    written = []
    for name, text in outputs.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def provenance(command: Sequence[str], inputs: Sequence[str], n_runs: int) -> dict[str, Any]:
    """Where a set of tables came from: command, code version, inputs. Kept out of the tables themselves (it
    carries a timestamp), so that the tables stay byte-identical for identical runs."""
    from datetime import datetime, timezone

    import sam_repro

    repository = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": list(command),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "sam_repro": sam_repro.__version__,
        "python": platform.python_version(),
        "machine": platform.node(),
        "inputs": list(inputs),
        "runs": n_runs,
        "paper_tables": {
            "path": PAPER_TABLES_FILE.name,
            "sha256": hashlib.sha256(PAPER_TABLES_FILE.read_bytes()).hexdigest()
            if PAPER_TABLES_FILE.exists() else None,
        },
    }


def write_provenance(
    out_dir: str | os.PathLike, command: Sequence[str], inputs: Sequence[str], n_runs: int
) -> Path:
    path = Path(out_dir) / "provenance.json"
    text = json.dumps(provenance(command, inputs, n_runs), indent=2, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")
    return path
