"""Run directories derived from what defines an experiment, not from the time.

`runs/<experiment>/<overrides that change the experiment>/seed<seed>`: re-running the same command finds the same
directory (and resumes or reports it), a multirun job lands where the equivalent single run would, and a SLURM
requeue comes back to its own checkpoint. Overrides that do not change the result (logging, Hydra, display,
placement) are left out; an explicit `hydra.run.dir=...` always wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# Override keys (or prefixes ending in '.') that do not change what is trained.
IGNORED_KEYS = (
    "logger.", "logger", "hydra.", "hydra", "seed", "experiment", "run_root",
    "dataset.root", "trainer.progress", "trainer.log_every", "trainer.device", "trainer.threads",
    "trainer.eval_batch_size", "trainer.on_corrupt_checkpoint", "trainer.eval_every",
)
MAX_NAME = 180


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def run_name(experiment: str | None, overrides: Sequence[str] | None) -> str:
    """`<experiment or default>/<sorted relevant overrides joined by ','>` (or `.../base` when there are none)."""
    last = {_key(o): o.lstrip("+") for o in (overrides or []) if not _ignored(_key(o))}  # the last value wins
    kept = sorted(last.values())
    tail = ",".join(kept).replace("/", "_") or "base"
    if len(tail) > MAX_NAME:
        digest = hashlib.sha1(tail.encode()).hexdigest()[:10]
        tail = f"{tail[:MAX_NAME - 11]}_{digest}"
    return f"{experiment or 'default'}/{tail}"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sam_run_name"):
        OmegaConf.register_new_resolver("sam_run_name", lambda exp, overrides: run_name(exp, list(overrides or [])))
