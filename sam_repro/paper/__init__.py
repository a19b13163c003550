"""The paper's numbers, shipped with the package: one loader for Tables 1-5 and the resolved hyperparameters.

Two data files live beside this module (package data, so an installed wheel has them too):
    tables.yaml           the paper's Tables 1-5 as printed (Foret et al., ICLR 2021)
    hyperparameters.yaml  what every cell's `sam-train` command resolves to (written by
                          scripts/write_hyperparameters.py from the presets; checked by tests/test_presets.py)

Reading them:
    paper_tables()                  {table id: PaperTable}, read once per process
    paper_table(1)                  one table
    paper_table(1).lookup("sam", dataset="cifar10", model="wrn28_10", epochs=200, augment="basic")
    paper_cell(cfg), paper_value(cfg)
                                    the paper's cell / value for a run's config (config.yaml, the trainer's cfg):
                                    `experiment=table1/...` looks in Table 1 only, any other run in the first table
                                    that has its dataset and model, by the rule sam-tables uses
    hyperparameters()               {cell id: resolved settings}, ids like "table1/wrn28_10_200ep/cifar10/basic/sam"

A cell of a run is `run_cell(config)`: dataset, model, augment, epochs (trainer.epochs x trainer.epoch_scale),
label noise and training subset; the paper's value is given only where every key the paper prints agrees and the
run trained on the full training set. Nothing here imports torch or the engine.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from sam_repro.errors import ConfigError, DataError

TABLES_FILE = Path(__file__).resolve().with_name("tables.yaml")
HYPERPARAMETERS_FILE = Path(__file__).resolve().with_name("hyperparameters.yaml")
TABLE_IDS = (1, 2, 3, 4, 5)

# The cell of a run: name -> dotted config key. `epochs` is computed (trainer.epochs x trainer.epoch_scale).
CELL_KEYS = ("dataset", "model", "augment", "epochs", "label_noise", "train_subset")
CELL_SOURCES = {
    "dataset": "dataset.name",
    "model": "model.name",
    "augment": "augment.name",
    "label_noise": "dataset.label_noise",
    "train_subset": "dataset.train_subset",
}

_PAPER_VALUE = re.compile(r"^(?P<value>-?\d+(?:\.\d+)?)(?:±(?P<bound><)?(?P<half_width>\d+(?:\.\d+)?))?$")
_EXPERIMENT_TABLE = re.compile(r"^table(?P<id>\d+)/")


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


def parse_paper_value(text: str, source: str | os.PathLike = TABLES_FILE) -> PaperValue:
    match = _PAPER_VALUE.match(text)
    if match is None:
        raise DataError(f"{source}: cannot parse paper value {text!r} (expected e.g. 2.7±0.1)")
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
        return all(same_value(cell.get(key), value) for key, value in self.keys.items())


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
            same_value(cell.get("dataset"), c.keys["dataset"])
            and same_value(cell.get("model"), c.keys["model"])
            and (c.keys["label_noise"] > 0) == noisy
            for c in self.cells
        )

    def match(self, cell: Mapping[str, Any], metric: str) -> PaperCell | None:
        return next((c for c in self.cells if c.metric == metric and c.matches(cell)), None)

    def lookup(self, optimizer: str, metric: str | None = None, **keys: Any) -> PaperValue | None:
        """The paper's value for one cell, e.g. `paper_table(1).lookup("sam", dataset="cifar10", model="wrn28_10",
        epochs=200, augment="basic")`. Keys the paper does not print for that cell may be omitted."""
        keys.setdefault("label_noise", 0.0)
        for cell in self.cells:
            if (metric is None or cell.metric == metric) and all(
                same_value(keys.get(k), v) for k, v in cell.keys.items()
            ):
                return cell.values.get(optimizer)
        raise KeyError(f"Table {self.id} has no cell {keys}")


def same_value(ours: Any, paper: Any) -> bool:
    """Equality that treats 200 and 200.0 (epochs) and 0.2 and 0.20000001 (label noise) as the same."""
    if isinstance(ours, (int, float)) and isinstance(paper, (int, float)) and not isinstance(ours, bool):
        return math.isclose(ours, paper, rel_tol=1e-9, abs_tol=1e-9)
    return ours == paper


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__})") from exc


def load_paper_tables(path: str | os.PathLike | None = None) -> dict[int, PaperTable]:
    """Read a tables file (default: the packaged tables.yaml) into {table id: PaperTable}."""
    path = Path(path) if path is not None else TABLES_FILE
    document = _read_yaml(path, "the paper's tables")
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
            values = {o: parse_paper_value(raw[o], path) if raw.get(o) is not None else None for o in optimizers}
            metric = raw.get("metric", spec.get("metric", "test_error"))
            cells.append(PaperCell(int(table_id), order, cell_keys, metric, values, raw.get("note")))
        tables[int(table_id)] = PaperTable(
            int(table_id), spec["title"], spec["unit"], keys, optimizers, tuple(cells), tuple(spec.get("notes", ()))
        )
    return tables


@functools.cache
def paper_tables() -> Mapping[int, PaperTable]:
    """The packaged tables, read once per process (the objects are frozen; do not change the dict)."""
    return load_paper_tables()


def paper_table(table_id: int | str) -> PaperTable:
    """Table `table_id` of the paper (1-5)."""
    tables = paper_tables()
    if str(table_id).isdigit() and int(table_id) in tables:
        return tables[int(table_id)]
    raise ConfigError(f"Table {table_id}: the paper's tables are {', '.join(map(str, sorted(tables)))}")


def load_hyperparameters(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Read a hyperparameters file (default: the packaged one) into {cell id: resolved settings + overrides}."""
    path = Path(path) if path is not None else HYPERPARAMETERS_FILE
    document = _read_yaml(path, "the resolved hyperparameters")
    if not isinstance(document, Mapping) or not isinstance(document.get("cells"), Mapping):
        raise DataError(f"{path}: no `cells` mapping (regenerate it: python scripts/write_hyperparameters.py)")
    return {str(cell): dict(values) for cell, values in document["cells"].items()}


@functools.cache
def hyperparameters() -> Mapping[str, Mapping[str, Any]]:
    """The packaged resolved hyperparameters, read once per process: {cell id: settings}, e.g.
    `hyperparameters()["table1/wrn28_10_200ep/cifar10/basic/sam"]["lr"]` (do not change the dicts)."""
    return load_hyperparameters()


# ----------------------------------------------------------------------------------------------------------------
# A run's cell and the paper's value for it
# ----------------------------------------------------------------------------------------------------------------


def config_value(config: Mapping[str, Any], dotted_key: str, default: Any = None) -> Any:
    """Look up `a.b.c` in a nested mapping (a dict or an OmegaConf DictConfig); `default` when any part is missing."""
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def normalise_epochs(epochs: float) -> int | float:
    """An int when whole (200.0 -> 200), else rounded to 4 decimals."""
    return int(round(epochs)) if math.isclose(epochs, round(epochs)) else round(epochs, 4)


def run_epochs(config: Mapping[str, Any]) -> int | float | None:
    """Planned epochs of a run (trainer.epochs x trainer.epoch_scale), an int when whole."""
    epochs = config_value(config, "trainer.epochs")
    if epochs is None:
        return None
    return normalise_epochs(float(epochs) * float(config_value(config, "trainer.epoch_scale", 1.0) or 1.0))


def run_cell(config: Mapping[str, Any]) -> dict[str, Any]:
    """The table cell a run's config belongs to: {dataset, model, augment, epochs, label_noise, train_subset}."""
    cell = {name: config_value(config, source) for name, source in CELL_SOURCES.items()}
    cell["label_noise"] = float(cell["label_noise"] or 0.0)
    cell["epochs"] = run_epochs(config)
    return {name: cell[name] for name in CELL_KEYS}


def run_group(config: Mapping[str, Any]) -> str:
    """The W&B group of a run: its table cell, so SGD and SAM runs to compare (and their seeds) share it.
    `logger.group` when set; else the experiment preset, dataset, model, augment, label noise (when > 0), training
    subset (when set) and epochs: `table1/wrn28_10_200ep/cifar10/wrn28_10/basic/200ep`."""
    explicit = config_value(config, "logger.group")
    if explicit:
        return str(explicit)
    cell = run_cell(config)
    parts = [
        str(config_value(config, "experiment") or "default"),
        *(str(cell[k]) for k in ("dataset", "model", "augment")),
    ]
    if cell["label_noise"]:
        parts.append(f"noise{cell['label_noise']:g}")
    if cell["train_subset"] is not None:
        parts.append(f"subset{cell['train_subset']}")
    if cell["epochs"] is not None:
        parts.append(f"{cell['epochs']}ep")
    return "/".join(parts)


def as_error(value: PaperValue, table_id: int) -> float:
    """A printed value as a test error in percent (Table 4 prints accuracy)."""
    return 100.0 - value.value if paper_table(table_id).unit == "accuracy" else value.value


def table_of_experiment(experiment: str | None) -> int | None:
    """The table a preset belongs to: `table1/wrn28_10_200ep` -> 1; None for other presets (demo, cpu_scale)."""
    match = _EXPERIMENT_TABLE.match(str(experiment or ""))
    return int(match["id"]) if match else None


def home_table(
    cell: Mapping[str, Any], tables: Mapping[int, PaperTable] | None = None, only: int | None = None
) -> PaperTable | None:
    """The paper table a cell belongs to: the first of `tables` (default: the paper's) that has the cell's dataset
    and model (and label noise, for Table 4); with `only`, that table or none."""
    tables = tables if tables is not None else paper_tables()
    candidates = [only] if only is not None else sorted(tables)
    return next((tables[t] for t in candidates if t in tables and tables[t].contains(cell)), None)


def paper_cell(config: Mapping[str, Any], metric: str = "test_error") -> PaperCell | None:
    """The paper's cell that a run (its resolved config) reproduces, or None when the paper has no such cell.

    A preset of the paper (`experiment=table4/...`) is looked up in its own table; any other run in the first table
    with its dataset and model, as sam-tables places it."""
    cell = run_cell(config)
    preset = table_of_experiment(config_value(config, "experiment"))
    table = home_table(cell, only=preset if preset in paper_tables() else None)
    return table.match(cell, metric) if table is not None else None


def paper_value(
    config: Mapping[str, Any], optimizer: str | None = None, metric: str = "test_error"
) -> PaperValue | None:
    """The paper's value for a run: its cell (`paper_cell`) and its optimizer (`optimizer.name` unless given).

    In the unit of the paper's table (`paper_table(cell.table).unit`: Table 4 is accuracy, the others error).
    None when the paper has no such cell or prints no value for that optimizer."""
    cell = paper_cell(config, metric)
    if cell is None:
        return None
    name = optimizer if optimizer is not None else str(config_value(config, "optimizer.name", ""))
    return cell.values.get(name)


# ----------------------------------------------------------------------------------------------------------------
# The paper's value for a run started from a preset, also when it deviates from it
# ----------------------------------------------------------------------------------------------------------------

# The settings a preset's cell fixes (hyperparameters.yaml's fields) -> where a run's config holds them.
_SETTING_SOURCES = {
    "model": "model.name",
    "lr": "optimizer.lr",
    "momentum": "optimizer.momentum",
    "nesterov": "optimizer.nesterov",
    "weight_decay": "optimizer.weight_decay",
    "rho": "optimizer.rho",
    "schedule": "schedule.name",
    "warmup_epochs": "schedule.warmup_epochs",
    "epochs": "trainer.epochs",
    "batch_size": "trainer.batch_size",
    "m": "trainer.m",
    "grad_clip": "trainer.grad_clip",
    "label_smoothing": "trainer.label_smoothing",
}
# What shortens or shrinks a run without being a setting of the cell: any of these set means another setting.
_SHORTENED = {"trainer.epoch_scale": 1.0, "trainer.max_steps": None, "dataset.train_subset": None}


@dataclass(frozen=True)
class PresetValue:
    """The paper's number for the cell of the preset a run started from (`paper_value_of_preset`)."""

    preset: str  # the cell id in hyperparameters.yaml, e.g. "table1/wrn28_10_200ep/cifar10/basic/sam"
    cell: PaperCell
    value: PaperValue
    same_setting: bool  # the run trains exactly the preset's cell: its settings, full length, full data

    @property
    def error(self) -> float:
        """The published value as a test error in percent (Table 4 prints accuracy)."""
        return as_error(self.value, self.cell.table)


def _preset_candidates(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The preset cells a run's experiment, dataset, augment, optimizer and label noise pick out."""
    experiment = f"experiment={config_value(config, 'experiment')}"
    wanted = {
        "dataset": config_value(config, "dataset.name"),
        "augment": config_value(config, "augment.name"),
        "optimizer": config_value(config, "optimizer.name"),
        "label_noise": float(config_value(config, "dataset.label_noise", 0.0) or 0.0),
    }
    return [
        (cell_id, settings)
        for cell_id, settings in hyperparameters().items()
        if experiment in settings["overrides"] and all(same_value(wanted[k], settings[k]) for k in wanted)
    ]


def paper_value_of_preset(config: Mapping[str, Any], metric: str = "test_error") -> PresetValue | None:
    """The published value of the cell whose preset a run started from (`experiment=tableN/...` with that cell's
    dataset, augment, optimizer and label noise), also when the run deviates from the preset (fewer epochs, a
    training subset, another model or lr): `same_setting` says whether it does not. None for a run from no paper
    preset, or when the preset has several cells the run could be (Table 2's epochs, overridden)."""
    table_id = table_of_experiment(config_value(config, "experiment"))
    if table_id not in paper_tables():
        return None
    candidates = _preset_candidates(config)
    if len(candidates) > 1:  # Table 2: the epochs are the cell's axis; take the one the run names
        candidates = [c for c in candidates if same_value(config_value(config, "trainer.epochs"), c[1]["epochs"])]
    if len(candidates) != 1:
        return None
    preset, settings = candidates[0]
    keys = {k: settings[k] for k in ("dataset", "model", "augment", "epochs", "label_noise")}
    cell = paper_table(table_id).match({**keys, "train_subset": None}, metric)
    value = cell.values.get(settings["optimizer"]) if cell is not None else None
    if value is None:
        return None
    same = all(
        same_value(config_value(config, source), settings[name]) for name, source in _SETTING_SOURCES.items()
    ) and all(same_value(config_value(config, key, default), default) for key, default in _SHORTENED.items())
    same = same and config_value(config, "dataset.test_subset") is None
    return PresetValue(preset, cell, value, same)
