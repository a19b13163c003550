"""The training step in each of its variants, built as the trainer builds it (the optimizer factory, `StepContext`),
for the tests that run every variant: optimizer (SGD, SAM, LookSAM, ASAM, GSAM, Momentum-SAM, SAM every 2nd step) x
precision (fp32, bf16, fp16)."""

from __future__ import annotations

import contextlib

import torch

from sam_repro.engine.step import StepContext, looksam_step, msam_step, sam_step, sgd_step, step_function
from sam_repro.optim.factory import create_optimizer
from sam_repro.optim.sam_schedule import SamSchedule

OPTIMIZERS = ("sgd", "sam", "looksam", "asam", "gsam", "msam", "sam_every2")
PRECISIONS = ("fp32", "bf16", "fp16")
STEPS = {
    "sgd": sgd_step,
    "sam": sam_step,
    "asam": sam_step,
    "looksam": looksam_step,
    "gsam": sam_step,
    "msam": msam_step,
}
STEPS["sam_every2"] = step_function("sam", SamSchedule(every=2))  # a SAM step, then a plain one (ctx.step)


def optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The paper's recipe (Nesterov SGD, L2 weight decay) for `name`, through the project's factory; LookSAM with
    k = 2, so that a few steps take both of its kinds of step."""
    rho = {"asam": 0.5, "msam": 3.0}.get(name, 0.05)
    options = dict(k=2, alpha=0.7) if name == "looksam" else dict(rho_max=0.05, rho_min=0.0, alpha=0.01, lr_min=0.0)
    return create_optimizer(
        model,
        "sam" if name == "sam_every2" else name,
        0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        rho=rho,
        adaptive=name == "asam",
        eta=0.01 if name == "asam" else 0.0,
        **options,
    )


def context(precision: str, device: torch.device, group_size: int, grad_clip: float | None = 5.0) -> StepContext:
    """The trainer's `StepContext` for `trainer.precision=precision` (an fp16 GradScaler of its own)."""
    autocast = contextlib.nullcontext
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return StepContext(group_size=group_size, grad_clip=grad_clip, autocast=autocast, scaler=scaler, seed=0)
