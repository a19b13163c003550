"""Errors that reach the user as one clear line (no traceback): they name the key or file and what to do."""


class SamReproError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with `exit_code` (2)."""

    exit_code = 2


class ConfigError(SamReproError, ValueError):
    """An invalid configuration value. The message names the key, e.g. `optimizer.rho must be >= 0 (got -1)`."""


class DataError(SamReproError, RuntimeError):
    """Missing, unreachable or corrupt data. The message names the file and says how to fix it."""


class CheckpointError(SamReproError, RuntimeError):
    """A checkpoint that cannot be loaded. The message names the file."""


class RankLost(SamReproError, RuntimeError):
    """Another rank of the process group died or stopped answering (it never joined, or a collective timed out).
    The message names that rank. Exit status 75 (EX_TEMPFAIL, "try again"): a launcher that restarts
    (`torchrun --max-restarts`, `scripts/slurm/train.sbatch`) resumes the run from its checkpoint."""

    exit_code = 75

    def __init__(self, message: str, waited_for: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.waited_for = waited_for  # the ranks this one waited for (none known: the store itself went away)
        self.reported = False  # printed already (by the trainer, before the launcher's SIGTERM could cut it off)
