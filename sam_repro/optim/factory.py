"""Build the optimizer and the learning-rate schedule from the `optimizer` and `schedule` config groups."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sam_repro.errors import ConfigError
from sam_repro.optim.sam import SAM
from sam_repro.optim.sam_schedule import SamSchedule, sam_schedule

BASE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
SAM_FAMILY = ("sam", "asam", "looksam", "gsam", "msam")


def is_sam(cfg_opt) -> bool:
    return cfg_opt.name in SAM_FAMILY


def _base_kwargs(cfg_opt) -> dict:
    if cfg_opt.base == "sgd":
        return dict(lr=cfg_opt.lr, momentum=cfg_opt.momentum, nesterov=bool(cfg_opt.nesterov))
    if cfg_opt.base == "adamw":
        return dict(lr=cfg_opt.lr, betas=tuple(cfg_opt.get("betas", (0.9, 0.999))))
    raise ConfigError(f"optimizer.base must be one of {sorted(BASE_OPTIMIZERS)} (got {cfg_opt.base!r})")


def param_groups(model: torch.nn.Module, adaptive: bool) -> list[dict]:
    """One group, or for ASAM two: tensors named `weight` get the adaptive scaling, biases do not (ASAM's code)."""
    if not adaptive:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] == "weight"]
    others = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] != "weight"]
    return [{"params": weights, "adaptive": True}, {"params": others, "adaptive": False}]


def build_optimizer(cfg_opt, model: torch.nn.Module) -> torch.optim.Optimizer:
    kwargs = _base_kwargs(cfg_opt)  # refuses an unknown optimizer.base
    base = BASE_OPTIMIZERS[cfg_opt.base]
    wd, mode = float(cfg_opt.weight_decay), str(cfg_opt.weight_decay_mode)
    if mode not in ("l2", "base_optimizer"):
        raise ConfigError(f"optimizer.weight_decay_mode must be l2 or base_optimizer (got {mode!r})")
    if cfg_opt.name == "sgd":
        groups = param_groups(model, adaptive=False)
        if mode == "l2":
            # The engine adds wd*w to the gradient before clipping (official: L2 term in the loss).
            opt = base(groups, weight_decay=0.0, **kwargs)
            for g in opt.param_groups:
                g["l2_weight_decay"] = wd
            return opt
        opt = base(groups, weight_decay=wd, **kwargs)
        for g in opt.param_groups:
            g["l2_weight_decay"] = 0.0
        return opt
    if not is_sam(cfg_opt):
        raise ConfigError(f"optimizer.name must be sgd or one of {SAM_FAMILY} (got {cfg_opt.name!r})")
    if cfg_opt.name == "msam":
        from sam_repro.optim.msam import MSAM

        groups = param_groups(model, adaptive=False)
        return MSAM(groups, base, rho=float(cfg_opt.rho), weight_decay=wd, weight_decay_mode=mode, **kwargs)
    common: dict[str, Any] = dict(
        rho=float(cfg_opt.rho),
        adaptive=bool(cfg_opt.adaptive),
        eta=float(cfg_opt.eta),
        p=math.inf if str(cfg_opt.p) in ("inf", "infinity") else float(cfg_opt.p),
        weight_decay=wd,
        weight_decay_mode=mode,
    )
    groups = param_groups(model, adaptive=bool(cfg_opt.adaptive))
    if cfg_opt.name == "gsam":
        from sam_repro.optim.gsam import GSAM

        del common["rho"]  # rho_t follows the learning rate between rho_min and rho_max
        bounds = dict(rho_max=float(cfg_opt.rho_max), rho_min=float(cfg_opt.rho_min), alpha=float(cfg_opt.alpha))
        lr_range = dict(lr_max=float(cfg_opt.lr), lr_min=float(cfg_opt.lr_min))
        return GSAM(groups, base, **bounds, **lr_range, **common, **kwargs)
    if cfg_opt.name == "looksam":
        from sam_repro.optim.looksam import LookSAM

        return LookSAM(groups, base, k=int(cfg_opt.k), alpha=float(cfg_opt.alpha), **common, **kwargs)
    return SAM(groups, base, **common, **kwargs)


def build_sam_schedule(cfg_opt, steps_per_epoch: int, seed: int) -> SamSchedule | None:
    """Which steps of a SAM-family run are SAM steps (`optimizer.sam_start`, `sam_every`, `sam_probability`;
    sam_repro/optim/sam_schedule.py); None for plain optimizers."""
    if not is_sam(cfg_opt):
        return None
    return sam_schedule(
        cfg_opt.get("sam_start", 0),
        cfg_opt.get("sam_every", 1),
        cfg_opt.get("sam_probability", 1.0),
        steps_per_epoch,
        seed,
    )


def build_schedule(
    cfg_sched, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule as a LambdaLR multiplier of the peak lr: linear warmup, then cosine or constant."""
    warmup = int(round(float(cfg_sched.warmup_epochs) * steps_per_epoch))
    peak = optimizer.param_groups[0]["lr"]
    floor = float(cfg_sched.min_lr) / peak if peak else 0.0
    name = cfg_sched.name
    if name not in ("cosine", "constant"):
        raise ConfigError(f"schedule.name must be cosine or constant (got {name!r})")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # Schedule the optimizer that actually steps (SAM's base optimizer shares its param groups with SAM).
    return torch.optim.lr_scheduler.LambdaLR(getattr(optimizer, "base_optimizer", optimizer), factor)
