"""Run directories: derived from what defines an experiment, not from the time, and only ever continued with the
configuration they were started with.

`runs/<experiment>/<overrides that change the experiment>/seed<seed>`: re-running the same command finds the same
directory (and resumes or reports it), a multirun job lands where the equivalent single run would, and a SLURM
requeue comes back to its own checkpoint. Overrides of keys that change nothing (`sam_repro.run_keys`) are left out
of the name; an explicit `hydra.run.dir=...` always wins. The runs root is `$SAM_RUNS_DIR`, else `runs`. `run_dir`
derives the same path outside Hydra, for the scripts, the demo and (`python -m sam_repro.engine.rundir`) the shell
scripts.

The files in a run directory are named in one place, `RunFiles`: every reader and writer of a run directory (the
trainer, sam-train, the loggers, the analyses, the acceptance run, the scripts) takes its paths from there.

Run identity: the directory's `config.yaml` records the configuration that defines its training. Every start
compares the composed configuration with it (`config_changes`) and, on any difference in a training key, stops
before any work unless `trainer.resume=force` (recorded in summary.json). A key that the record lacks (a run
written before the key existed) is compared with the value the key takes when the command line does not set it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sam_repro.run_keys import IDENTITY_NEUTRAL, RUN_NAME_NEUTRAL, flatten, matches

MAX_NAME = 180
RUNS_DIR_ENV = "SAM_RUNS_DIR"  # read by the root config's `run_root` too
DEFAULT_RUNS_ROOT = "runs"
DEFAULT_SEED = 0  # the root config's `seed`
log = logging.getLogger("sam_repro")


@dataclass(frozen=True)
class RunFiles:
    """The layout of one run directory: `RunFiles(run_dir).summary` is `<run_dir>/summary.json`, and so on. The
    names (class attributes) are for code that matches files rather than opening one (`find_run_dirs`)."""

    root: Path

    CONFIG: ClassVar[str] = "config.yaml"  # the resolved configuration the run trains with (its identity)
    SUMMARY: ClassVar[str] = "summary.json"  # status, final numbers, errors, provenance
    METRICS: ClassVar[str] = "metrics.jsonl"  # one row per epoch
    STEPS: ClassVar[str] = "steps.jsonl"  # a row every logger.log_every_steps optimizer steps
    CHECKPOINTS: ClassVar[str] = "checkpoints"  # the folder of the checkpoint
    CHECKPOINT: ClassVar[str] = "last.pt"  # the one checkpoint, in CHECKPOINTS
    LOG: ClassVar[str] = "train.log"  # written by Hydra's logging (configs/hydra/job_logging/sam.yaml names it too)
    HYDRA_RECORD: ClassVar[str] = ".hydra"  # Hydra's record of the run, written by sam-train
    LOCK: ClassVar[str] = ".lock"  # `RunDirLock`'s file
    ANALYSIS: ClassVar[str] = "analysis"  # sam-analyze's default output folder

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunFiles:
        """The run directory a checkpoint lies in as `<run>/checkpoints/<file>` (for any file: its grandparent)."""
        return cls(Path(checkpoint).parent.parent)

    @classmethod
    def in_checkpoints(cls, path: str | os.PathLike) -> bool:
        """Whether `path` lies in a folder named as a run's checkpoint folder."""
        return Path(path).parent.name == cls.CHECKPOINTS

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def steps(self) -> Path:
        return self.root / self.STEPS

    @property
    def checkpoint(self) -> Path:
        return self.root / self.CHECKPOINTS / self.CHECKPOINT

    @property
    def train_log(self) -> Path:
        return self.root / self.LOG

    @property
    def hydra_record(self) -> Path:
        return self.root / self.HYDRA_RECORD

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def analysis(self) -> Path:
        return self.root / self.ANALYSIS


def override_key(override: str) -> str:
    """`+trainer.m=32` -> `trainer.m`; `~logger` -> `logger`."""
    return override.split("=", 1)[0].lstrip("+~")


def run_name(experiment: str | None, overrides: Sequence[str] | None) -> str:
    """`<experiment or default>/<sorted relevant overrides joined by ','>` (or `.../base` when there are none)."""
    from sam_repro.engine.provenance import redact

    last = {
        override_key(o): redact(o.lstrip("+"))
        for o in (overrides or [])
        if not matches(override_key(o), RUN_NAME_NEUTRAL)
    }  # the last value wins
    kept = sorted(last.values())
    tail = ",".join(kept).replace("/", "_") or "base"
    if len(tail) > MAX_NAME:
        digest = hashlib.sha1(tail.encode()).hexdigest()[:10]
        tail = f"{tail[: MAX_NAME - 11]}_{digest}"
    return f"{experiment or 'default'}/{tail}"


def _last_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the last override of `key` sets (`seed=1`, `+seed=1`), as Hydra applies them; None if none does."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) == key and not o.startswith("~")]
    return values[-1] if values else None


def runs_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where runs live: `$SAM_RUNS_DIR`, else `runs` (the root config's `run_root`). A relative root is relative to
    the directory sam-train is started in."""
    env = os.environ if environ is None else environ
    return Path(env.get(RUNS_DIR_ENV) or DEFAULT_RUNS_ROOT)


def run_path(overrides: Sequence[str], experiment: str | None = None) -> Path:
    """`<run_name>/seed<seed>`: where `sam-train [experiment=<experiment>] <overrides>` trains, below the runs root.
    The experiment is `experiment`, else the last `experiment=` override; the seed the last `seed=` override, else
    the root config's 0 (no preset sets one)."""
    overrides = list(overrides)
    experiment = experiment or _last_value(overrides, "experiment")
    return Path(run_name(experiment, overrides)) / f"seed{_last_value(overrides, 'seed') or DEFAULT_SEED}"


def run_dir(
    overrides: Sequence[str],
    experiment: str | None = None,
    *,
    root: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The run directory of `sam-train [experiment=<experiment>] <overrides>`, derived as the root config derives
    it (`hydra.run.dir`): `<runs root>/<run_name>/seed<seed>`. The runs root is `root`, else a `run_root=` override,
    else `runs_root()` ($SAM_RUNS_DIR, else runs); an explicit `hydra.run.dir=` override wins, as it does for
    sam-train. Relative paths are relative to the directory sam-train is started in. The one way the scripts, the
    demo and the cluster scripts name a run's directory (`python -m sam_repro.engine.rundir` for shell scripts)."""
    overrides = list(overrides)
    explicit = _last_value(overrides, "hydra.run.dir")
    if explicit is not None:
        return Path(explicit)
    base = root if root is not None else _last_value(overrides, "run_root")
    return Path(base if base is not None else runs_root(environ)) / run_path(overrides, experiment)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sam_run_name"):
        OmegaConf.register_new_resolver("sam_run_name", lambda exp, overrides: run_name(exp, list(overrides or [])))


# ----------------------------------------------------------------------------------------------------------------
# Run identity

ABSENT = object()


@dataclass(frozen=True)
class Change:
    key: str
    recorded: Any  # ABSENT: the record has no such key
    current: Any

    def describe(self, run_dir: Path | str) -> str:
        recorded = "absent" if self.recorded is ABSENT else _show(self.recorded)
        current = "absent" if self.current is ABSENT else _show(self.current)
        return f"{self.key}: {recorded} in {run_dir}, {current} now"

    def as_record(self) -> dict:
        return {
            "key": self.key,
            "recorded": None if self.recorded is ABSENT else self.recorded,
            "current": None if self.current is ABSENT else self.current,
        }


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _same(a: Any, b: Any) -> bool:
    # YAML writes 5e-4 as 0.0005 and reads 200 back as an int either way; compare numbers by value, not type.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def config_changes(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    default_of: Callable[[list[str]], Mapping[str, Any]] | None = None,
) -> list[Change]:
    """The training keys whose value differs between a run's recorded configuration and the current one.

    Keys of IDENTITY_NEUTRAL are left out. A key the record lacks is compared with its default, which
    `default_of(keys)` returns for all such keys at once (`{key: value}`; without it, with the current value, i.e. the
    record is taken to predate the key). A key the current configuration lacks no longer exists, so it cannot train
    differently, and is left out too.
    """
    old = {k: v for k, v in flatten(recorded).items() if not matches(k, IDENTITY_NEUTRAL)}
    new = {k: v for k, v in flatten(current).items() if not matches(k, IDENTITY_NEUTRAL)}
    changes = [Change(k, old[k], new[k]) for k in sorted(new) if k in old and not _same(old[k], new[k])]
    absent = sorted(k for k in new if k not in old)
    if absent and default_of is not None:
        defaults = default_of(absent)
        changes += [Change(k, ABSENT, new[k]) for k in absent if not _same(defaults.get(k, ABSENT), new[k])]
    return sorted(changes, key=lambda c: c.key)


def read_recorded_config(run_dir: Path) -> dict | None:
    """The configuration recorded in `run_dir` (None for a new directory)."""
    import yaml

    from sam_repro.errors import ConfigError

    path = RunFiles(run_dir).config
    if not path.exists():
        return None
    try:
        recorded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path} is not readable YAML ({str(exc).splitlines()[0]}); restore it, or train in another directory"
        ) from None
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path} holds no configuration; restore it, or train in another directory")
    return recorded


def identity_error(run_dir: Path, changes: Sequence[Change]) -> str:
    lines = [
        f"{run_dir} was started with another configuration:",
        *(f"  {c.describe(run_dir)}" for c in changes),
        "Train in another directory (hydra.run.dir=..., or another SAM_RUNS_DIR), or pass trainer.resume=force "
        "to continue this run with the new values (recorded in its summary.json).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# One process per run directory


class RunDirLock:
    """Holds `<run_dir>/.lock` (an flock, released by the kernel however the process ends, kill -9 included) while
    a run trains there: a second sam-train on the same directory (a job submitted twice, a sweep point started by
    hand) stops with one line instead of both writing the same checkpoint and metrics. `claim()` then writes who
    holds it (called once the start is accepted, so a refused start leaves the file as it was). File systems
    without flock (some network mounts) get a warning and no lock."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.handle = None

    def __enter__(self) -> RunDirLock:
        from sam_repro.errors import ConfigError

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.handle = open(RunFiles(self.run_dir).lock, "a+")  # noqa: SIM115 -- held until __exit__
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another sam-train"
            self.handle.close()
            raise ConfigError(
                f"{self.run_dir} is in use by {holder}: wait for that run to end (or stop it) before starting it again"
            ) from None
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: no flock on this file system
            log.warning("cannot lock %s (%s); make sure no other sam-train uses this directory", self.run_dir, exc)
        return self

    def claim(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"sam-train pid {os.getpid()} on {os.uname().nodename}\n")
        self.handle.flush()

    def __exit__(self, *exc_info) -> None:
        self.handle.close()  # closing the descriptor releases the flock


# ----------------------------------------------------------------------------------------------------------------
# For shell scripts


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sam_repro.engine.rundir [--root] OVERRIDES...`: print the run directory sam-train would use for
    those overrides (`run_dir`); with `--root`, only the runs root."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sam_repro.engine.rundir",
        description="Print the run directory sam-train derives from these Hydra overrides (SAM_RUNS_DIR respected).",
    )
    parser.add_argument("--root", action="store_true", help="print only the runs root ($SAM_RUNS_DIR, else runs)")
    parser.add_argument("overrides", nargs="*", help="the overrides sam-train is given (experiment=... seed=...)")
    args = parser.parse_args(argv)
    print(runs_root() if args.root else run_dir(args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
