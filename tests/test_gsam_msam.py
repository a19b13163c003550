"""GSAM (sam_repro/optim/gsam.py) and Momentum-SAM (sam_repro/optim/msam.py) in the engine's steps, against
float64 loops written from the papers' updates, over several steps, with and without groups of m."""

import contextlib
import copy
import io
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from helpers.tiny_net import batch, tiny_bn_mlp
from helpers.training import TINY, comparable, compose_config, read_metrics
from sam_repro.engine.host_reads import HostReads
from sam_repro.engine.step import StepContext, msam_step, sam_step, sgd_step
from sam_repro.optim import SAM
from sam_repro.optim.gsam import GSAM
from sam_repro.optim.msam import MSAM

LR, MOMENTUM, WD = 0.1, 0.9, 1e-2
FACTORS = [0.1, 0.6, 1.0, 0.7, 0.3]  # lr / peak per step: a warm-up from below lr_min, then a decay


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda step: FACTORS[min(step, len(FACTORS) - 1)])


# ---- the papers' updates, by hand ----------------------------------------------------------------------------------


def loss_grad(model, names, w, xg, yg):
    """grad of the cross-entropy of group (xg, yg) at weights w (train-mode BatchNorm: the group's statistics)."""
    w = [t.detach().requires_grad_() for t in w]
    loss = nn.functional.cross_entropy(functional_call(model, dict(zip(names, w)), (xg,)), yg)
    return list(torch.autograd.grad(loss, w))


def dot(a, b):
    return sum((s * t).sum() for s, t in zip(a, b))


def sgd_update(w, d, buf, lr, nesterov):
    """torch.optim.SGD with momentum: buf = d (first step) or mu * buf + d; w - lr * (d + mu * buf | buf)."""
    buf = [t.clone() for t in d] if buf is None else [MOMENTUM * b + t for b, t in zip(buf, d)]
    step = [t + MOMENTUM * b for t, b in zip(d, buf)] if nesterov else buf
    return [p - lr * s for p, s in zip(w, step)], buf


def hand_gsam(model, x, y, m, steps, rho_max, rho_min, alpha, lr_min, nesterov=True):
    """Zhuang et al. (2022), Algorithm 1, per group of m (each its own device), directions averaged:
    rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min)/(lr_max - lr_min), clamped; g = grad f(w) (+ wd w);
    eps = rho_t g/||g||; g_s = grad f(w + eps) (+ wd (w + eps)); g_perp = g - (g.g_s/||g_s||^2) g_s;
    d = g_s - alpha g_perp; w <- SGD(w, d)."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    w, buf = [p.detach().clone() for p in model.parameters()], None
    for t in range(steps):
        lr = LR * FACTORS[t]
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (LR - lr_min)
        rho = min(rho_max, max(rho_min, rho))
        total = [torch.zeros_like(p) for p in w]
        for xg, yg in zip(x.split(m), y.split(m)):
            g = [gi + WD * p for gi, p in zip(loss_grad(model, names, w, xg, yg), w)]
            norm = torch.sqrt(dot(g, g))
            perturbed = [p + rho * gi / norm for p, gi in zip(w, g)]
            g_s = [gi + WD * p for gi, p in zip(loss_grad(model, names, perturbed, xg, yg), perturbed)]
            coef = dot(g, g_s) / dot(g_s, g_s)
            g_perp = [a - coef * b for a, b in zip(g, g_s)]
            total = [s + len(xg) / len(x) * (b - alpha * c) for s, b, c in zip(total, g_s, g_perp)]
        w, buf = sgd_update(w, total, buf, lr, nesterov)
    return w


def hand_msam(model, x, y, m, steps, rho, nesterov=True):
    """Becker et al. (2024): eps = -rho v/||v|| (v: SGD's momentum buffer, none before the first step: eps = 0);
    g = grad f(w + eps) (+ wd (w + eps)), the mean over the groups of m; w <- SGD(w, g)."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    w, buf = [p.detach().clone() for p in model.parameters()], None
    for _ in range(steps):
        eps = [torch.zeros_like(p) for p in w] if buf is None else [-rho * b / torch.sqrt(dot(buf, buf)) for b in buf]
        perturbed = [p + e for p, e in zip(w, eps)]
        g = [WD * p for p in perturbed]
        for xg, yg in zip(x.split(m), y.split(m)):
            g = [s + len(xg) / len(x) * gi for s, gi in zip(g, loss_grad(model, names, perturbed, xg, yg))]
        w, buf = sgd_update(w, g, buf, LR, nesterov)
    return w


def make_gsam(model, rho_max=0.2, rho_min=0.05, alpha=0.3, lr_min=0.02, nesterov=True, **kwargs):
    return GSAM(
        model.parameters(),
        torch.optim.SGD,
        rho_max=rho_max,
        rho_min=rho_min,
        alpha=alpha,
        lr_max=LR,
        lr_min=lr_min,
        lr=LR,
        momentum=MOMENTUM,
        nesterov=nesterov,
        weight_decay=WD,
        **kwargs,
    )


def make_msam(model, rho=0.5, nesterov=True):
    return MSAM(
        model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=WD
    )


# ---- GSAM ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [8, 4, 2])
@pytest.mark.parametrize("nesterov", [True, False])
def test_gsam_equals_the_papers_update_over_several_steps(m, nesterov):
    model = tiny_bn_mlp().double()
    x, y = batch(dtype=torch.float64)
    expected = hand_gsam(model, x, y, m, 5, rho_max=0.2, rho_min=0.05, alpha=0.3, lr_min=0.02, nesterov=nesterov)
    opt = make_gsam(model, nesterov=nesterov)
    sched = schedule(opt)
    rhos = []
    for step in range(5):
        sam_step(model, opt, x, y, StepContext(group_size=m, step=step))
        rhos.append(opt.param_groups[0]["rho"])
        sched.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
    # rho_t: clamped to rho_min in the warm-up (lr 0.01 < lr_min), rho_max at the peak, in between otherwise
    assert rhos[0] == 0.05 and rhos[2] == 0.2
    assert rhos[1] == pytest.approx(0.05 + 0.15 * (0.06 - 0.02) / 0.08, abs=1e-15)


def test_gsam_moves_against_the_orthogonal_part_of_the_clean_gradient():
    # The sign: GSAM's direction is g_s - alpha g_perp, so alpha > 0 lowers its inner product with g (f ascends
    # along g_perp while the descent on f_p is unchanged: the component along g_s is SAM's).
    model = tiny_bn_mlp().double()
    x, y = batch(dtype=torch.float64)
    directions = {}
    for alpha in (0.0, 0.5):
        net = copy.deepcopy(model)
        opt = GSAM(net.parameters(), torch.optim.SGD, rho_max=0.2, rho_min=0.2, alpha=alpha, lr=1.0)
        before = [p.detach().clone() for p in net.parameters()]
        sam_step(net, opt, x, y, StepContext(group_size=8))
        directions[alpha] = [b - p.detach() for b, p in zip(before, net.parameters())]
    g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    g_s = directions[0.0]
    g_perp = [a - dot(g, g_s) / dot(g_s, g_s) * b for a, b in zip(g, g_s)]
    for d, s, v in zip(directions[0.5], g_s, g_perp):
        torch.testing.assert_close(d, s - 0.5 * v, rtol=0, atol=1e-12)
    assert dot(directions[0.5], g) < dot(g_s, g)


@pytest.mark.parametrize("m", [8, 2])
@pytest.mark.parametrize("mode", ["l2", "base_optimizer"])
def test_gsam_with_a_constant_rho_and_alpha_0_is_sam_bit_for_bit(m, mode):
    x, y = batch(dtype=torch.float64)
    a, b = tiny_bn_mlp(), tiny_bn_mlp()
    kw = dict(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD, weight_decay_mode=mode)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.1, **kw)
    gsam = GSAM(b.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.1, alpha=0.0, lr_min=0.0, **kw)
    schedules = [schedule(sam), schedule(gsam)]  # the learning rate moves; rho must not
    for step in range(4):
        ctx = StepContext(group_size=m, grad_clip=1.0, step=step)
        sam_step(a, sam, x.float(), y, ctx)
        sam_step(b, gsam, x.float(), y, ctx)
        for s in schedules:
            s.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(s, t) for s, t in zip(a.state_dict().values(), b.state_dict().values()))


def test_gsam_rho_follows_the_learning_rate():
    opt = make_gsam(tiny_bn_mlp().double(), rho_max=0.2, rho_min=0.05, lr_min=0.02)
    assert opt.rho_at(LR) == 0.2 and opt.rho_at(0.02) == 0.05
    assert opt.rho_at(0.06) == pytest.approx(0.125)
    assert opt.rho_at(0.0) == 0.05 and opt.rho_at(1.0) == 0.2  # clamped below lr_min and above the peak
    with pytest.raises(ValueError, match="rho_min <= rho_max"):
        make_gsam(tiny_bn_mlp().double(), rho_max=0.1, rho_min=0.2)


def test_gsam_clips_its_final_direction():
    x, y = batch(dtype=torch.float64)
    model = tiny_bn_mlp().double()
    start = [p.detach().clone() for p in model.parameters()]
    opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.2, rho_min=0.2, alpha=0.5, lr=1.0)
    sam_step(model, opt, x, y, StepContext(group_size=4, grad_clip=0.05))
    moved = torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)))
    assert float(moved) == pytest.approx(0.05, rel=1e-4)  # clip_grad_norm_ divides by norm + 1e-6


# ---- Momentum-SAM -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [8, 4, 2])
@pytest.mark.parametrize("nesterov", [True, False])
def test_msam_equals_the_papers_update_over_several_steps(m, nesterov):
    model = tiny_bn_mlp().double()
    x, y = batch(dtype=torch.float64)
    expected = hand_msam(model, x, y, m, 4, rho=0.5, nesterov=nesterov)
    opt = make_msam(model, rho=0.5, nesterov=nesterov)
    for step in range(4):
        msam_step(model, opt, x, y, StepContext(group_size=m, step=step))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def test_msam_perturbs_against_the_momentum_buffer():
    model = tiny_bn_mlp().double()
    x, y = batch(dtype=torch.float64)
    opt = make_msam(model, rho=0.5)
    opt.first_step()
    assert not opt.is_perturbed and float(opt.perturbation_norm) == 0  # no buffer yet: a plain step
    msam_step(model, opt, x, y, StepContext(group_size=8))
    w = [p.detach().clone() for p in model.parameters()]
    v = [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    opt.first_step()
    norm = torch.sqrt(dot(v, v))
    for p, w0, b in zip(model.parameters(), w, v):
        torch.testing.assert_close(p.detach(), w0 - 0.5 * b / norm, rtol=0, atol=1e-15)
    assert float(opt.perturbation_norm) == pytest.approx(0.5)
    opt.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_msam_closure_step_equals_the_engine_step():
    x, y = batch(dtype=torch.float64)
    a, b = tiny_bn_mlp().double(), tiny_bn_mlp().double()
    oa, ob = make_msam(a), make_msam(b)
    for step in range(3):
        msam_step(a, oa, x, y, StepContext(group_size=8, step=step))

        def closure():
            loss = nn.functional.cross_entropy(b(x), y)
            loss.backward()
            return loss

        ob.step(closure)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


# ---- both: passes, resume, mixed precision -------------------------------------------------------------------------


def count_passes(model, step, opt, x, y, m):
    """Forward-backward passes of one step, in units of the batch (examples through the first layer / batch)."""
    seen = []
    handle = model[0].register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    step(model, opt, x, y, StepContext(group_size=m))
    handle.remove()
    return sum(seen) / len(x)


@pytest.mark.parametrize("m", [8, 4])
def test_passes_per_step(m):
    x, y = batch(dtype=torch.float64)
    for _ in range(2):  # MSAM's first step (no buffer yet) and a perturbed one
        model = tiny_bn_mlp().double()
        msam = make_msam(model)
        assert [count_passes(model, msam_step, msam, x, y, m) for _ in range(2)] == [1, 1]
        gsam = make_gsam(model)
        assert [count_passes(model, sam_step, gsam, x, y, m) for _ in range(2)] == [2, 2]
        sgd = torch.optim.SGD(model.parameters(), lr=LR)
        assert count_passes(model, sgd_step, sgd, x, y, m) == 1


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["gsam", "msam"])
@pytest.mark.parametrize("m", [8, 4])
def test_a_resume_mid_run_equals_the_uninterrupted_run(name, m):
    x, y = batch(dtype=torch.float64)
    build = (lambda net: make_gsam(net)) if name == "gsam" else (lambda net: make_msam(net))
    take = sam_step if name == "gsam" else msam_step

    def run(model, opt, sched, steps):
        for step in steps:
            take(model, opt, x, y, StepContext(group_size=m, step=step))
            sched.step()

    model = tiny_bn_mlp().double()
    opt = build(model)
    sched = schedule(opt)
    run(model, opt, sched, range(5))

    first = tiny_bn_mlp().double()
    opt1 = build(first)
    sched1 = schedule(opt1)
    run(first, opt1, sched1, range(2))
    saved = round_trip({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()})
    resumed = tiny_bn_mlp().double()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # anything: the checkpoint decides
    opt2 = build(resumed)
    sched2 = schedule(opt2)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    run(resumed, opt2, sched2, range(2, 5))
    for p, q in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


FP16 = dict(autocast=lambda: torch.autocast("cpu", dtype=torch.float16))


def weights_after_steps(name, ctx, steps):
    """The float32 tiny network's weights after `steps` GSAM or Momentum-SAM steps (`name`) with `ctx`."""
    x, y = batch(dtype=torch.float64)
    model = tiny_bn_mlp()
    opt = make_gsam(model) if name == "gsam" else make_msam(model)
    for step in range(steps):
        ctx.step = step
        (sam_step if name == "gsam" else msam_step)(model, opt, x.float(), y, ctx)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["gsam", "msam"])
def test_fp16_loss_scaling_changes_nothing(name):
    # The per-group decomposition runs on loss-scaled gradients: with a power-of-two scale it must give what fp16
    # autocast gives without a scaler, up to float32 rounding.
    scaled = weights_after_steps(
        name, StepContext(group_size=4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10), **FP16), 3
    )
    unscaled = weights_after_steps(name, StepContext(group_size=4, **FP16), 3)
    for a, b in zip(scaled, unscaled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["gsam", "msam"])
def test_fp16_and_bf16_steps_are_close_to_fp32(name):
    fp32 = weights_after_steps(name, StepContext(group_size=4), 1)
    fp16 = weights_after_steps(
        name, StepContext(group_size=4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10), **FP16), 1
    )
    bf16 = weights_after_steps(
        name, StepContext(group_size=4, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)), 1
    )
    for other, tol in ((fp16, 2e-3), (bf16, 3e-2)):
        for a, b in zip(fp32, other):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fp16_gsam_overflow_skips_the_step():
    x, y = batch(dtype=torch.float64)
    model = tiny_bn_mlp()
    opt = make_gsam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad  # the second group's clean pass

    handle = model[0].weight.register_hook(poison)
    sam_step(model, opt, x.float(), y, StepContext(group_size=4, scaler=scaler, **FP16))
    handle.remove()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**7
    sam_step(model, opt, x.float(), y, StepContext(group_size=4, scaler=scaler, **FP16))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["gsam", "msam"])
def test_a_step_never_reads_a_tensor_value_on_the_host(name, precision):
    x, y = batch(dtype=torch.float64)
    model = tiny_bn_mlp()
    opt = make_gsam(model) if name == "gsam" else make_msam(model)
    ctx = StepContext(
        group_size=4,
        grad_clip=1.0,
        seed=0,
        autocast=FP16["autocast"] if precision == "fp16" else contextlib.nullcontext,
        scaler=torch.amp.GradScaler("cpu") if precision == "fp16" else None,
    )
    with HostReads(count_cpu=True) as reads:  # on the CPU, every tensor's value is on the host
        for step in range(2):
            ctx.step = step
            (sam_step if name == "gsam" else msam_step)(model, opt, x.float(), y, ctx)
    assert len(reads.reads) == (2 if precision == "fp16" else 0)  # the GradScaler's own overflow check, once a step
    assert math.isfinite(float(opt.perturbation_norm))


# ---- configs -------------------------------------------------------------------------------------------------------


def validate_on_cpu(cfg):
    from sam_repro.engine.config import validate
    from sam_repro.engine.distributed import DistEnv

    validate(
        cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")
    )


def test_configs_build_the_optimizers_with_their_hyperparameters():
    from sam_repro.optim.factory import build_optimizer

    gsam_cfg = compose_config("optimizer=gsam", "schedule.min_lr=0.001")
    validate_on_cpu(gsam_cfg)
    opt = build_optimizer(gsam_cfg.optimizer, tiny_bn_mlp().double())
    assert isinstance(opt, GSAM) and gsam_cfg.optimizer.rho == gsam_cfg.optimizer.rho_max
    assert (opt.rho_max, opt.rho_min, opt.alpha) == (0.05, 0.0, 0.01)
    assert (opt.lr_max, opt.lr_min) == (gsam_cfg.optimizer.lr, 0.001)  # rho_min is reached at the schedule's floor
    msam_cfg = compose_config("optimizer=msam")
    validate_on_cpu(msam_cfg)
    opt = build_optimizer(msam_cfg.optimizer, tiny_bn_mlp().double())
    assert isinstance(opt, MSAM) and opt.param_groups[0]["rho"] == 3.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer=gsam", "optimizer.rho_min=0.1"], "optimizer.rho_min (0.1) must not exceed optimizer.rho_max"),
        (["optimizer=gsam", "optimizer.rho=0.1"], "set optimizer.rho_max=0.1 instead"),
        (["optimizer=gsam", "optimizer.alpha=-1"], "optimizer.alpha must be >= 0"),
        (["optimizer=gsam", "optimizer.lr_min=1"], "optimizer.lr_min (1) must not exceed the peak optimizer.lr"),
        (["optimizer=msam", "optimizer.momentum=0", "optimizer.nesterov=false"], "needs optimizer.momentum > 0"),
        (["optimizer=msam", "optimizer.rho=-1"], "optimizer.rho must be >= 0"),
    ],
)
def test_config_refusals(overrides, message):
    from sam_repro.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate_on_cpu(compose_config(*overrides))


@pytest.mark.data
@pytest.mark.parametrize("switches", [["optimizer=gsam", "trainer.m=32"], ["optimizer=msam", "trainer.m=32"]])
def test_a_resumed_training_run_ends_as_the_uninterrupted_run(tmp_path, switches):
    # A warm-up epoch from below lr_min, then cosine: GSAM's rho moves (clamped, then not) across the resume.
    from sam_repro.engine.checkpoint import load_checkpoint
    from sam_repro.engine.trainer import train as train_in_process

    def config(*overrides):
        schedule = ["schedule.warmup_epochs=1", "schedule.min_lr=0.01"]
        return compose_config(*TINY, "trainer.progress=off", "trainer.epochs=2", *schedule, *switches, *overrides)

    reference, run = tmp_path / "reference", tmp_path / "resumed"
    train_in_process(config(), reference)
    train_in_process(config("trainer.max_steps=4"), run)  # stops after epoch 1 (4 steps per epoch): mid-run
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    train_in_process(config(), run)
    assert comparable(read_metrics(run)) == comparable(read_metrics(reference))
    weights, expected = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (run, reference))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
