"""`sam-train` (also `python -m sam_repro.train`): compose the config with Hydra and train one run.

    sam-train experiment=demo optimizer=sam                  # one run
    sam-train -m experiment=demo optimizer=sgd,sam seed=0,1  # a sweep (each job in its own derived run dir)
    sam-train experiment=table1/wrn28_10_200ep --cfg job --resolve   # print the resolved config

The command line is checked before Hydra composes it (`sam_repro.engine.overrides`): an option or key that does
not exist, or a key of another option of its group (`optimizer.rho` with `optimizer=sgd`), stops with one line.
The composed config is resolved and checked once, here (`checked_config`), before the run directory is looked at:
bad values, unknown keys and constraints between keys or with the machine stop before any work with one line
naming the key (`error: trainer.epochs must be >= 1 (got 0)`; the rules are `sam_repro.engine.config.RULES`); the
trainer checks nothing again. A start with a configuration other than the one its run directory was started with
stops with one line per changed key (`sam_repro.engine.rundir`); a new run directory is then removed again. In a
multirun, a job that fails is recorded as failed and the sweep goes on; the sweep ends with a tally and exits 1
when any job failed. Every run ends with one line: its status, final and best test error, epochs and directory.
Exit codes: 0 done, 1 a sweep with failed jobs (or an unexpected error), 2 a refused command or a failed run.

Hydra's own record of a run (`.hydra/`) is written here, after those checks (`hydra.output_subdir` is null in the
root config), so a refused start leaves the run directory as it was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from sam_repro.engine.config import check_relations, check_schema, resolve_config
from sam_repro.engine.distributed import read_launch_env, resolve_device
from sam_repro.engine.overrides import check_overrides, config_groups, shown_options
from sam_repro.engine.provenance import redact
from sam_repro.engine.rundir import (
    ABSENT,
    Change,
    RunDirLock,
    RunFiles,
    config_changes,
    identity_error,
    override_key,
    read_recorded_config,
    register_resolvers,
)
from sam_repro.errors import ConfigError, DataError, SamReproError
from sam_repro.files import atomic_write_text
from sam_repro.run_keys import flatten, matches

log = logging.getLogger("sam_repro")
_JOBS: list[dict] = []  # this process's jobs of a multirun, for the tally at its end
_SWEEPING = False  # True in the process that `main` started; False in a job a launcher runs elsewhere (submitit)


class SweepJobFailed(Exception):
    """How a sweep job that runs in its own process (submitit's launchers) tells the sweeping process it failed:
    Hydra records it as the job's FAILED JobReturn, and `job_from_return` reads it back for the tally."""

    def __init__(self, run_dir: str, error: str) -> None:
        super().__init__(run_dir, error)
        self.run_dir, self.error = run_dir, error

    def __str__(self) -> str:
        return f"{self.run_dir}: {self.error}"


class JobResult(float):
    """A sweep job's return value when it runs in its own process: its test error (what a sweeper reads; NaN if
    none) carrying the job's record (status, run directory) for the sweeping process's tally."""

    job: dict

    def __new__(cls, value: float | None, job: dict) -> JobResult:
        result = super().__new__(cls, float("nan") if value is None else value)
        result.job = job
        return result

    def __reduce__(self):
        return (JobResult, (float(self), self.job))


def job_from_return(ret) -> dict:
    """The tally's record of one job a launcher ran in another process, from the `hydra.core.utils.JobReturn` it
    returned (submitit's launchers return one per job they waited on)."""
    from hydra.core.utils import JobStatus

    value = getattr(ret, "_return_value", None)
    run_dir = OmegaConf.select(ret.hydra_cfg, "runtime.output_dir", default=None) if ret.hydra_cfg else None
    run_dir = str(run_dir or ret.working_dir or "?")
    if ret.status == JobStatus.COMPLETED and isinstance(getattr(value, "job", None), dict):
        return {**value.job, "multirun": True}
    if ret.status == JobStatus.COMPLETED:
        return {"status": "finished", "run_dir": run_dir, "multirun": True}
    if isinstance(value, SweepJobFailed):
        return {"status": "failed", "run_dir": value.run_dir, "error": value.error, "multirun": True}
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    error = lines[0] if lines else (type(value).__name__ if value is not None else f"job {ret.status.name}")
    if isinstance(value, BaseException):
        error = f"{type(value).__name__}: {error}" if not isinstance(value, SamReproError) else error
    return {"status": "failed", "run_dir": run_dir, "error": error, "multirun": True}


def _tally_launches() -> None:
    """Count the jobs of hydra-submitit-launcher (hydra/launcher=slurm*, submitit_local) in the tally: its launch
    returns the jobs' JobReturns to this process, each recorded here. A failed job's JobReturn is handed on to the
    sweeper as completed, so that the sweep goes on and ends with the tally (and exit 1), as with Hydra's own
    launcher, instead of the sweeper re-raising the first failure."""
    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
    except ImportError:
        return
    if isinstance(BaseSubmititLauncher.__dict__.get("launch"), functools.partialmethod):
        return  # wrapped already
    BaseSubmititLauncher.launch = functools.partialmethod(_tallied_launch, launch=BaseSubmititLauncher.launch)


def _tallied_launch(self, job_overrides, initial_job_idx, *, launch):
    """The submitit launcher's `launch`, with every JobReturn recorded for the tally and a failed one handed on as
    completed."""
    from hydra.core.utils import JobStatus

    results = launch(self, job_overrides, initial_job_idx)
    for ret in results:
        _JOBS.append(job_from_return(ret))
        if ret.status == JobStatus.FAILED:
            ret.status, ret.return_value = JobStatus.COMPLETED, None
    return results


def _rank() -> int:
    """This process's rank, read the way `init_distributed` will read it (torchrun's variables, else an srun
    step's), before Hydra starts: a SLURM batch script is one process, whatever SLURM_NTASKS says."""
    try:
        return read_launch_env().rank
    except ConfigError:
        return 0  # init_distributed raises the same error inside the app, which reports it in one line


def checked_config(cfg: DictConfig) -> DictConfig:
    """The config a start trains with: the composed config resolved once and checked once, here at the edge,
    before the run directory is looked at; the trainer checks nothing again (`engine.config`).

    Every interpolation is resolved (`engine.config.resolve_config`; one that cannot be resolved is a ConfigError
    naming the key: `dataset.label_noise must be set ...` for a preset's required value), every leaf is checked
    against its rule (`check_schema`), credentials are redacted (`engine.provenance.redact`), and the constraints
    between keys and with this process's machine are checked (`check_relations`: the world size of its launch,
    the device `trainer.device` names here, as `init_distributed` will pick it)."""
    tree = resolve_config(cfg)
    check_schema(tree)
    resolved = OmegaConf.create(redact(tree))
    OmegaConf.set_struct(resolved, True)
    launch = read_launch_env()
    device = resolve_device(resolved.trainer.device, launch.local_rank, launch.launcher)
    check_relations(resolved, launch.world_size, device.type)
    return resolved


def check_run_identity(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[Change]:
    """The changes against the configuration `run_dir` was started with: a ConfigError listing them, or (with
    `trainer.resume=force`) the list, which the trainer records in summary.json. Empty for a new directory."""
    recorded = read_recorded_config(run_dir)
    if recorded is None:
        return []
    current = OmegaConf.to_container(cfg)  # already resolved and redacted, as the record was written
    experiment = cfg.get("experiment")
    changes = config_changes(recorded, current, lambda keys: _defaults(keys, overrides, experiment, current))
    ended = _recorded_summary(run_dir).get("status")
    if changes and ended in ("finished", "stopped"):
        # Its schedule has run out (or trainer.max_steps ended it, its last checkpoint mid-schedule): continuing it
        # would train nothing, or not the schedule it names (more epochs are another schedule, another experiment),
        # so even trainer.resume=force is refused, before anything is written.
        kept = [o for o in overrides if not matches(override_key(o), ("trainer.resume", "hydra.run.dir"))]
        what = "has finished" if ended == "finished" else "was stopped by trainer.max_steps"
        raise ConfigError(
            f"{run_dir} {what} with another configuration ({'; '.join(c.describe(run_dir) for c in changes)}); "
            f"a {ended} run is never continued, not even with trainer.resume=force. Train the new configuration "
            f"in its own directory: sam-train {' '.join(redact(kept))}"  # no credential given on the command line
        )
    if changes and cfg.trainer.get("resume", "auto") != "force":
        raise ConfigError(identity_error(run_dir, changes))
    for change in changes:
        log.warning("trainer.resume=force: %s", change.describe(run_dir))
    return changes


def _defaults(keys: list[str], overrides: list[str], experiment: str | None, current) -> dict:
    """The values `keys` (absent from a run's record) take when the command line (`overrides`) does not set them."""
    kept = [o for o in overrides if not matches(override_key(o), keys)]
    try:
        default_cfg = hydra.compose(config_name="train", overrides=kept)
        with open_dict(default_cfg):
            default_cfg.experiment = experiment
        flat = flatten(redact(OmegaConf.to_container(default_cfg, resolve=True)))
    except Exception as exc:  # noqa: BLE001 -- without defaults the record is taken to predate the keys
        log.warning("could not compose the defaults of %s (%s); taking their current values", keys, exc)
        return {k: v for k, v in flatten(current).items() if k in keys}
    return {k: flat.get(k, ABSENT) for k in keys}


def _recorded_summary(run_dir: Path) -> dict:
    """The run directory's summary.json ({} if none, or unreadable: the trainer warns about that one)."""
    try:
        return json.loads(RunFiles(run_dir).summary.read_text())
    except (OSError, ValueError):
        return {}


def _percent(value: float | None) -> str:
    return f"{value:.2f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "none"


def end_line(summary: dict, run_dir: Path, planned_epochs: int | None = None, status: str | None = None) -> str:
    """The line every run ends with: `finished: test error 84.60% (best 80.10%), 3/3 epochs, runs/.../seed0`."""
    epochs = summary.get("epochs", 0)
    of = f"/{planned_epochs}" if planned_epochs else ""
    return (
        f"{status or summary.get('status', 'unknown')}: test error {_percent(summary.get('test_error'))} "
        f"(best {_percent(summary.get('best_test_error'))}), {epochs}{of} epochs, {run_dir}"
    )


def whole_schedule_hint(summary: dict, overrides: list[str]) -> str:
    """The line after a run stopped by trainer.max_steps: why it is not finished, and the command that trains its
    whole schedule (in its own directory: a stopped run is not continued, its last checkpoint is mid-schedule)."""
    kept = [o for o in overrides if not matches(override_key(o), ("trainer.resume", "hydra.run.dir"))]
    whole = [o for o in kept if not matches(override_key(o), ("trainer.max_steps",))]
    if len(whole) == len(kept):  # trainer.max_steps came from a preset (debug=preset): lift it explicitly
        whole.append("trainer.max_steps=null")
    reason = summary.get("reason") or "stopped by trainer.max_steps"
    return (
        f"  {reason}: not a finished run (sam-tables does not average it; the same command again trains nothing). "
        f"To train the whole schedule: sam-train {' '.join(redact(whole))}"  # no credential given on the command line
    )


def _planned_epochs(cfg: DictConfig) -> int | None:
    try:
        return max(1, math.ceil(cfg.trainer.epochs * cfg.trainer.epoch_scale))
    except Exception:  # noqa: BLE001 -- a config refused before its values were checked
        return None


def _check_data_root(cfg: DictConfig) -> None:
    """A dataset root other than the default data directory must hold its prepared cache already
    (`data.sources.unprepared_root`); ImageNet is read from its folder and checked by its loader."""
    from sam_repro.data.sources import DATASETS, unprepared_root

    if cfg.dataset.name in DATASETS:
        problem = unprepared_root(cfg.dataset.name, cfg.dataset.root)
        if problem is not None:
            raise DataError(problem)


def _write_hydra_record(hc, task_cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra writes into `<run_dir>/.hydra/` itself when `hydra.output_subdir` is set."""
    record = {
        "config.yaml": OmegaConf.to_container(task_cfg),
        "hydra.yaml": {"hydra": OmegaConf.to_container(hc)},
        "overrides.yaml": list(hc.overrides.task),
    }
    for name, content in record.items():
        text = OmegaConf.to_yaml(OmegaConf.create(redact(content)))
        atomic_write_text(RunFiles(run_dir).hydra_record / name, text)


def _remove_new_run_dir(run_dir: Path, run_root: Path) -> None:
    """A start refused before any output: remove what logging created (train.log) and the empty parents below
    the runs root, so bad input leaves no run directory behind."""
    if RunFiles(run_dir).config.exists() or not run_dir.is_dir():
        return
    if any(p.name not in (RunFiles.LOG, RunFiles.HYDRA_RECORD, RunFiles.LOCK) for p in run_dir.iterdir()):
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
    new_run = not RunFiles(run_dir).config.exists()
    multirun = hc.mode == RunMode.MULTIRUN
    ended = _recorded_summary(run_dir).get("status")
    already = ended in ("finished", "stopped")  # the same command again trains nothing
    started = False  # past the checks: the run's own summary.json tells how it ended
    task_cfg = cfg.copy()
    with open_dict(cfg):
        cfg.experiment = hc.runtime.choices.get("experiment")
    try:
        # Rank 0 holds the run directory while it trains (the other ranks of a job share it).
        with RunDirLock(run_dir) if _rank() == 0 else contextlib.nullcontext() as lock:
            cfg = checked_config(cfg)  # resolved and checked once, before the run directory is compared
            _check_data_root(cfg)
            forced = check_run_identity(cfg, run_dir, list(hc.overrides.task))
            if _rank() == 0:
                lock.claim()
                if hc.output_subdir is None:
                    _write_hydra_record(hc, task_cfg, run_dir)
            started = True
            summary = train(cfg, run_dir, forced=[c.as_record() for c in forced])
    except Exception as exc:
        if not isinstance(exc, SamReproError) and not multirun:
            raise
        if isinstance(exc, SamReproError):
            if not getattr(exc, "reported", False):  # a lost rank is named by the trainer itself (RankLost)
                log.error("error: %s", exc)
        else:  # one job of a sweep: the others still run; the traceback goes to its train.log
            log.exception("error: %s: %s", type(exc).__name__, exc)
        if new_run and _rank() == 0:
            _remove_new_run_dir(run_dir, Path(str(OmegaConf.select(cfg, "run_root", default="runs"))))
        if started and RunFiles(run_dir).summary.exists() and _rank() == 0:
            log.info(end_line(_recorded_summary(run_dir), run_dir, _planned_epochs(cfg)))
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        first_line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # Hydra's "Error in call to ...:"
        _JOBS.append({"status": "failed", "run_dir": str(run_dir), "error": first_line, "multirun": multirun})
        if multirun and not _SWEEPING:  # a job in its own process: its JobReturn tells the sweeping process
            raise SweepJobFailed(str(run_dir), first_line) from None
        if multirun:
            return None
        sys.exit(getattr(exc, "exit_code", 2))
    status = f"already {ended}" if already else summary.get("status", "unknown")
    if _rank() == 0:
        log.info(end_line(summary, run_dir, _planned_epochs(cfg), status))
        if summary.get("status") == "stopped":
            log.info(whole_schedule_hint(summary, list(hc.overrides.task)))
    _JOBS.append({"status": status, "run_dir": str(run_dir), "multirun": multirun})
    if multirun and not _SWEEPING:
        return JobResult(summary.get("test_error"), {"status": status, "run_dir": str(run_dir)})
    return summary.get("test_error")


def tally(jobs: list[dict]) -> tuple[str, bool]:
    """The lines that end a sweep (how many jobs finished, were finished before, failed; each failed job's directory
    and first error line), and whether any job failed."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    order = ["finished", "already finished", "stopped", "already stopped", "failed"]
    parts = [f"{counts[s]} {s}" for s in [*order, *sorted(set(counts) - set(order))] if counts.get(s)]
    lines = [f"sweep: {len(jobs)} job(s): {', '.join(parts) or 'none'}"]
    lines += [f"  failed: {job['run_dir']}: {job['error']}" for job in jobs if job["status"] == "failed"]
    return "\n".join(lines), bool(counts.get("failed"))


def help_text() -> str:
    """`sam-train --help`: what it does, three examples, the groups with their options, where runs go."""
    groups = config_groups()
    width = max(map(len, groups))
    listing = "\n".join(f"  {g:<{width}}  {', '.join(shown_options(options))}" for g, options in groups.items())
    return f"""sam-train: train one run of SGD or SAM (or, with -m, a sweep of runs), composed from the config groups
below with Hydra. Each run trains in its own directory, resumes there when the same command is given again, and
ends with one line: its status, final and best test error, epochs and directory.

Examples:
  sam-train debug=tiny optimizer=sam                      # ResNet-8 on a CIFAR-10 subset, 3 epochs: seconds on a CPU
  sam-train experiment=table1/wrn28_10_200ep dataset=cifar100 optimizer=sam optimizer.rho=0.1   # a paper preset
  sam-train -m debug=tiny optimizer=sgd,sam seed=0,1      # a sweep: one run per combination, then a tally

Groups (group=option; a preset in a folder is written with its folder: experiment=table1/wrn28_10_200ep):
{listing}

Settings: group.key=value (trainer.epochs=10, optimizer.rho=0.1: rho is a setting of optimizer=sam, asam, looksam).
  sam-train <overrides> --cfg job --resolve   prints the composed configuration: every setting there is.

Runs go to $SAM_RUNS_DIR (else ./runs)/<experiment or default>/<the overrides that change the run>/seed<seed>.
Data: $SAM_DATA_DIR (else ~/.cache/sam_repro/data); `sam-data cifar10` prepares CIFAR-10 there.

Flags: -m/--multirun (sweep), --cfg job|hydra|all, --resolve, --info, --hydra-help,
  -sc install=bash (tab completion: eval "$(sam-train -sc install=bash)").
Exit codes: 0 done, 1 a sweep in which a job failed, 2 a refused command or a failed run. More: docs/cli.md
"""


def _complete(line: str) -> list[str] | None:
    """Tab completion of `group=...` with every option, nested presets included (Hydra offers only the top level);
    None for any other word (Hydra completes it)."""
    words = line.split()
    word = "" if not words or line.endswith(" ") else words[-1]
    prefix = word[: len(word) - len(word.lstrip("+~"))]
    key, eq, value = word[len(prefix) :].partition("=")
    groups = config_groups()
    if not eq or key not in groups:
        return None
    return [f"{prefix}{key}={o}" for o in shown_options(groups[key]) if o.startswith(value)]


def _before_hydra(argv: list[str]) -> None:
    """What sam-train answers itself before Hydra starts: --help, tab completion of group options, and the check
    of the overrides (`engine.overrides.check_overrides`: one line and exit 2 instead of Hydra's messages)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help:
        print(help_text(), end="")
        sys.exit(0)
    if args.shell_completion:
        bash = any(a in ("query=bash", "query=zsh") for a in args.overrides)  # zsh uses bash's completion
        words = _complete(os.environ.get("COMP_LINE", "")) if bash else None
        if words is not None:
            print(" ".join(words))
            sys.exit(0)
        return
    if args.hydra_help or args.info:
        return
    try:
        check_overrides(args.overrides)
    except SamReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_resolvers()
    _before_hydra(sys.argv[1:])
    if _rank() != 0:
        # Only rank 0 logs INFO lines; the others report warnings and errors only.
        sys.argv += ["hydra/job_logging=sam_worker"]
    global _SWEEPING
    _SWEEPING = True
    _JOBS.clear()
    _tally_launches()
    _app()
    if any(job["multirun"] for job in _JOBS) and _rank() == 0:
        lines, failed = tally(_JOBS)
        print(lines, flush=True)
        if failed:
            sys.exit(1)


if __name__ == "__main__":
    main()
