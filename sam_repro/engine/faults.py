"""Test-only fault injection, read from the environment in one place (`read_faults`): never part of a run's
configuration, so it changes no run's identity, name or config.yaml.

    SAM_REPRO_FAULT=nonfinite_at_step=N[,nonfinite_rank=R]

makes the training loss non-finite at optimizer step N (1-based: the step that brings the count to N), on rank R
alone or, without `nonfinite_rank`, on every rank, as if the network had diverged there. The run stops at its next
check of the loss (every `trainer.log_every` steps, and at the epoch's end) with status failed, exit status 2, and
its last good checkpoint kept. tests/test_ddp.py and scripts/soak.py use it; the trainer warns when it is set.

Unset or empty: no fault. A value that cannot be read is a ConfigError in one line naming SAM_REPRO_FAULT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sam_repro.errors import ConfigError

FAULT_ENV = "SAM_REPRO_FAULT"
FAULT_FORMAT = "nonfinite_at_step=N[,nonfinite_rank=R]"


@dataclass(frozen=True)
class Faults:
    """The faults a run injects (none by default)."""

    nonfinite_at_step: int | None = None
    nonfinite_rank: int | None = None  # None: on every rank

    def nonfinite(self, step: int, rank: int) -> bool:
        """Whether the training loss of optimizer step `step` (1-based) on `rank` is made non-finite."""
        return step == self.nonfinite_at_step and self.nonfinite_rank in (None, rank)

    def describe(self) -> str:
        where = "every rank" if self.nonfinite_rank is None else f"rank {self.nonfinite_rank}"
        return f"the training loss is made non-finite at step {self.nonfinite_at_step} on {where}"

    def __bool__(self) -> bool:
        return self.nonfinite_at_step is not None


def read_faults(world_size: int = 1, environ: Mapping[str, str] | None = None) -> Faults:
    """The faults SAM_REPRO_FAULT asks for, in a run of `world_size` ranks."""
    value = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
    if not value:
        return Faults()
    fields: dict[str, int] = {}
    for item in value.split(","):
        name, eq, number = (part.strip() for part in item.partition("="))
        if not eq or name not in ("nonfinite_at_step", "nonfinite_rank"):
            raise ConfigError(f"{FAULT_ENV}={value!r}: expected {FAULT_FORMAT}")
        try:
            fields[name] = int(number)
        except ValueError:
            raise ConfigError(f"{FAULT_ENV}: {name} must be an integer (got {number!r})") from None
    step, rank = fields.get("nonfinite_at_step"), fields.get("nonfinite_rank")
    if step is None:
        raise ConfigError(f"{FAULT_ENV}={value!r}: expected {FAULT_FORMAT}")
    if step < 1:
        raise ConfigError(f"{FAULT_ENV}: nonfinite_at_step must be >= 1 (got {step})")
    if rank is not None and not 0 <= rank < world_size:
        raise ConfigError(f"{FAULT_ENV}: nonfinite_rank ({rank}) must be a rank below {world_size}")
    return Faults(step, rank)
