"""Errors that reach the user as one clear line (no traceback): they name the key or file and what to do."""


class SamReproError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with status 2."""


class ConfigError(SamReproError, ValueError):
    """An invalid configuration value. The message names the key, e.g. `optimizer.rho must be >= 0 (got -1)`."""


class DataError(SamReproError, RuntimeError):
    """Missing, unreachable or corrupt data. The message names the file and says how to fix it."""


class CheckpointError(SamReproError, RuntimeError):
    """A checkpoint that cannot be loaded. The message names the file."""
