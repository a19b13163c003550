"""LookSAM (sam_repro/optim/looksam.py) against hand computations on a quadratic."""

import copy

import torch

from sam_repro.engine.step import StepContext, looksam_step, sam_step, sgd_step
from sam_repro.optim import SAM
from sam_repro.optim.looksam import LookSAM


def linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    model = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g, dtype=torch.float64))
        model.bias.zero_()
    return model, x, y


def grads(model, x, y, params=None):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, list(model.parameters()))


def test_k1_is_plain_sam():
    a, x, y = linear_problem()
    b, _, _ = linear_problem()
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    look = LookSAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=1)
    for _ in range(3):
        sam_step(a, sam, x, y, StepContext(group_size=16))
        looksam_step(b, look, x, y, StepContext(group_size=16))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_reuse_step_follows_the_stored_orthogonal_direction():
    model, x, y = linear_problem(1)
    rho, lr, alpha = 0.2, 0.1, 0.7
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, k=2, alpha=alpha)
    # Hand computation of the full step's direction g_v = g_s - (g.g_s / |g|^2) g.
    w0 = [p.detach().clone() for p in model.parameters()]
    g = grads(model, x, y)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(model.parameters(), g):
            p.add_(rho * t / norm)
    g_s = grads(model, x, y)
    with torch.no_grad():
        for p, w in zip(model.parameters(), w0):
            p.copy_(w)
    dot = sum((a * b).sum() for a, b in zip(g, g_s))
    g_v = [b - dot / norm**2 * a for a, b in zip(g, g_s)]

    looksam_step(model, opt, x, y, StepContext(group_size=16))  # full step
    for p, w, t in zip(model.parameters(), w0, g_s):
        torch.testing.assert_close(p.detach(), w - lr * t)
    for p, v in zip(model.parameters(), g_v):
        torch.testing.assert_close(opt.state[p]["g_v"], v)
    # orthogonal to g
    assert abs(float(sum((a * b).sum() for a, b in zip(g, g_v)))) < 1e-10

    w1 = [p.detach().clone() for p in model.parameters()]
    g1 = grads(model, x, y)
    n1 = torch.sqrt(sum((t**2).sum() for t in g1))
    nv = torch.sqrt(sum((t**2).sum() for t in g_v))
    looksam_step(model, opt, x, y, StepContext(group_size=16))  # reuse step: one pass
    for p, w, t, v in zip(model.parameters(), w1, g1, g_v):
        torch.testing.assert_close(p.detach(), w - lr * (t + alpha * n1 / nv * v))
    assert opt.full_step_due()  # the third step recomputes the ascent


def test_state_round_trip_keeps_the_direction_and_the_phase():
    model, x, y = linear_problem(2)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=3)
    looksam_step(model, opt, x, y, StepContext(group_size=16))
    fresh, _, _ = linear_problem(2)
    fresh.load_state_dict(model.state_dict())
    opt2 = LookSAM(fresh.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=3)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.steps_taken == 1
    looksam_step(model, opt, x, y, StepContext(group_size=16))
    looksam_step(fresh, opt2, x, y, StepContext(group_size=16))
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_loaded_state_moves_to_the_parameters_device_and_dtype():
    # A checkpoint loads onto the CPU; resuming on a GPU must move LookSAM's direction (and the base optimizer's
    # momentum) to the GPU. The meta device stands in for the GPU.
    model, x, y = linear_problem(2)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, k=3)
    looksam_step(model, opt, x, y, StepContext(group_size=16))
    saved = opt.state_dict()
    for device, dtype in ((torch.device("meta"), torch.float64), (torch.device("cpu"), torch.float32)):
        target = torch.nn.Linear(5, 3, device=device, dtype=dtype)
        resumed = LookSAM(target.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, k=3)
        resumed.load_state_dict(saved)
        for p in target.parameters():
            for key in ("g_v", "momentum_buffer"):
                state = resumed.state[p] if key == "g_v" else resumed.base_optimizer.state[p]
                assert (state[key].device, state[key].dtype) == (device, dtype), key


# ---- fp16: a GradScaler skips overflowing steps ------------------------------------------------------------------

FP16 = dict(autocast=lambda: torch.autocast("cpu", dtype=torch.float16))


def fp32_problem(seed=3):
    model, x, y = linear_problem(seed)
    return model.float(), x.float(), y


def poison_first_backward(model):
    """An overflow in the next backward pass only (as a too-large loss scale gives)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad

    return model.weight.register_hook(hook)


def test_fp16_overflow_in_a_full_step_stores_no_direction_and_the_next_step_is_plain():
    model, x, y = fp32_problem()
    twin = copy.deepcopy(model)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    handle = poison_first_backward(model)
    looksam_step(model, opt, x, y, StepContext(group_size=16, scaler=scaler, **FP16))  # full step, overflows
    handle.remove()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and scaler.get_scale() == 2.0**7
    assert all(torch.equal(opt.state[p]["g_v"], torch.zeros_like(p)) for p in model.parameters())  # none stored

    looksam_step(model, opt, x, y, StepContext(group_size=16, scaler=scaler, **FP16))  # cheap step
    # ... is a plain fp16 SGD step from the same weights and scale (before the fix: NaN weights)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    sgd_step(
        twin, plain, x, y, StepContext(group_size=16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**7), **FP16)
    )
    for p, q, b in zip(model.parameters(), twin.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fp16_a_non_finite_direction_is_caught_by_the_overflow_check():
    model, x, y = fp32_problem()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    looksam_step(model, opt, x, y, StepContext(group_size=16, scaler=scaler, **FP16))  # full step
    opt.state[model.weight]["g_v"][0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    looksam_step(model, opt, x, y, StepContext(group_size=16, scaler=scaler, **FP16))  # cheap step: skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**7


def test_fp16_cheap_steps_follow_the_direction_as_in_fp32():
    # The direction is added to the loss-scaled gradient; the update is scale-invariant in g, so fp16 steps match
    # fp32 ones up to fp16 rounding.
    results = []
    for fp16 in (False, True):
        model, x, y = fp32_problem()
        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=3)
        ctx = (
            StepContext(group_size=16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10), **FP16)
            if fp16
            else StepContext(group_size=16)
        )
        for _ in range(3):
            looksam_step(model, opt, x, y, ctx)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
