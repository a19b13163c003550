"""The engine's SAM step (sam_repro/engine/step.py) against hand-written computations."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from helpers.tiny_net import batch, tiny_bn_mlp
from sam_repro.engine.host_reads import HostReads
from sam_repro.engine.step import StepContext, frozen_bn_stats, looksam_step, sam_step, sgd_step
from sam_repro.models import ShakeDrop, shake
from sam_repro.optim import SAM
from sam_repro.optim.looksam import LookSAM


def make_sam(model, rho=0.1, wd=0.0, lr=0.1):
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, weight_decay=wd)


def hand_sam_update(model, x, y, m, rho, lr, wd):
    """Per group: eps from the group's own gradient (with L2), the group's gradient at w+eps; average; SGD step."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    groups = list(zip(x.split(m), y.split(m)))
    for xg, yg in groups:
        probe = copy.deepcopy(model).train()
        loss = nn.functional.cross_entropy(probe(xg), yg)
        g = torch.autograd.grad(loss, list(probe.parameters()))
        g = [gi + wd * p.detach() for gi, p in zip(g, params)]
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        with torch.no_grad():
            for p, gi in zip(probe.parameters(), g):
                p.add_(rho * gi / norm)
        loss_adv = nn.functional.cross_entropy(probe(xg), yg)
        gs = torch.autograd.grad(loss_adv, list(probe.parameters()))
        for t, gi, p in zip(total, gs, probe.parameters()):
            t.add_((gi + wd * p.detach()) / len(groups))
    return [p.detach() - lr * t for p, t in zip(params, total)]


@pytest.mark.parametrize("m", [8, 4, 2])
def test_grouped_sam_equals_hand_loop(m):
    model = tiny_bn_mlp()
    x, y = batch()
    expected = hand_sam_update(model, x, y, m, rho=0.1, lr=0.1, wd=1e-2)
    opt = make_sam(model, rho=0.1, wd=1e-2)
    stats = sam_step(model, opt, x, y, StepContext(group_size=m))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert stats.count == 8 and stats.perturbed_loss_sum is not None


def test_bn_running_stats_come_from_the_clean_pass_only():
    model = tiny_bn_mlp()
    x, y = batch()
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        reference(x)  # one clean forward in train mode
    bn, ref_bn = model[1], reference[1]
    sam_step(model, make_sam(model, rho=0.5), x, y, StepContext(group_size=8))
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1


def test_grouped_running_stats_are_the_average_of_per_group_updates():
    model = tiny_bn_mlp()
    x, y = batch()
    start = copy.deepcopy(model[1])
    updates = []
    for xg in x.split(4):
        probe = copy.deepcopy(model).train()
        with torch.no_grad():
            probe(xg)
        updates.append((probe[1].running_mean, probe[1].running_var))
    for step in (sgd_step, sam_step):
        m = copy.deepcopy(model)
        opt = make_sam(m) if step is sam_step else torch.optim.SGD(m.parameters(), lr=0.1)
        step(m, opt, x, y, StepContext(group_size=4))
        torch.testing.assert_close(m[1].running_mean, (updates[0][0] + updates[1][0]) / 2)
        torch.testing.assert_close(m[1].running_var, (updates[0][1] + updates[1][1]) / 2)
        assert int(m[1].num_batches_tracked) == int(start.num_batches_tracked) + 1


def test_frozen_bn_stats_still_normalizes_with_batch_statistics():
    model = tiny_bn_mlp().train()
    x, _ = batch()
    before = model[1].running_mean.clone()
    with torch.no_grad(), frozen_bn_stats(model):
        out_frozen = model[:2](x)
    assert torch.equal(model[1].running_mean, before)
    torch.testing.assert_close(out_frozen.mean(0), model[1].bias.detach(), atol=1e-5, rtol=0)  # batch stats used
    assert model[1].track_running_stats


def test_dropout_draws_are_replayed_in_the_perturbed_pass():
    model = tiny_bn_mlp(dropout=0.5)
    x, y = batch()
    stats = sam_step(model, make_sam(model, rho=0.0), x, y, StepContext(group_size=8))
    # rho = 0: the perturbed pass is the clean pass again, identical only if the dropout masks are the same.
    assert torch.equal(stats.perturbed_loss_sum, stats.loss_sum)


def shakedrop_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), ShakeDrop(keep_prob=0.5), nn.Linear(16, 3))


@pytest.mark.parametrize("step", [sam_step, sgd_step])
def test_every_group_draws_its_own_noise_keyed_by_seed_step_and_global_group(step, monkeypatch):
    # One process with two groups of 4 must draw, per group, what two ranks with one group each draw: the noise
    # of a virtual device depends on (seed, step, global group index), not on where the group runs.
    draws = []
    real = shake._per_example_uniform
    monkeypatch.setattr(shake, "_per_example_uniform", lambda *a: draws.append(real(*a)) or draws[-1])
    x, y = batch()
    x, y = torch.cat([x[:4], x[:4]]), torch.cat([y[:4], y[:4]])  # two identical groups

    def run(xs, ys, first_group, at_step=3):
        draws.clear()
        model = shakedrop_net()
        opt = make_sam(model) if step is sam_step else torch.optim.SGD(model.parameters(), lr=0.1)
        step(model, opt, xs, ys, StepContext(group_size=4, seed=7, first_group=first_group, step=at_step))
        return list(draws)

    one_process = run(x, y, first_group=0)
    rank0, rank1 = run(x[:4], y[:4], first_group=0), run(x[4:], y[4:], first_group=1)
    passes = 2 if step is sam_step else 1  # SAM: clean and perturbed pass per group
    assert len(one_process) == 2 * passes and len(rank0) == len(rank1) == passes
    assert all(torch.equal(a, b) for a, b in zip(one_process, rank0 + rank1))
    assert not torch.equal(one_process[0], one_process[passes])  # same examples, another virtual device
    if step is sam_step:
        assert torch.equal(one_process[0], one_process[1])  # the perturbed pass replays the clean pass's draws
    assert not torch.equal(run(x, y, first_group=0, at_step=4)[0], one_process[0])  # and a new draw every step


def test_sgd_step_with_groups_equals_full_batch_gradient_without_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for g in opt.param_groups:
        g["l2_weight_decay"] = 0.01
    sgd_step(model, opt, x, y, StepContext(group_size=2))
    loss = nn.functional.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * (g + 0.01 * q.detach()), rtol=1e-5, atol=1e-6)


def test_grad_clip_applies_to_the_sam_gradient():
    model = tiny_bn_mlp()
    x, y = batch()
    unclipped = copy.deepcopy(model)
    sam_step(unclipped, make_sam(unclipped, lr=1.0), x, y, StepContext(group_size=8))
    with torch.no_grad():
        step_norm = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(unclipped.parameters(), model.parameters())))
    clip = float(step_norm) / 4
    sam_step(model, make_sam(model, lr=1.0), x, y, StepContext(group_size=8, grad_clip=clip))
    with torch.no_grad():
        pairs = zip(model.parameters(), tiny_bn_mlp().parameters())
        clipped_norm = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in pairs))
    assert float(clipped_norm) == pytest.approx(clip, rel=1e-4)


def test_fp16_inf_in_first_pass_skips_the_step():
    model = tiny_bn_mlp()
    x, y = batch()
    opt = make_sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad

    handle = model[0].weight.register_hook(poison)
    ctx = StepContext(group_size=8, scaler=scaler, autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    sam_step(model, opt, x, y, ctx)
    handle.remove()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert scaler.get_scale() == 2.0**7  # backed off once: one update per SAM step
    # The next step, without the injected inf, goes through.
    sam_step(model, opt, x, y, ctx)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["sgd", "sam", "sam_m4", "looksam"])
def test_a_step_never_reads_a_tensor_value_on_the_host(kind, precision):
    # No synchronisation per step: the only read left is the GradScaler's own check for overflow before it lets the
    # optimizer step (`GradScaler.step` reads found_inf), once per fp16 step.
    model = tiny_bn_mlp(dropout=0.1)
    x, y = batch()
    if kind == "sgd":
        opt, take = torch.optim.SGD(model.parameters(), lr=0.1), sgd_step
    elif kind == "looksam":
        opt, take = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=2, weight_decay=1e-2), looksam_step
    else:
        opt, take = make_sam(model, wd=1e-2), sam_step
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = StepContext(
        group_size=4 if kind == "sam_m4" else 8,
        grad_clip=1.0,
        seed=0,
        autocast=(lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext,
        scaler=torch.amp.GradScaler("cpu") if precision == "fp16" else None,
    )
    steps = 2  # LookSAM: a full step and a cheap one
    with HostReads(count_cpu=True) as reads:  # on the CPU, every tensor's value is on the host
        for i in range(steps):
            ctx.step = i
            stats = take(model, opt, x, y, ctx)
    assert len(reads.reads) == (steps if precision == "fp16" else 0)
    assert stats.count == 8


def test_fp16_steps_whose_first_pass_overflowed_are_left_out_of_the_sam_metrics():
    from sam_repro.engine.metrics import EpochTotals

    model = tiny_bn_mlp()
    x, y = batch()
    opt = make_sam(model, rho=0.1)
    ctx = StepContext(
        group_size=8,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
        autocast=lambda: torch.autocast("cpu", dtype=torch.float16),
    )
    handle = model[0].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    skipped = sam_step(model, opt, x, y, ctx)
    handle.remove()
    assert not torch.isfinite(skipped.perturbed_loss_sum) and not torch.isfinite(skipped.grad_norm)
    kept = sam_step(model, opt, x, y, ctx)
    totals = EpochTotals(torch.device("cpu"))
    totals.add(skipped)
    totals.add(kept)
    out = totals.metrics()
    assert out["perturbed_loss"] == pytest.approx(float(kept.perturbed_loss_sum) / 8, rel=1e-6)
    assert out["sharpness"] == pytest.approx(float(kept.perturbed_loss_sum - kept.loss_sum) / 8, rel=1e-5)
    assert out["grad_norm"] == pytest.approx(float(kept.grad_norm), rel=1e-6)
    assert out["perturbation_norm"] == pytest.approx(0.1, rel=1e-5)  # ||eps|| = rho
    # the clean training loss keeps every step (a non-finite one stops the run)
    assert out["train_loss"] == pytest.approx(float(skipped.loss_sum + kept.loss_sum) / 16, rel=1e-6)
    # a checkpoint of these sums resumes to the same metrics
    assert EpochTotals(torch.device("cpu"), totals.state_dict()).metrics() == out


def test_bf16_autocast_step_is_close_to_fp32():
    x, y = batch()
    results = []
    for autocast in (None, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        model = tiny_bn_mlp()
        ctx = StepContext(group_size=8) if autocast is None else StepContext(group_size=8, autocast=autocast)
        sam_step(model, make_sam(model), x, y, ctx)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


class RecordingSAM(SAM):
    """SAM that records the calls the engine makes and the state of `.grad` at each."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _grads(self):
        return [None if p.grad is None else p.grad.detach().clone() for p in self.param_groups[0]["params"]]

    def first_step(self, zero_grad=False, grad_scale=1.0, grads=None):
        self.calls.append(("first_step", grads is not None, self._grads()))
        super().first_step(zero_grad, grad_scale, grads)

    def restore(self):
        self.calls.append(("restore", None, self._grads()))
        super().restore()

    def second_step(self, zero_grad=False, base_step=None):
        self.calls.append(("second_step", base_step is not None, self._grads()))
        super().second_step(zero_grad, base_step)


@pytest.mark.parametrize("m", [8, 4])
def test_the_engine_runs_one_algorithm_1_through_the_optimizer(m):
    """Item by item: each group's clean gradient goes to first_step explicitly, `.grad` keeps the perturbed
    gradients accumulated so far (nothing set aside and put back), and every step ends in SAM.second_step."""
    model = tiny_bn_mlp().double()
    x, y = batch()
    x = x.double()
    expected = hand_sam_update(model, x, y, m, rho=0.1, lr=0.1, wd=1e-2)
    opt = RecordingSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, weight_decay=1e-2)
    sam_step(model, opt, x, y, StepContext(group_size=m))
    groups = len(x) // m
    # (second_step's own restore is a no-op: the engine restored w after each group)
    assert [c[0] for c in opt.calls] == ["first_step", "restore"] * groups + ["second_step", "restore"]
    assert all(c[1] for c in opt.calls if c[0] != "restore")  # explicit clean gradients; the engine's base step
    firsts = [c[2] for c in opt.calls if c[0] == "first_step"]
    restores = [c[2] for c in opt.calls if c[0] == "restore"]
    assert all(g is None for g in firsts[0])  # no gradient yet when the first group perturbs
    for before, after_previous in zip(firsts[1:], restores[:-1]):
        for a, b in zip(before, after_previous):  # the clean pass left `.grad` as the previous group left it
            assert torch.equal(a, b)
    # and what accumulated is the weighted sum of the groups' perturbed gradients (incl. the L2 term at w + eps)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_second_step_takes_the_engines_base_step_and_restores_first():
    model = tiny_bn_mlp().double()
    x, y = batch()
    opt = make_sam(model)
    nn.functional.cross_entropy(model(x.double()), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x.double()), y).backward()
    seen = []
    opt.second_step(base_step=lambda: seen.append([p.detach().clone() for p in model.parameters()]))
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], w))  # called at w
    assert all(  # and it replaced the base optimizer's step
        torch.equal(p.detach(), b) for p, b in zip(model.parameters(), w)
    )


def test_first_step_with_explicit_gradients_equals_first_step_from_grad():
    model = tiny_bn_mlp().double()
    x, y = batch()
    loss = nn.functional.cross_entropy(model(x.double()), y)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    a = make_sam(model, wd=1e-2)
    a.first_step(grads=dict(zip(params, grads)), grad_scale=4.0)
    explicit = [p.detach().clone() for p in params]
    assert all(p.grad is None for p in params)  # `.grad` untouched
    a.restore()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    b = make_sam(model, wd=1e-2)
    b.first_step(grad_scale=4.0)
    assert all(torch.equal(p.detach(), e) for p, e in zip(params, explicit))
    assert torch.equal(a.last_grad_norm, b.last_grad_norm)
