"""Optimizers: SAM and its variants (parameters and gradients only), learning-rate schedules, and the factory
that builds them from plain arguments (`create_optimizer`, `create_schedule`) or from the `optimizer` / `schedule`
config groups."""

from sam_repro.optim.sam import SAM

__all__ = ["SAM"]
