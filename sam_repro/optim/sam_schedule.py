"""Which optimizer steps are SAM steps: one mechanism for SAM's start and for its cheaper schedules.

A SAM-family optimizer (SAM, ASAM, LookSAM, ...) takes, at every step, either its SAM step (two forward-backward
passes: the ascent to w + eps and the gradient there) or the base optimizer's plain step (one forward-backward, the
cost of SGD). `SamSchedule` says which, from the step index alone:

    SAM at step t  <=>  t >= start  and  (t - start) % every == 0  and  u(seed, t) < probability

  * `start` (`optimizer.sam_start`, given in epochs): plain steps before it, an SGD warm start. Park et al. (arXiv
    2509.21818) find that "a short initial SGD warm-start before enabling SAM mitigates" SAM's early stall near
    saddles and plateaus (Kim et al., arXiv 2301.06308: saddles become attractors of SAM when rho > -1/lambda_1).
    A start late in training is late-phase SAM (Zhou et al., ICLR 2025, arXiv 2410.10373: SAM only in the last
    epochs matches full SAM at a fraction of its cost).
  * `every` (`optimizer.sam_every`): from the start on, SAM every k-th step and plain steps between (Composer's
    `interval`).
  * `probability` (`optimizer.sam_probability`): each of those steps is SAM with probability p (randomized SAM,
    RST: arXiv 2203.09962). u(seed, t) is a uniform number keyed by (seed, step) alone, not drawn from a running
    generator: every rank draws the same, and a resumed run replays the same draws with no state to save.

The defaults (start 0, every 1, probability 1) make every step a SAM step: the paper's Algorithm 1, unchanged.
Plain steps keep the base optimizer's state (momentum) running, so SAM continues from where they left it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_STREAM = b"sam-schedule"  # keeps these draws apart from any other use of the run's seed


@dataclass(frozen=True)
class SamSchedule:
    start: int = 0  # first step that may be a SAM step
    every: int = 1
    probability: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be >= 0 (got {self.start})")
        if self.every < 1:
            raise ValueError(f"every must be >= 1 (got {self.every})")
        if not 0 < self.probability <= 1:
            raise ValueError(f"probability must be in (0, 1] (got {self.probability})")

    @property
    def always(self) -> bool:
        """Every step is a SAM step (the paper's SAM)."""
        return self.start == 0 and self.every == 1 and self.probability >= 1

    def is_sam_step(self, step: int) -> bool:
        if step < self.start or (step - self.start) % self.every:
            return False
        return self.probability >= 1 or uniform(self.seed, step) < self.probability


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) that depends on (seed, step) only: 64 bits of a BLAKE2b hash."""
    digest = hashlib.blake2b(b"%d:%d" % (seed, step), digest_size=8, person=_STREAM[:16]).digest()
    return int.from_bytes(digest, "little") / 2**64


def sam_schedule(start_epochs: float, every: int, probability: float, steps_per_epoch: int, seed: int) -> SamSchedule:
    """The schedule of a run: `start_epochs` (fractional allowed) in steps, rounded to the nearest step."""
    return SamSchedule(
        start=int(round(float(start_epochs) * steps_per_epoch)),
        every=int(every),
        probability=float(probability),
        seed=int(seed),
    )
