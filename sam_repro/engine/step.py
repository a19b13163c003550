"""One optimizer step: plain SGD, or SAM as in the paper's Algorithm 1, over groups of m examples.

The per-rank batch is cut into groups of `m` examples ("virtual devices"). For every optimizer, BatchNorm
normalizes each group with that group's own statistics (ghost batch, as on the paper's 8 GPUs), and the running
statistics become the average of the groups' updates (the paper averages per-device statistics). SGD (and LookSAM
between its full steps) does this in one forward-backward per micro-batch (`GhostBatchNorm`: torch's batch_norm
kernel per contiguous group, the rest over the whole batch), equal to a pass per group; `ctx.micro_batch`
(`trainer.accumulate`) only cuts the batch into passes to save memory. Models that draw noise per group (dropout,
Shake-Shake, ShakeDrop) or synchronise BatchNorm across ranks keep a pass per group.

For SAM, additionally, each group gets its own perturbation (m-sharpness, paper section 4):

    for each group B_i (weight n_i / n):
        g_i    = grad L_Bi(w)                    clean pass: updates BN running stats, no all-reduce
        eps_i  = rho * g_i / ||g_i||             optimizer.first_step(grads=g_i): w <- w + eps_i
        g_s   += n_i/n * grad L_Bi(w + eps_i)    perturbed pass into .grad: same RNG draws, BN running stats frozen
        w + eps_i -> w                           optimizer.restore(): the saved copy of w, bit for bit
    average g_s over ranks (one all-reduce); optimizer.second_step(): unscale, clip, base optimizer step at w.

The clean gradient g_i is taken with torch.autograd.grad, so it never touches `.grad`, where the perturbed
gradients of the groups accumulate: no gradient is set aside and put back.

Noise: dropout, Shake-Shake and ShakeDrop draw from the global generators. Before each group's clean pass they are
seeded from (seed, step, global group index) (`StepContext.seed`, set by the trainer), and the perturbed pass
replays that state: every virtual device has its own draws, as each of the paper's devices had its own key, and a
group draws the same whether it runs inside one process or on a rank of its own, and after a resume.

Mixed precision: bf16 autocast needs nothing else. fp16 scales the loss with a GradScaler; the first pass's
gradients are unscaled inside first_step (eps is scale-free, the L2 term is not), the perturbed gradients are
unscaled once by the scaler, and the scaler updates once per step. The scale is passed as a device tensor (reading
its value would wait for the GPU). A first pass that overflows makes eps, hence the perturbed gradient,
non-finite, so the scaler skips the step and lowers the scale: no parameter changes. The one host read of an fp16
step is the scaler's: `GradScaler.step` reads found_inf to decide whether to step (sam_repro/engine/host_reads.py
says why it stays); fp32 and bf16 steps read nothing back (tests/test_host_reads.py). Whatever changes the gradient
after the backward passes (the L2 term of SGD, LookSAM's direction) does so before the scaler's overflow check.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sam_repro.data.loader import seed_from
from sam_repro.models import set_true_gradient
from sam_repro.models.shake import ShakeDrop, ShakeShake
from sam_repro.optim.sam import SAM, add_l2_gradient_
from sam_repro.optim.sam_schedule import SamSchedule

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
NOISE_STREAM = 1  # keeps the noise seeds apart from the loader's (seed, epoch[, batch]) seeds


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm and RNG helpers


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalizes with batch statistics but leaves the running statistics (and
    num_batches_tracked) untouched: the official code keeps only the clean pass's statistics."""
    changed = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


class RunningStatsAverage:
    """Makes the BatchNorm running statistics after G group passes equal the average of G independent updates
    from the same starting point, as when G devices each update their own copy and the copies are averaged."""

    def __init__(self, model: nn.Module, groups: int) -> None:
        self.modules = (
            [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats] if groups > 1 else []
        )
        self.start = [tuple(t.clone() for t in _running_stats(m)) for m in self.modules]
        self.sums = [(torch.zeros_like(mean), torch.zeros_like(var)) for mean, var, _ in self.start]
        self.count = 0

    def collect(self, groups: int = 1) -> None:
        """Call after each clean forward: bank its update (the average over `groups` groups when the pass ran
        ghost BatchNorm over that many) and reset to the starting point."""
        for m, (mean0, var0, n0), (s_mean, s_var) in zip(self.modules, self.start, self.sums):
            mean, var, count = _running_stats(m)
            s_mean.add_(mean * groups if groups > 1 else mean)
            s_var.add_(var * groups if groups > 1 else var)
            mean.copy_(mean0)
            var.copy_(var0)
            count.copy_(n0)  # every group starts from the same count (momentum=None uses it)
        self.count += groups

    def finish(self) -> None:
        for m, (_, _, n0), (s_mean, s_var) in zip(self.modules, self.start, self.sums):
            mean, var, count = _running_stats(m)
            mean.copy_(s_mean / self.count)
            var.copy_(s_var / self.count)
            count.copy_(n0 + 1)


def _running_stats(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm's running mean, variance and batch count (present: it tracks running statistics)."""
    return (
        cast(torch.Tensor, m.running_mean),
        cast(torch.Tensor, m.running_var),
        cast(torch.Tensor, m.num_batches_tracked),
    )


_BATCH_NORM_ARGS = inspect.signature(F.batch_norm)


class GhostBatchNorm(TorchFunctionMode):
    """Within: every training-mode `F.batch_norm` (what `nn.BatchNorm1d/2d/3d` call, and timm's BatchNormAct2d)
    normalizes each contiguous group of `group_size` examples with that group's own statistics, and moves the
    running statistics by the average of the groups' updates from the same start: one forward-backward over the
    batch that equals one per group under `RunningStatsAverage` (tests/test_ghost_batch_norm.py, 1e-12 in float64).

    Each group is a contiguous slice of the batch that torch's own batch_norm kernel normalizes (forward and
    backward); everything else in the model runs once over the whole batch. Batches of one group, or not a multiple
    of `group_size`, and evaluation-mode calls pass through unchanged."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        a = _BATCH_NORM_ARGS.bind(*args, **kwargs)
        a.apply_defaults()
        x = a.arguments["input"]
        n = x.shape[0]
        if not a.arguments["training"] or n <= self.group_size or n % self.group_size:
            return func(*args, **kwargs)
        return _batch_norm_per_group(n // self.group_size, **a.arguments)


def _batch_norm_per_group(groups, input, running_mean, running_var, weight, bias, training, momentum, eps):
    # Contiguous slices along the batch: no copy in, one torch.cat out (and one in the backward).
    outs, means, variances = [], [], []
    for chunk in input.chunk(groups):
        mean = None if running_mean is None else running_mean.clone()
        var = None if running_var is None else running_var.clone()
        outs.append(F.batch_norm(chunk, mean, var, weight, bias, True, momentum, eps))
        means.append(mean)
        variances.append(var)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(torch.stack(means).mean(0))
            running_var.copy_(torch.stack(variances).mean(0))
    return torch.cat(outs)


def one_pass_ghost_batch_norm(model: nn.Module) -> bool:
    """Whether groups of m can share one forward-backward in `model`: no layer whose noise is drawn per group
    (dropout, Shake-Shake, ShakeDrop in training mode; a pass draws for the whole batch, the loop per group, keyed
    by its global index) and no SyncBatchNorm (it synchronises the whole pass, not each group, across ranks)."""
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            return False
        if m.training and (
            isinstance(m, (ShakeShake, ShakeDrop)) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        ):
            return False
    return True


def rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def group_noise(ctx: StepContext, group: int, device: torch.device) -> tuple:
    """The RNG state this rank's group `group` draws its noise from (for the perturbed pass to replay). With
    `ctx.seed` set, the CPU generator and `device`'s are first seeded from (seed, step, global group index);
    without it (callers outside the trainer) they run on."""
    if ctx.seed is not None:
        seed = seed_from(ctx.seed, NOISE_STREAM, ctx.step, ctx.first_group + group)
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[device.index].manual_seed(seed)
    return rng_state(device)


@torch.no_grad()
def average_over_ranks(params: list[torch.Tensor]) -> None:
    """`.grad` <- its mean over ranks: one all-reduce of all gradients flattened into a single buffer.

    This is the paper's `pmean` of the per-device SAM gradients. Done by hand rather than by DDP's hooks because
    the groups' gradients are built from pieces (per-group perturbed gradients, L2 terms at w + eps_i) that must
    all be averaged.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))


# ----------------------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepContext:
    """What a step needs besides the model, optimizer and batch (built once by the trainer)."""

    group_size: int
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    seed: int | None = None  # keys the noise of each group by (seed, step, global group); None: no reseeding
    first_group: int = 0  # global index of this rank's first group (rank x groups per rank)
    micro_batch: int | None = None  # examples per forward-backward (trainer.accumulate); None: the whole batch
    step: int = 0  # the optimizer step about to be taken (the trainer sets it before each step)


@dataclass
class StepStats:
    """Sums over the examples of one step, kept on the device (no synchronisation per step)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int
    perturbed_loss_sum: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None  # mean over groups of ||g_i||
    perturbation_norm: torch.Tensor | None = None  # mean over groups of ||eps_i||
    passes: int = 1  # forward-backward passes over the step's batch: 1 for a plain step, 2 for a SAM step


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    with ctx.autocast():
        logits = model(x)
    # fp16/bf16 logits in float32; float64 (the equality tests) stays float64
    loss = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), y, label_smoothing=ctx.label_smoothing
    )
    return loss, logits


def _scale(ctx: StepContext, loss: torch.Tensor) -> torch.Tensor:
    return ctx.scaler.scale(loss) if ctx.scaler is not None else loss


def _loss_scale(ctx: StepContext, device: torch.device) -> torch.Tensor | float:
    """The fp16 loss scale as a tensor on the device (`get_scale()` would synchronise); 1.0 without a scaler."""
    return ctx.scaler.scale(torch.ones((), device=device)) if ctx.scaler is not None else 1.0


def _base_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    ctx: StepContext,
    loss_scale: torch.Tensor | float,
    add_l2: bool,
    before_unscale: Callable[[], None] | None = None,
    after_unscale: Callable[[], None] | None = None,
) -> torch.Tensor | None:
    """[L2 gradient at w (SGD in l2 mode)], [a variant's change to the gradient], unscale (fp16: the overflow
    check), [a variant's read of the final gradient], clip, step, update.

    Everything that changes the gradient does so while it still carries the loss scale, so the scaler's overflow
    check covers it (LookSAM's direction is scale-invariant in g: adding it to S*g gives S times the sum)."""
    if add_l2:
        add_l2_gradient_(optimizer.param_groups, loss_scale)
    if before_unscale is not None:
        before_unscale()
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)
    if after_unscale is not None:
        after_unscale()
    total_norm = None
    if ctx.grad_clip:
        total_norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip)
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()
    return total_norm


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: StepContext,
    before_unscale: Callable[[], None] | None = None,
) -> StepStats:
    """Plain step with ghost-batch BatchNorm: the per-rank batch's gradient as the mean over its groups.

    One forward-backward per micro-batch (`ctx.micro_batch`, the whole batch by default) with BatchNorm statistics
    per group of m inside it (`GhostBatchNorm`); a pass per group where the model draws noise per group or
    synchronises BatchNorm across ranks (`one_pass_ghost_batch_norm`), or where m does not divide the micro-batch."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)
    m = ctx.group_size
    micro = ctx.micro_batch or len(x)
    one_pass = micro % m == 0 and len(x) % micro == 0 and one_pass_ghost_batch_norm(model)
    chunk = micro if one_pass else m
    passes = list(zip(x.split(chunk), y.split(chunk)))
    bn = RunningStatsAverage(model, len(passes))  # a ghost pass averages its own groups
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i, (xg, yg) in enumerate(passes):
        groups = len(xg) // m if one_pass else 1
        group_noise(ctx, i * groups, x.device)
        with GhostBatchNorm(m) if groups > 1 else contextlib.nullcontext():
            loss, logits = _loss(model, xg, yg, ctx)
        _scale(ctx, loss * (len(xg) / len(x))).backward()
        bn.collect(groups)
        loss_sum += loss.detach() * len(xg)
        correct += (logits.argmax(1) == yg).sum()
    bn.finish()
    average_over_ranks(params)
    _base_step(optimizer, params, ctx, _loss_scale(ctx, x.device), add_l2=True, before_unscale=before_unscale)
    return StepStats(loss_sum, correct, len(x))


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: StepContext,
    after_unscale: Callable[[], None] | None = None,
) -> StepStats:
    """SAM (Algorithm 1) with one perturbation per group of m examples; see the module docstring.

    Each group's clean gradient is taken with `torch.autograd.grad`, so it never touches `.grad`, where the
    groups' perturbed gradients accumulate; the step ends in `SAM.second_step` with the engine's base step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in params if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    groups = list(zip(x.split(ctx.group_size), y.split(ctx.group_size)))
    bn = RunningStatsAverage(model, len(groups))
    zero = torch.zeros((), device=x.device)
    loss_sum, perturbed_sum, grad_norm, perturbation_norm = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    loss_scale = _loss_scale(ctx, x.device)
    for i, (xg, yg) in enumerate(groups):
        weight = len(xg) / len(x)
        rng = group_noise(ctx, i, x.device)  # this virtual device's dropout/shake draws

        # g_i = grad L(w) on this group alone (no all-reduce), so every group (device) gets its own eps.
        # Shake-Shake/ShakeDrop use their forward coefficient in this backward (official "true gradient").
        set_true_gradient(model, True)
        loss, logits = _loss(model, xg, yg, ctx)
        clean = torch.autograd.grad(_scale(ctx, loss), trainable, allow_unused=True)
        bn.collect()
        optimizer.first_step(grads=dict(zip(trainable, clean)), grad_scale=loss_scale)  # w <- w + eps_i
        del clean
        optimizer.add_perturbed_weight_decay(weight * loss_scale)  # L2 gradient at w + eps_i (l2 mode)

        # g_s += n_i/n grad L(w + eps_i): the same dropout/shake draws, batch statistics, running stats untouched.
        set_rng_state(rng, x.device)
        set_true_gradient(model, False)
        with frozen_bn_stats(model):
            perturbed_loss, _ = _loss(model, xg, yg, ctx)
        _scale(ctx, perturbed_loss * weight).backward()
        optimizer.restore()  # w + eps_i -> w

        loss_sum += loss.detach() * len(xg)
        perturbed_sum += perturbed_loss.detach() * len(xg)
        correct += (logits.argmax(1) == yg).sum()
        grad_norm += cast(torch.Tensor, optimizer.last_grad_norm).to(zero) * weight  # set by first_step
        perturbation_norm += cast(torch.Tensor, optimizer.perturbation_norm).to(zero) * weight
    bn.finish()
    average_over_ranks(params)  # the paper's pmean of the per-device SAM gradients

    # w <- w - lr * g_s: SAM.second_step, its base step the engine's unscale (fp16), clip and step
    base_step = functools.partial(
        _base_step, optimizer.base_optimizer, params, ctx, loss_scale, add_l2=False, after_unscale=after_unscale
    )
    optimizer.second_step(base_step=base_step)
    return StepStats(loss_sum, correct, len(x), perturbed_sum, grad_norm, perturbation_norm, passes=2)


def looksam_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepStats:
    """LookSAM: a full SAM step every k steps (storing the direction it adds, from the unscaled SAM gradient), a
    plain step pushed along that direction in between (added before fp16's overflow check;
    sam_repro/optim/looksam.py)."""
    if optimizer.full_step_due():
        return sam_step(model, optimizer, x, y, ctx, after_unscale=optimizer.store_direction)
    return sgd_step(model, optimizer.base_optimizer, x, y, ctx, before_unscale=optimizer.apply_direction)


def msam_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepStats:
    """Momentum-SAM: one forward-backward, SGD's, at w + eps with eps = -rho v / ||v|| from the momentum buffer
    (sam_repro/optim/msam.py). The L2 term is taken at w + eps; w is restored before the scaler's unscale, the
    clip and the base step, which updates the momentum with the gradient at w + eps."""
    optimizer.first_step()  # w <- w + eps
    return sgd_step(model, optimizer.base_optimizer, x, y, ctx, before_unscale=optimizer.restore)


@dataclass
class ScheduledStep:
    """A SAM-family step on the schedule's SAM steps (`SamSchedule.is_sam_step(ctx.step)`), and the base
    optimizer's plain step, `sgd_step` (one forward-backward), on the others: an SGD warm start
    (`optimizer.sam_start`), SAM every k steps, randomized SAM. The plain step is SGD's exactly: the base
    optimizer shares SAM's parameter groups (learning rate, L2 coefficient) and keeps its momentum across both."""

    sam: Callable[..., StepStats]  # sam_step, looksam_step or msam_step
    schedule: SamSchedule

    def __call__(self, model: nn.Module, optimizer: SAM, x: torch.Tensor, y: torch.Tensor, ctx: StepContext):
        if self.schedule.is_sam_step(ctx.step):
            return self.sam(model, optimizer, x, y, ctx)
        return sgd_step(model, optimizer.base_optimizer, x, y, ctx)


def step_function(optimizer_name: str, schedule: SamSchedule | None = None) -> Callable[..., StepStats]:
    """The step the trainer takes for `optimizer.name`: `sgd_step`, `looksam_step`, `msam_step`, or `sam_step`
    (SAM, ASAM, GSAM), wrapped in `ScheduledStep` when the schedule makes some steps plain."""
    if optimizer_name == "sgd":
        return sgd_step
    sam = {"looksam": looksam_step, "msam": msam_step}.get(optimizer_name, sam_step)
    if schedule is None or schedule.always:
        return sam
    return ScheduledStep(sam, schedule)
