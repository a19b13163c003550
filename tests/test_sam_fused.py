"""SAM's elementwise work in foreach kernels (sam_repro/optim/sam.py) against the per-tensor loop it replaced.

The reference below is the loop implementation as it was, kept here verbatim in substance: the fused code must
give the same eps, w + eps, norms, L2 gradient and restored w, to 1e-12 in float64.
"""

import copy

import pytest
import torch
from torch import nn

from sam_repro.optim.sam import SAM


@torch.no_grad()
def loop_first_step(opt: SAM, grad_scale=1.0):
    """The former SAM.first_step: one small kernel per tensor. Returns (w + eps, ||g||, ||eps||), leaves w alone."""
    scaled = torch.is_tensor(grad_scale) or grad_scale != 1.0
    inv = 1.0 / grad_scale
    ascent = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad * inv if scaled else p.grad
            if group["l2_weight_decay"] != 0:
                g = g.add(p, alpha=group["l2_weight_decay"])
            ascent[p] = g
    norms = []
    for group in opt.param_groups:
        for p in group["params"]:
            if p in ascent:
                g = ascent[p] * (p.abs() + group["eta"]) if group["adaptive"] else ascent[p]
                norms.append(torch.linalg.vector_norm(g, 2, dtype=torch.promote_types(g.dtype, torch.float32)))
    norm = torch.linalg.vector_norm(torch.stack(norms), 2)
    inv_norm = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    eps_sq = torch.zeros_like(norm)
    perturbed = {}
    for group in opt.param_groups:
        for p in group["params"]:
            g = ascent.get(p)
            if g is None:
                continue
            if opt.p == 2:
                e = g * (group["rho"] * inv_norm).to(g)
                if group["adaptive"]:
                    e = e * (p.abs() + group["eta"]).pow(2)
            else:
                e = torch.sign(g) * group["rho"]
                if group["adaptive"]:
                    e = e * (p.abs() + group["eta"])
            perturbed[p] = p.detach() + e
            eps_sq = eps_sq + e.pow(2).sum()
    return perturbed, norm, eps_sq.sqrt()


@torch.no_grad()
def loop_l2(param_groups, scale):
    """The former add_l2_gradient_, returning the new gradients instead of writing them."""
    out = {}
    for group in param_groups:
        wd = group.get("l2_weight_decay", 0.0)
        for p in group["params"]:
            if wd == 0 or not p.requires_grad:
                continue
            out[p] = p.detach() * (wd * scale) if p.grad is None else p.grad + p.detach() * (wd * scale)
    return out


def model64():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 2)).double()


def make(model, p, adaptive, wd):
    decay = [q for n, q in model.named_parameters() if n.endswith("weight")]
    rest = [q for n, q in model.named_parameters() if not n.endswith("weight")]
    groups = [
        {"params": decay, "adaptive": adaptive, "eta": 0.01},
        {"params": rest, "rho": 0.03, "adaptive": False, "weight_decay": 0.0},
    ]
    return SAM(groups, torch.optim.SGD, rho=0.2, p=p, weight_decay=wd, lr=0.1)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [2, float("inf")])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("grad_scale", [1.0, 8.0, "tensor"])
def test_fused_first_step_restore_and_l2_equal_the_loop(p, adaptive, grad_scale):
    model = model64()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 2, (6,))
    scale = torch.tensor(4.0, dtype=torch.float64) if grad_scale == "tensor" else grad_scale
    nn.functional.cross_entropy(model(x), y).mul(scale).backward()
    model[4].bias.grad = None  # a parameter without a gradient: left out of eps and the norm
    opt = make(model, p, adaptive, wd=5e-3)
    start = [q.detach().clone() for q in model.parameters()]
    expected, norm, perturbation_norm = loop_first_step(opt, scale)

    opt.first_step(grad_scale=scale)
    for q in model.parameters():
        close(q.detach(), expected.get(q, q).detach())
    assert torch.equal(model[4].bias.detach(), start[-1])
    close(opt.last_grad_norm, norm)
    close(opt.perturbation_norm, perturbation_norm)

    nn.functional.cross_entropy(model(x), y).backward()  # the perturbed gradient accumulates
    for weight in (0.5, torch.tensor(0.25, dtype=torch.float64)):
        wanted = loop_l2(opt.param_groups, weight)
        opt.add_perturbed_weight_decay(weight)
        for q, g in wanted.items():
            close(q.grad, g)
    opt.restore()
    for q, s in zip(model.parameters(), start):
        assert torch.equal(q.detach(), s)  # bit for bit
    assert not opt.is_perturbed
    opt.restore()  # idempotent
    for q, s in zip(model.parameters(), start):
        assert torch.equal(q.detach(), s)


def test_fused_sam_trajectory_equals_the_loop_over_steps():
    # Several full SAM steps (momentum, the saved-w buffers reused every step) against the loop reference.
    model = model64()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    ref_sam = SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, weight_decay=1e-2)  # only for the groups
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

        nn.functional.cross_entropy(ref(x), y).backward()
        perturbed, _, _ = loop_first_step(ref_sam)
        saved = [q.detach().clone() for q in ref.parameters()]
        with torch.no_grad():
            for q in ref.parameters():
                q.copy_(perturbed[q])
        ref_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for q, s in zip(ref.parameters(), saved):
                q.grad.add_(q.detach(), alpha=1e-2)  # L2 at w + eps
                q.copy_(s)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), ref.parameters()):
        close(a.detach(), b.detach())
