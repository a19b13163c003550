"""The local SLURM test cluster (scripts/slurm/local_cluster.sh): is it up, and how jobs are submitted to it."""

from __future__ import annotations

import shutil
import subprocess

from helpers.environ import clean_environ


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: SLURM is not installed (bash scripts/slurm/local_cluster.sh up installs and starts it)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running? (bash scripts/slurm/local_cluster.sh up)"
    if states.returncode != 0:
        return f"SLURM cluster is down ({states.stderr.strip()}): bash scripts/slurm/local_cluster.sh up"
    if not {"idle", "mixed", "allocated"} & set(states.stdout.split()):
        return f"no SLURM node is up (states: {states.stdout.split()}): bash scripts/slurm/local_cluster.sh up"
    return None


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment: no launcher variables that the job would inherit through --export=ALL."""
    return clean_environ() | {"OMP_NUM_THREADS": "1"} | extra


def scontrol_job(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)
