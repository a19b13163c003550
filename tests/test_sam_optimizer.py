"""SAM against closed forms and the base optimizer (sam_repro/optim/sam.py)."""

import copy
import math

import pytest
import torch

from sam_repro.optim import SAM


def spd_quadratic(n=5, seed=0):
    """A random symmetric positive definite A (the Hessian of 0.5 w^T A w) and a starting point w0, float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = q @ q.T + n * torch.eye(n, dtype=torch.float64)  # symmetric positive definite
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    return a, w0


def loss_fn(a, w):
    return 0.5 * w @ a @ w


def sam_step(opt, a, w):
    opt.zero_grad()
    loss_fn(a, w).backward()
    opt.first_step(zero_grad=True)
    loss_fn(a, w).backward()
    opt.second_step(zero_grad=True)


def test_one_step_matches_closed_form():
    a, w0 = spd_quadratic()
    lr, rho = 0.01, 0.2
    w = w0.clone().requires_grad_()
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)
    sam_step(opt, a, w)
    g = a @ w0
    expected = w0 - lr * a @ (w0 + rho * g / g.norm())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    assert float(opt.last_grad_norm) == pytest.approx(float(g.norm()))
    assert float(opt.perturbation_norm) == pytest.approx(rho)


def test_closure_api_equals_two_steps():
    a, w0 = spd_quadratic(seed=1)
    w1 = w0.clone().requires_grad_()
    w2 = w0.clone().requires_grad_()
    o1 = SAM([w1], torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    o2 = SAM([w2], torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for _ in range(3):
        sam_step(o1, a, w1)

        def closure():
            o2.zero_grad()
            loss = loss_fn(a, w2)
            loss.backward()
            return loss

        closure()
        o2.step(closure)
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)


def test_p_inf_uses_sign():
    a, w0 = spd_quadratic(seed=2)
    lr, rho = 0.01, 0.1
    w = w0.clone().requires_grad_()
    opt = SAM([w], torch.optim.SGD, rho=rho, p=math.inf, lr=lr)
    sam_step(opt, a, w)
    expected = w0 - lr * a @ (w0 + rho * torch.sign(a @ w0))
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["l2", "base_optimizer"])
def test_rho_zero_is_bitwise_the_base_optimizer(nesterov, mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.0, weight_decay=5e-4, weight_decay_mode=mode, **kw)
    sgd = torch.optim.SGD(ref.parameters(), weight_decay=5e-4, **kw)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(4):
        for m, opt in ((model, sam), (ref, sgd)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        sam.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        sam.second_step()
        sgd.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_weight_decay_modes_differ_by_exactly_the_wd_terms():
    a, w0 = spd_quadratic(seed=3)
    lr, rho, wd = 0.01, 0.2, 0.1
    results = {}
    for mode in ("l2", "base_optimizer"):
        w = w0.clone().requires_grad_()
        opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr, weight_decay=wd, weight_decay_mode=mode)
        opt.zero_grad()
        loss_fn(a, w).backward()
        opt.first_step(zero_grad=True)
        results[mode + "_eps"] = (w.detach() - w0).clone()
        loss_fn(a, w).backward()
        opt.second_step()
        results[mode] = w.detach().clone()
    g_l2 = a @ w0 + wd * w0
    eps_l2 = rho * g_l2 / g_l2.norm()
    eps_base = rho * (a @ w0) / (a @ w0).norm()
    torch.testing.assert_close(results["l2_eps"], eps_l2)
    torch.testing.assert_close(results["base_optimizer_eps"], eps_base)
    # l2: grad at w+eps includes wd*(w+eps); base_optimizer: wd*w added by SGD after restoring.
    torch.testing.assert_close(results["l2"], w0 - lr * (a @ (w0 + eps_l2) + wd * (w0 + eps_l2)))
    torch.testing.assert_close(results["base_optimizer"], w0 - lr * (a @ (w0 + eps_base) + wd * w0))


def test_asam_closed_form():
    a, w0 = spd_quadratic(seed=4)
    lr, rho, eta = 0.01, 0.5, 0.01
    w = w0.clone().requires_grad_()
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=lr)
    sam_step(opt, a, w)
    g = a @ w0
    t = w0.abs() + eta
    eps = rho * t * t * g / (t * g).norm()
    torch.testing.assert_close(w.detach(), w0 - lr * a @ (w0 + eps))


def test_per_group_rho():
    a, w0 = spd_quadratic(seed=5)
    w1 = w0[:2].clone().requires_grad_()
    w2 = w0[2:].clone().requires_grad_()
    opt = SAM([{"params": [w1], "rho": 0.3}, {"params": [w2]}], torch.optim.SGD, rho=0.0, lr=0.01)
    opt.zero_grad()
    loss_fn(a, torch.cat([w1, w2])).backward()
    g = a @ w0
    opt.first_step()
    torch.testing.assert_close(w1.detach(), w0[:2] + 0.3 * g[:2] / g.norm())
    torch.testing.assert_close(w2.detach(), w0[2:])


def test_scheduler_drives_base_optimizer_lr():
    w = torch.zeros(3, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=1.0, weight_decay=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.base_optimizer.param_groups[0] is opt.param_groups[0]
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_state_dict_round_trip_gives_same_next_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def step(m, opt):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.second_step()

    def make(m):
        return SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)

    opt = make(model)
    for _ in range(3):
        step(model, opt)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    step(model, opt)
    expected = [p.detach().clone() for p in model.parameters()]

    fresh = torch.nn.Linear(4, 2)
    fresh.load_state_dict(saved_model)
    fresh_opt = make(fresh)
    fresh_opt.load_state_dict(saved_opt)
    assert fresh_opt.param_groups[0] is fresh_opt.base_optimizer.param_groups[0]
    step(fresh, fresh_opt)
    for p, q in zip(fresh.parameters(), expected):
        assert torch.equal(p.detach(), q)


def test_zero_gradient_gives_no_perturbation():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
    w.grad = torch.zeros(3, dtype=torch.float64)
    opt.first_step()
    assert torch.equal(w.detach(), torch.ones(3, dtype=torch.float64))
    assert float(opt.last_grad_norm) == 0.0


def test_invalid_arguments():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="rho"):
        SAM([w], torch.optim.SGD, rho=-1, lr=0.1)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        SAM([w], torch.optim.SGD, weight_decay_mode="decoupled", lr=0.1)
