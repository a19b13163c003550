"""Finished and unfinished training runs, read back from the directories `sam-train` writes.

A run directory holds `config.yaml` (the resolved config), `summary.json` (status and final numbers) and
`metrics.jsonl` (one object per epoch). This module finds such directories under any number of roots (single runs,
multirun sweeps, nested folders), reads them into `RunRecord`s and leaves every judgement (which runs to average,
how to group them) to `grouping.py` and `aggregate.py`. A run whose summary is missing is kept with status
"no-summary" so that it can be listed; a summary or config that exists but cannot be parsed is a DataError, because
silently skipping it would drop a seed from a mean.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sam_repro.engine.rundir import RunFiles
from sam_repro.errors import DataError
from sam_repro.paper import config_value, run_epochs

FINISHED = "finished"
STOPPED = "stopped"  # the trainer's status of a run that trainer.max_steps stopped short of its schedule
NO_SUMMARY = "no-summary"
STOPPED_EARLY = "stopped-early"


@dataclass(frozen=True)
class RunRecord:
    """One training run: where it came from, its resolved config and its summary.

    source: the run directory as found (posix, relative to the root given on the command line) or
    `wandb:<entity>/<project>/<run id>`; it names the run in every listing.
    """

    source: str
    config: Mapping[str, Any]
    summary: Mapping[str, Any]
    status: str
    reason: str | None = None
    directory: Path | None = field(default=None, compare=False)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return int(seed) if seed is not None else None

    def value(self, dotted_key: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. `run.value("optimizer.rho")`."""
        return config_value(self.config, dotted_key, default)


def settled_status(config: Mapping[str, Any], summary: Mapping[str, Any], status: str, reason: str | None):
    """(status, reason) of a run as the tables count it: a "finished" run that stopped short of its schedule
    (`trainer.max_steps`, which the trainer records as `stopped_early`, or fewer epochs than planned) is
    STOPPED_EARLY, never averaged with runs that trained their whole schedule; so is a run the trainer recorded as
    "stopped" (what it writes since it tells such a stop from a finished run)."""
    if status not in (FINISHED, STOPPED):
        return status, reason
    planned = run_epochs(config)
    planned = max(1, math.ceil(planned)) if planned is not None else None
    epochs = summary.get("epochs")
    max_steps = config_value(config, "trainer.max_steps")
    if summary.get("stopped_early"):
        trained = f" after {epochs} of {planned} epochs" if epochs is not None and planned is not None else ""
        cause = f"stopped by trainer.max_steps={max_steps}" if max_steps else "stopped early"
        return STOPPED_EARLY, f"{cause}{trained}, short of its schedule"
    if isinstance(epochs, int) and planned is not None and epochs < planned:
        cause = f"trainer.max_steps={max_steps}" if max_steps else "a stop"
        return STOPPED_EARLY, f"stopped by {cause} after {epochs} of {planned} epochs, short of its schedule"
    return status, reason


def find_run_dirs(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory at or below `roots`, sorted, each once.

    A run directory is one holding `config.yaml`. Hidden folders (Hydra's `.hydra/`, which also holds a
    config.yaml) are skipped, and the search does not descend into a run directory (its `checkpoints/` and
    `wandb/` folders hold no runs).
    """
    found: dict[Path, Path] = {}
    for root in roots:
        root_path = Path(os.path.normpath(root))
        if not root_path.is_dir():
            raise DataError(f"{root}: no such directory (pass run directories or folders that contain them)")
        for current, subdirs, files in os.walk(root_path):
            if RunFiles.CONFIG in files:
                found.setdefault(Path(current).resolve(), Path(current))
                subdirs.clear()
            else:
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found.values(), key=lambda p: p.as_posix())


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read the run config ({type(exc).__name__}); fix or remove the run") from exc
    if not isinstance(config, Mapping):
        raise DataError(f"{path}: the run config is not a mapping; fix or remove the run")
    return config


def _read_summary(path: Path) -> Mapping[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable summary ({exc}); fix or remove the run") from exc
    if not isinstance(summary, Mapping) or "status" not in summary:
        raise DataError(f"{path}: unreadable summary (no `status` field); fix or remove the run")
    return summary


def load_run(directory: Path) -> RunRecord:
    """Read one run directory. A missing summary.json gives status "no-summary" (the run never wrote one)."""
    files = RunFiles(directory)
    config = _read_yaml(files.config)
    summary_path = files.summary
    if not summary_path.exists():
        return RunRecord(directory.as_posix(), config, {}, NO_SUMMARY, "no summary.json", directory)
    summary = _read_summary(summary_path)
    status, reason = settled_status(config, summary, str(summary["status"]), summary.get("reason"))
    return RunRecord(directory.as_posix(), config, summary, status, reason, directory)


def load_runs(roots: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """All runs under `roots`, sorted by source. Raises DataError when there are none."""
    roots = list(roots)
    directories = find_run_dirs(roots)
    if not directories:
        shown = " ".join(str(r) for r in roots)
        raise DataError(f"no runs found under {shown} (a run directory holds {RunFiles.CONFIG} and {RunFiles.SUMMARY})")
    return [load_run(d) for d in directories]


def load_metrics(directory: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl ([] when absent).

    A run killed while writing leaves a truncated last line; it is dropped rather than failing the whole report.
    A corrupt line anywhere else is a DataError.
    """
    path = RunFiles(directory).metrics
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if index == len(lines) - 1:
                break
            raise DataError(f"{path}:{index + 1}: not JSON ({exc.msg}); fix or remove the line") from exc
    return records
