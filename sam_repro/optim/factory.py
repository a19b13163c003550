"""Build the optimizer and the learning-rate schedule: plain-argument functions, and thin adapters that read them
from the `optimizer` and `schedule` config groups (timm's split).

    opt = create_optimizer(model, "sam", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, rho=0.05)
    sched = create_schedule(opt, "cosine", total_steps=7800)

`create_optimizer`, `create_schedule` (and `sam_schedule.sam_schedule`) take what they build from and check their
own arguments, as the optimizers' constructors check theirs. `build_optimizer`, `build_schedule` and
`build_sam_schedule` take the config groups the trainer has: they only read keys and call those, since the values
are checked before any work by the config schema (`engine.config.RULES`, `validate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from sam_repro.optim.sam import SAM, WEIGHT_DECAY_MODES
from sam_repro.optim.sam_schedule import SamSchedule, sam_schedule

BASE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
SAM_FAMILY = ("sam", "asam", "looksam", "gsam", "msam")
OPTIMIZERS = ("sgd", *SAM_FAMILY)
SCHEDULES = ("cosine", "constant")


def is_sam(cfg_opt) -> bool:
    return cfg_opt.name in SAM_FAMILY


def param_groups(model: torch.nn.Module, adaptive: bool) -> list[dict]:
    """One group, or for ASAM two: tensors named `weight` get the adaptive scaling, biases do not (ASAM's code)."""
    if not adaptive:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] == "weight"]
    others = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] != "weight"]
    return [{"params": weights, "adaptive": True}, {"params": others, "adaptive": False}]


def _choice(argument: str, value: Any, choices: Iterable[str]) -> None:
    if value not in tuple(choices):
        raise ValueError(f"{argument} must be one of {', '.join(choices)} (got {value!r})")


# ----------------------------------------------------------------------------------------------------------------
# Plain arguments


def create_optimizer(
    model_or_params: torch.nn.Module | Iterable,
    name: str,
    lr: float,
    *,
    base: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.0,
    p: float = 2,
    k: int | None = None,
    alpha: float | None = None,
    rho_max: float | None = None,
    rho_min: float | None = None,
    lr_min: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `name` (sgd, or one of SAM_FAMILY: asam is sam with `adaptive=True`) around the torch
    optimizer `base` (sgd: `momentum`, `nesterov`; adamw: `betas`), peak learning rate `lr`.

    `model_or_params`: a model (its trainable parameters; with `adaptive`, weights and biases in separate groups,
    `param_groups`) or parameters / parameter groups, used as given. `weight_decay_mode="l2"` puts weight decay in
    the gradient (the groups' `l2_weight_decay`, added by the engine's step), "base_optimizer" hands it to the torch
    optimizer. SAM family: `rho`, `adaptive`, `eta`, `p`; LookSAM `k`, `alpha`; GSAM `rho_max`, `rho_min`, `alpha`,
    `lr_min`. An option left None takes the optimizer's own default; the options of other optimizers are not used.
    """
    _choice("name", name, OPTIMIZERS)
    _choice("base", base, BASE_OPTIMIZERS)
    _choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
    base_cls = BASE_OPTIMIZERS[base]
    base_kwargs: dict[str, Any] = (
        dict(lr=lr, momentum=momentum, nesterov=nesterov) if base == "sgd" else dict(lr=lr, betas=tuple(betas))
    )
    if isinstance(model_or_params, torch.nn.Module):
        groups = param_groups(model_or_params, adaptive=adaptive)
    else:
        groups = list(model_or_params)
    if name == "sgd":
        l2 = weight_decay_mode == "l2"  # l2: the engine adds wd*w to the gradient before clipping (official code)
        opt = base_cls(groups, weight_decay=0.0 if l2 else weight_decay, **base_kwargs)
        for g in opt.param_groups:
            g["l2_weight_decay"] = weight_decay if l2 else 0.0
        return opt
    common: dict[str, Any] = dict(
        adaptive=adaptive, eta=eta, p=p, weight_decay=weight_decay, weight_decay_mode=weight_decay_mode
    )
    if name == "msam":
        from sam_repro.optim.msam import MSAM  # refuses adaptive and p other than 2 itself

        return MSAM(groups, base_cls, rho=rho, **common, **base_kwargs)
    if name == "gsam":
        from sam_repro.optim.gsam import GSAM

        # rho_t follows the learning rate from rho_max (at lr) down to rho_min (at lr_min)
        options = _given(rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_min=lr_min)
        return GSAM(groups, base_cls, lr_max=float(lr), **options, **common, **base_kwargs)
    if name == "looksam":
        from sam_repro.optim.looksam import LookSAM

        return LookSAM(groups, base_cls, **_given(k=k, alpha=alpha), rho=rho, **common, **base_kwargs)
    return SAM(groups, base_cls, rho=rho, **common, **base_kwargs)


def _given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None)."""
    return {key: value for key, value in options.items() if value is not None}


def lr_factor(step: int, name: str, warmup_steps: int, total_steps: int, floor: float) -> float:
    """The multiplier of the peak learning rate at `step`: linear warm-up over `warmup_steps`, then constant or a
    cosine from 1 down to `floor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def create_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule as a LambdaLR multiplier of the peak lr (`lr_factor`): linear warm-up, then cosine
    (down to `min_lr` at `total_steps`) or constant."""
    _choice("name", name, SCHEDULES)
    peak = optimizer.param_groups[0]["lr"]
    floor = float(min_lr) / peak if peak else 0.0
    # Schedule the optimizer that actually steps (SAM's base optimizer shares its param groups with SAM). A lambda:
    # LambdaLR's state_dict leaves functions out (a callable object's attributes would go into every checkpoint).
    return torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "base_optimizer", optimizer),
        lambda step: lr_factor(step, name, warmup_steps, total_steps, floor),
    )


# ----------------------------------------------------------------------------------------------------------------
# From the config groups (values checked by engine.config before any work)


def build_optimizer(cfg_opt, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`create_optimizer` from the `optimizer` config group."""
    options: dict[str, Any] = {}
    if cfg_opt.name in SAM_FAMILY and cfg_opt.name != "msam":
        options = dict(adaptive=bool(cfg_opt.adaptive), eta=float(cfg_opt.eta), p=float(cfg_opt.p))
    if cfg_opt.name == "looksam":
        options.update(k=int(cfg_opt.k), alpha=float(cfg_opt.alpha))
    if cfg_opt.name == "gsam":
        options.update(alpha=float(cfg_opt.alpha), rho_max=float(cfg_opt.rho_max), rho_min=float(cfg_opt.rho_min))
        options.update(lr_min=float(cfg_opt.lr_min))
    if cfg_opt.name in SAM_FAMILY:
        options.update(rho=float(cfg_opt.rho))
    if cfg_opt.base == "sgd":
        options.update(momentum=cfg_opt.momentum, nesterov=bool(cfg_opt.nesterov))
    else:
        options.update(betas=tuple(cfg_opt.get("betas", (0.9, 0.999))))
    return create_optimizer(
        model,
        cfg_opt.name,
        cfg_opt.lr,
        base=cfg_opt.base,
        weight_decay=float(cfg_opt.weight_decay),
        weight_decay_mode=str(cfg_opt.weight_decay_mode),
        **options,
    )


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
    """`create_schedule` from the `schedule` config group (`warmup_epochs` in epochs of `steps_per_epoch`)."""
    warmup = int(round(float(cfg_sched.warmup_epochs) * steps_per_epoch))
    return create_schedule(optimizer, cfg_sched.name, total_steps, warmup, float(cfg_sched.min_lr))
