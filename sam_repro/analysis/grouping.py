"""Which runs are averaged together: every run has a *cell* (a row of a table) and an *arm* (a column of it).

The cell is the run's dataset, model, augment, epochs, label noise and training subset (`sam_repro.paper.run_cell`,
the keys the paper's tables are indexed by), plus any `--group-by` keys; the arm is the optimizer's name, refined
by `--group-by optimizer.*` keys (`sam[rho=0.1]`). Runs of one (cell, arm) may differ only in the config keys of
`run_keys.TABLE_NEUTRAL`; any other difference is reported as a warning, since their mean would mix experiments.

Also the orders and labels that make every table deterministic: cells sort by their values (numbers numerically,
None last), arms SGD first, then SAM, then the rest by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from sam_repro.analysis.runs import RunRecord
from sam_repro.paper import CELL_KEYS, CELL_SOURCES, PaperCell, PaperTable, home_table, run_cell
from sam_repro.run_keys import TABLE_NEUTRAL, flatten, matches

BASELINE = "sgd"

ABSENT = "—"


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
        cell = {name: normalise_value(value) for name, value in run_cell(run.config).items()}
        for key in self.extra_cell_keys:
            cell[key] = normalise_value(run.value(key))
        return cell

    def arm(self, run: RunRecord) -> str:
        name = str(run.value("optimizer.name", "unknown"))
        # A key the run's optimizer does not have (rho of SGD) leaves its arm alone: SGD stays the baseline.
        refinements = ",".join(
            f"{k.removeprefix('optimizer.')}={value_label(run.value(k))}"
            for k in self.arm_keys
            if run.value(k) is not None
        )
        return f"{name}[{refinements}]" if refinements else name


@dataclass(frozen=True)
class Placement:
    """Where a run goes: its cell (a row of a table), the paper table holding it (None: "Other runs") and the paper's
    cell it reproduces (None: a row of our own beside the paper's, e.g. fewer epochs or a training subset)."""

    cell: dict[str, Any]
    table: PaperTable | None
    paper_cell: PaperCell | None


def place_run(
    run: RunRecord,
    grouping: Grouping | None = None,
    paper: Mapping[int, PaperTable] | None = None,
    only: int | None = None,
) -> Placement:
    """The one decision of where a run goes, shared by sam-tables and sam-wandb report: its cell from its resolved
    config (`Grouping.cell`), the first paper table with the cell's dataset and model (and label noise iff the
    table has it; with `only`, that table or none), the paper's cell when every key the paper prints agrees. The
    preset a run started from plays no part: a ResNet-8 smoke run of a Table 1 preset is no Table 1 run."""
    cell = (grouping or Grouping()).cell(run)
    table = home_table(cell, paper, only=only)
    return Placement(cell, table, table.match(cell, "test_error") if table is not None else None)


def normalise_value(value: Any) -> Any:
    """Hashable, comparable cell values (lists from YAML become tuples)."""
    if isinstance(value, list):
        return tuple(normalise_value(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, normalise_value(v)) for k, v in value.items()))
    return value


def freeze(cell: Mapping[str, Any]) -> tuple:
    """A cell as a dict key (its items in column order)."""
    return tuple(cell.items())


def is_number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool): a value a table can average."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sort_key(value: Any) -> tuple:
    """Orders None last, numbers numerically, everything else by its text."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0, str(value))


def cell_order(cell: Mapping[str, Any]) -> tuple:
    """Cells by dataset, model, augment, epochs, ... in that order, each value by `sort_key`."""
    return tuple(sort_key(value) for value in cell.values())


def arm_order(arm: str) -> tuple:
    """Sort key of optimizer arms: SGD (the baseline) first, then SAM, then the other optimizers by name."""
    name = arm.split("[")[0]
    return (0 if name == BASELINE else 1 if name == "sam" else 2, arm)


def value_label(value: Any) -> str:
    """A cell value as text: None -> "—", 0.2 -> "0.2", 200.0 -> "200"."""
    if value is None:
        return ABSENT
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(value_label(v) for v in value) + "]"
    return str(value)


def cell_label(cell: Mapping[str, Any]) -> str:
    """`dataset=cifar10, model=wrn28_10, ...` with unset keys (and zero label noise) left out."""
    shown = {k: v for k, v in cell.items() if v is not None and not (k == "label_noise" and v == 0)}
    return ", ".join(f"{k}={value_label(v)}" for k, v in shown.items())


def is_run_specific(dotted: str) -> bool:
    """A config key that may differ between the runs of one arm without making them different experiments: the keys
    that never change a result, plus seeds and labels (`run_keys.TABLE_NEUTRAL`); `_`-keys are bookkeeping. Any other
    difference is reported as a warning (a mean over runs with different learning rates is not a number anyone
    wants)."""
    return any(p.startswith("_") for p in dotted.split(".")) or matches(dotted, TABLE_NEUTRAL)


def mixed_config_warnings(groups: Mapping[tuple, Mapping[str, list[RunRecord]]], excluded: set[str]) -> list[str]:
    """Arms whose finished runs differ in more than the seed: their mean would mix experiments."""
    warnings = []
    for cell in sorted(groups, key=lambda c: cell_order(dict(c))):
        for arm in sorted(groups[cell]):
            runs = [r for r in groups[cell][arm] if r.source not in excluded]
            flats = [flatten(r.config) for r in runs]
            keys = sorted({k for flat in flats for k in flat if not is_run_specific(k)})
            differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
            if differing:
                warnings.append(
                    f"{cell_label(dict(cell))}, {arm}: averaged runs differ in {', '.join(differing)} "
                    "(split them with --group-by)"
                )
            seeds = [r.seed for r in runs]
            repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=sort_key)
            if repeated:
                shown = ", ".join(map(str, repeated))
                warnings.append(f"{cell_label(dict(cell))}, {arm}: seed(s) {shown} ran more than once")
    return warnings
