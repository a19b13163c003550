"""What the speed benchmarks (benchmarks/sam_overhead.py, compile_speedup.py) share: the step variants they time,
their device and thread options, and the one synthetic batch every variant steps on.

A variant is (make_optimizer(params), step, group size): the optimizer on the paper's recipe (Nesterov SGD, L2
weight decay, the same hyperparameters for all), the engine's step function for it, and the examples per SAM
perturbation and BatchNorm group (`StepContext.group_size`: the batch, or 32 for m-sharpness and ghost BatchNorm).
"""

from __future__ import annotations

import argparse

import torch

from sam_repro.engine.backends import keep_freed_memory
from sam_repro.engine.distributed import resolve_device
from sam_repro.engine.step import looksam_step, msam_step, sam_step, sgd_step, step_function
from sam_repro.optim.factory import create_optimizer
from sam_repro.optim.gsam import GSAM
from sam_repro.optim.looksam import LookSAM
from sam_repro.optim.msam import MSAM
from sam_repro.optim.sam import SAM
from sam_repro.optim.sam_schedule import SamSchedule

HYPER = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def variants(batch: int) -> dict:
    """name -> (make_optimizer(params), step, group size) for SGD (with BatchNorm groups of 32 too), SAM (m = the
    batch, m = 32), LookSAM (k = 5), ASAM, GSAM, Momentum-SAM, SAM every 2nd step and random SAM (p = 0.5)."""
    kw = HYPER
    return {
        "sgd": (lambda params: create_optimizer(params, "sgd", **kw), sgd_step, batch),
        "sgd_m32": (lambda params: create_optimizer(params, "sgd", **kw), sgd_step, 32),
        "sam": (lambda params: SAM(params, torch.optim.SGD, rho=0.05, **kw), sam_step, batch),
        "sam_m32": (lambda params: SAM(params, torch.optim.SGD, rho=0.05, **kw), sam_step, 32),
        "looksam_k5": (lambda params: LookSAM(params, torch.optim.SGD, rho=0.05, k=5, **kw), looksam_step, batch),
        "asam": (lambda params: SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **kw), sam_step, batch),
        "gsam": (
            lambda params: GSAM(params, torch.optim.SGD, rho_max=0.05, rho_min=0.0, alpha=0.01, **kw),
            sam_step,
            batch,
        ),
        "msam": (lambda params: MSAM(params, torch.optim.SGD, rho=3.0, **kw), msam_step, batch),
        "sam_every2": (lambda params: SAM(params, torch.optim.SGD, rho=0.05, **kw), _scheduled(every=2), batch),
        "sam_p0.5": (lambda params: SAM(params, torch.optim.SGD, rho=0.05, **kw), _scheduled(probability=0.5), batch),
    }


def _scheduled(**schedule):
    return step_function("sam", SamSchedule(**schedule))


def device_and_thread_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def synthetic_batch(args: argparse.Namespace) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """Sets the threads, resolves the device, and draws the one batch every variant steps on (seed 0): `args` has
    `threads`, `device` (`device_and_thread_options`) and `batch`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does: a step does not fault in again what the last one freed
    device = resolve_device(args.device, option="--device")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return device, x, y
