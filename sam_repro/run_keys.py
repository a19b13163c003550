"""Which configuration keys define what a run trains, in one place.

`NEUTRAL_KEYS` is the base list: keys that never change a result. They say where and how a run logs, shows
progress, evaluates, is placed and executed, and checkpoints:
  * logging, Hydra, paths: `logger` (`logger.log_every_steps` too: per-step rows change no result), `hydra`,
    `run_root`, `dataset.root`;
  * console: `trainer.progress`, `trainer.log_every` (also the steps between checks for a non-finite loss: a
    failing run stops a few steps earlier or later, with the same last good checkpoint);
  * how long a rank waits for another before it gives up: `trainer.dist_timeout_s`;
  * evaluation: `trainer.eval_batch_size` and `trainer.eval_every` (evaluation never touches the training state;
    `best_test_error` is the minimum over the epochs that were evaluated);
  * placement and execution: `trainer.device`, `trainer.threads`, `trainer.compile`, `trainer.channels_last`,
    `trainer.deterministic`. They change floating-point rounding at most (as another GPU model does), not the
    experiment: a run may resume compiled after starting eager, or on another device. (`trainer.tf32` is not
    among them: like `trainer.precision` it sets how precisely every matmul and convolution is computed);
  * the checkpoint policy and resume: `trainer.on_corrupt_checkpoint`, `trainer.resume`;
  * retired keys (`RETIRED_KEYS`): keys the config no longer has, which run directories written before their
    removal still record: `trainer.inject_nonfinite_at_step`, `trainer.inject_nonfinite_rank` (the fault tests'
    hooks, now the SAM_REPRO_FAULT environment variable, sam_repro/engine/faults.py). Such a run resumes, and is
    averaged with runs that lack them, as if they were absent;
  * warnings: `trainer.stall_epochs` (when SAM's stall at the chance plateau is reported; it never changes training).

Every other key is a training key. Each use adds named keys to the base list:
  * `RUN_NAME_NEUTRAL`: the derived run-directory name also leaves out `seed` and `experiment` (they are in the path);
  * `IDENTITY_NEUTRAL`: the check that a run directory is continued with its own configuration compares everything
    else, `seed`, `experiment` and `dataset.noise_seed` included;
  * `TABLE_NEUTRAL`: `sam-tables` averages runs over seeds, so it also ignores `seed`, `experiment`, labels such as
    `trainer.name`, and `dataset.noise_seed`;
  * `DUPLICATE_NEUTRAL`: two runs are the same run, however they were spelled (`debug=tiny` and
    `debug=tiny optimizer=sgd`), when everything else agrees: the labels `experiment` and `trainer.name` are left out.
A key matches an entry when it equals it or lies below it (`logger` covers `logger.mode`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

RETIRED_KEYS = ("trainer.inject_nonfinite_at_step", "trainer.inject_nonfinite_rank")
_RETIRED_BY = {
    "trainer.inject_nonfinite_at_step": "SAM_REPRO_FAULT=nonfinite_at_step=N",
    "trainer.inject_nonfinite_rank": "SAM_REPRO_FAULT=nonfinite_at_step=N,nonfinite_rank=R",
}


def retired_key_message(key: str) -> str | None:
    """The error for a retired key set on the command line: what replaced it (None for any other key)."""
    if key not in _RETIRED_BY:
        return None
    return f"{key} was retired: set the environment variable {_RETIRED_BY[key]} instead (sam_repro/engine/faults.py)"


NEUTRAL_KEYS = (
    "logger",
    "hydra",
    "run_root",
    "dataset.root",
    "trainer.progress",
    "trainer.log_every",
    "trainer.dist_timeout_s",
    "trainer.eval_batch_size",
    "trainer.eval_every",
    "trainer.device",
    "trainer.threads",
    "trainer.compile",
    "trainer.channels_last",
    "trainer.deterministic",
    "trainer.on_corrupt_checkpoint",
    "trainer.resume",
    "trainer.stall_epochs",
    *RETIRED_KEYS,
)
RUN_NAME_NEUTRAL = NEUTRAL_KEYS + ("seed", "experiment")
IDENTITY_NEUTRAL = NEUTRAL_KEYS
TABLE_NEUTRAL = NEUTRAL_KEYS + ("seed", "experiment", "trainer.name", "dataset.noise_seed")
DUPLICATE_NEUTRAL = NEUTRAL_KEYS + ("experiment", "trainer.name")


def matches(key: str, keys: Iterable[str]) -> bool:
    """`key` equals one of `keys` or lies below one (`logger.mode` is below `logger`)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (they are compared whole); an empty mapping is a value."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
