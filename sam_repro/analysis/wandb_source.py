"""Runs read from a W&B project through the public API, as `RunRecord`s like the ones read from disk.

Only `wandb.Api().runs(path)` is used, and of each run only its id, state, config and summary: the config is the
resolved Hydra config the trainer logs at `wandb.init`, the summary holds the last logged `test_error` (and
`test_error_top5`), which is the final one. When the summary carries the trainer's own `status` it wins; otherwise
the W&B state is translated (a "crashed" run is as unfinished as a "failed" one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sam_repro.analysis.runs import RunRecord, settled_status
from sam_repro.errors import ConfigError, DataError

# W&B run states -> the statuses of summary.json.
STATES = {
    "finished": "finished",
    "failed": "failed",
    "crashed": "failed",
    "killed": "interrupted",
    "running": "running",
    "pending": "running",
}


def _unflatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """Accept configs logged nested or flattened ("optimizer.rho" / "optimizer/rho" keys): always nested."""
    nested: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            value = _unflatten(value)
        parts = str(key).replace("/", ".").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return nested


def _summary(run: Any) -> dict[str, Any]:
    summary = getattr(run, "summary_metrics", None)
    if summary is None:
        summary = getattr(run, "summary", {}) or {}
    return {str(k): v for k, v in dict(summary).items() if not str(k).startswith("_")}


def record_from_api_run(run: Any, path: str) -> RunRecord:
    """One public-API run as a RunRecord named `wandb:<entity>/<project>/<id>`."""
    config = _unflatten({k: v for k, v in dict(run.config).items() if not str(k).startswith("_")})
    summary = _summary(run)
    state = str(getattr(run, "state", "unknown")).lower()
    status = str(summary.get("status") or STATES.get(state, state))
    reason = summary.get("reason") or (None if status == "finished" else f"W&B state: {state}")
    status, reason = settled_status(config, summary, status, reason)
    return RunRecord(f"wandb:{path}/{run.id}", config, summary, status, reason)


def load_wandb_runs(path: str, api: Any = None) -> list[RunRecord]:
    """All runs of the W&B project `path` ("entity/project"), sorted by source."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise ConfigError(f"--wandb {path}: expected ENTITY/PROJECT")
    try:
        if api is None:
            import wandb

            api = wandb.Api()  # raises without credentials
        runs = [record_from_api_run(run, path) for run in api.runs(path)]
    except Exception as exc:  # the client raises its own types (CommError, ValueError, HTTPError) for one cause
        cause = f"{type(exc).__name__}: {exc}"
        raise DataError(f"--wandb {path}: cannot read the project through the W&B API ({cause})") from exc
    return sorted(runs, key=lambda r: r.source)
