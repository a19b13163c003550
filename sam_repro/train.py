"""`sam-train` (also `python -m sam_repro.train`): compose the config with Hydra and train one run.

    sam-train experiment=demo optimizer=sam                  # one run
    sam-train -m experiment=demo optimizer=sgd,sam seed=0,1  # a sweep (each job in its own derived run dir)
    sam-train experiment=table1/wrn28_10_200ep --cfg job --resolve   # print the resolved config

Bad values stop before any work with one line naming the key (`error: trainer.epochs must be >= 1 (got 0)`).
In a multirun, a job that fails that way is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from sam_repro.engine.distributed import read_launch_env
from sam_repro.engine.rundir import register_resolvers
from sam_repro.errors import ConfigError, SamReproError

log = logging.getLogger("sam_repro")


def _rank() -> int:
    """This process's rank, read the way `init_distributed` will read it (torchrun's variables, else an srun
    step's), before Hydra starts: a SLURM batch script is one process, whatever SLURM_NTASKS says."""
    try:
        return read_launch_env().rank
    except ConfigError:
        return 0  # init_distributed raises the same error inside the app, which reports it in one line


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _app(cfg: DictConfig) -> float | None:
    from sam_repro.engine.trainer import train

    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.experiment = hc.runtime.choices.get("experiment")
    try:
        summary = train(cfg, Path(hc.runtime.output_dir))
    except SamReproError as exc:
        log.error("error: %s", exc)
        if hc.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
    return summary.get("test_error")


def main() -> None:
    register_resolvers()
    if _rank() != 0:
        # Only rank 0 writes Hydra's files and logs INFO lines; the others report warnings and errors only.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=sam_worker"]
    _app()


if __name__ == "__main__":
    main()
