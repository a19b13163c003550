"""Environments for the processes tests start: without any launcher's variables (so that a test behaves the same
inside a SLURM job or under torchrun), and as a user's shell on a node has it (nothing pointing at this checkout)."""

from __future__ import annotations

import os

# torchrun's rank variables and the requeue mode (SLURM's own all start with SLURM_).
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SAM_REQUEUE")
# What points a Python at this checkout, this virtual environment or this machine's package sources.
CHECKOUT_VARS = (
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PIP_FIND_LINKS",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_CONSTRAINT",
)


def is_launch_var(name: str) -> bool:
    """A variable a launcher sets: SLURM's (`SLURM_*`, and `SBATCH_*` that sbatch reads), torchrun's, the requeue
    mode."""
    return name.startswith(("SLURM_", "SBATCH_")) or name in LAUNCH_VARS


def clean_environ() -> dict[str, str]:
    """os.environ without any launcher's variables: the processes a test starts are the only ranks they know of."""
    return {k: v for k, v in os.environ.items() if not is_launch_var(k)}


def drop_launch_vars(monkeypatch) -> None:
    """No SLURM job, no launcher in this process's environment (through `monkeypatch`, put back after the test)."""
    for name in list(os.environ):
        if is_launch_var(name):
            monkeypatch.delenv(name)


def node_shell_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell on a node, plus `extra`: nothing pointing at this checkout, this virtual
    environment or this machine's package sources."""
    return {**{k: v for k, v in os.environ.items() if k not in CHECKOUT_VARS}, **extra}
