"""`sam-train` (also `python -m sam_repro.train`): compose the config with Hydra and train one run.

    sam-train experiment=demo optimizer=sam                  # one run
    sam-train -m experiment=demo optimizer=sgd,sam seed=0,1  # a sweep (each job in its own derived run dir)
    sam-train experiment=table1/wrn28_10_200ep --cfg job --resolve   # print the resolved config

Bad values and unknown keys stop before any work with one line naming the key (`error: trainer.epochs must be
>= 1 (got 0)`; the rules are `sam_repro.engine.config.RULES`), and a start with a configuration other than the
one its run directory was started with stops with one line per changed key (`sam_repro.engine.rundir`); a new run
directory is then removed again. In a multirun, a job that fails that way is recorded as failed and the sweep goes
on.

Hydra's own record of a run (`.hydra/`) is written here, after those checks (`hydra.output_subdir` is null in the
root config), so a refused start leaves the run directory as it was.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from sam_repro.engine.config import resolve_config, validate_config
from sam_repro.engine.distributed import read_launch_env
from sam_repro.engine.provenance import redact
from sam_repro.engine.rundir import (
    ABSENT,
    CONFIG_FILE,
    LOCK_FILE,
    Change,
    RunDirLock,
    config_changes,
    identity_error,
    override_key,
    read_recorded_config,
    register_resolvers,
)
from sam_repro.errors import ConfigError, SamReproError
from sam_repro.files import atomic_write_text
from sam_repro.run_keys import flatten, matches

log = logging.getLogger("sam_repro")
HYDRA_RECORD = ".hydra"


def _rank() -> int:
    """This process's rank, read the way `init_distributed` will read it (torchrun's variables, else an srun
    step's), before Hydra starts: a SLURM batch script is one process, whatever SLURM_NTASKS says."""
    try:
        return read_launch_env().rank
    except ConfigError:
        return 0  # init_distributed raises the same error inside the app, which reports it in one line


def resolved_config(cfg: DictConfig) -> DictConfig:
    """The composed config with every interpolation resolved (what the run trains with and records) and credentials
    redacted (`engine.provenance.redact`). An interpolation that cannot be resolved is a ConfigError naming the key
    (`engine.config.resolve_config`: `dataset.label_noise must be set ...` for a preset's required value)."""
    resolved = OmegaConf.create(redact(resolve_config(cfg)))
    OmegaConf.set_struct(resolved, True)
    return resolved


def check_run_identity(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[Change]:
    """The changes against the configuration `run_dir` was started with: a ConfigError listing them, or (with
    `trainer.resume=force`) the list, which the trainer records in summary.json. Empty for a new directory."""
    recorded = read_recorded_config(run_dir)
    if recorded is None:
        return []
    current = OmegaConf.to_container(cfg)  # already resolved and redacted, as the record was written

    def defaults(keys: list[str]) -> dict:
        """The absent keys' values when the command line does not set them."""
        kept = [o for o in overrides if not matches(override_key(o), keys)]
        try:
            default_cfg = hydra.compose(config_name="train", overrides=kept)
            with open_dict(default_cfg):
                default_cfg.experiment = cfg.get("experiment")
            flat = flatten(redact(OmegaConf.to_container(default_cfg, resolve=True)))
        except Exception as exc:  # noqa: BLE001 -- without defaults the record is taken to predate the keys
            log.warning("could not compose the defaults of %s (%s); taking their current values", keys, exc)
            return {k: v for k, v in flatten(current).items() if k in keys}
        return {k: flat.get(k, ABSENT) for k in keys}

    changes = config_changes(recorded, current, defaults)
    if changes and cfg.trainer.get("resume", "auto") != "force":
        raise ConfigError(identity_error(run_dir, changes))
    for change in changes:
        log.warning("trainer.resume=force: %s", change.describe(run_dir))
    return changes


def _write_hydra_record(hc, task_cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra writes into `<run_dir>/.hydra/` itself when `hydra.output_subdir` is set."""
    record = {
        "config.yaml": OmegaConf.to_container(task_cfg),
        "hydra.yaml": {"hydra": OmegaConf.to_container(hc)},
        "overrides.yaml": list(hc.overrides.task),
    }
    for name, content in record.items():
        text = OmegaConf.to_yaml(OmegaConf.create(redact(content)))
        atomic_write_text(run_dir / HYDRA_RECORD / name, text)


def _remove_new_run_dir(run_dir: Path, run_root: Path) -> None:
    """A start refused before any output: remove what logging created (train.log) and the empty parents below
    the runs root, so bad input leaves no run directory behind."""
    if (run_dir / CONFIG_FILE).exists() or not run_dir.is_dir():
        return
    if any(p.name not in ("train.log", HYDRA_RECORD, LOCK_FILE) for p in run_dir.iterdir()):
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_root = run_root.resolve()
    parent = run_dir.resolve().parent
    while parent != run_root and run_root in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _app(cfg: DictConfig) -> float | None:
    from sam_repro.engine.trainer import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    new_run = not (run_dir / CONFIG_FILE).exists()
    task_cfg = cfg.copy()
    with open_dict(cfg):
        cfg.experiment = hc.runtime.choices.get("experiment")
    try:
        # Rank 0 holds the run directory while it trains (the other ranks of a job share it).
        with RunDirLock(run_dir) if _rank() == 0 else contextlib.nullcontext() as lock:
            cfg = resolved_config(cfg)
            validate_config(cfg)  # types, ranges and unknown keys, before the run directory is compared
            forced = check_run_identity(cfg, run_dir, list(hc.overrides.task))
            if _rank() == 0:
                lock.claim()
                if hc.output_subdir is None:
                    _write_hydra_record(hc, task_cfg, run_dir)
            summary = train(cfg, run_dir, forced=[c.as_record() for c in forced])
    except SamReproError as exc:
        log.error("error: %s", exc)
        if new_run and _rank() == 0:
            _remove_new_run_dir(run_dir, Path(str(OmegaConf.select(cfg, "run_root", default="runs"))))
        if hc.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
    return summary.get("test_error")


def main() -> None:
    register_resolvers()
    if _rank() != 0:
        # Only rank 0 logs INFO lines; the others report warnings and errors only.
        sys.argv += ["hydra/job_logging=sam_worker"]
    _app()


if __name__ == "__main__":
    main()
