"""Ghost BatchNorm in one pass (sam_repro/engine/step.py: GhostBatchNorm, sgd_step) against a pass per group.

The reference is the loop sgd_step ran before: one forward-backward per group of m, each group's running-statistic
update taken from the same starting point and the updates averaged. In float64 the one-pass step must give the
same parameters, running statistics, loss and accuracy to 1e-12, for any torch BatchNorm layer (1d on (N, C) and
(N, C, L), 2d, 3d, affine or not, momentum None, no running statistics) and for the project's models.
"""

import copy

import pytest
import torch
from torch import nn

import sam_repro.engine.step as step_module
from sam_repro.engine.step import GhostBatchNorm, StepContext, looksam_step, sgd_step
from sam_repro.models import create_model
from sam_repro.optim.looksam import LookSAM


class AllNorms(nn.Module):
    """Every kind of torch BatchNorm layer on the way to 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv3d(2, 3, 2)
        self.bn3 = nn.BatchNorm3d(3, momentum=None)  # cumulative average: uses num_batches_tracked
        self.conv2 = nn.Conv2d(3, 4, 2)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.bn2_free = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics only
        self.bn1_seq = nn.BatchNorm1d(4)  # (N, C, L)
        self.fc = nn.Linear(4 * 4, 6)
        self.bn1 = nn.BatchNorm1d(6, momentum=0.3)  # (N, C)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.tanh(self.bn3(self.conv3(x)))  # (N, 3, 3, 4, 4)
        x = x.mean(2)
        x = torch.tanh(self.bn2_free(self.bn2(self.conv2(x))))  # (N, 4, 3, 3)
        x = self.bn1_seq(x.flatten(2)[..., :4])  # (N, 4, 4)
        return self.head(torch.relu(self.bn1(self.fc(x.flatten(1)))))


def sgd_for(model, wd=1e-2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for g in opt.param_groups:
        g["l2_weight_decay"] = wd
    return opt


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def loop_sgd_step(model, opt, x, y, m):
    """The former sgd_step: a forward-backward per group, running statistics averaged over the groups' updates."""
    opt.zero_grad(set_to_none=True)
    layers = bn_layers(model)
    start = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone()) for b in layers]
    sums = [[torch.zeros_like(b.running_mean), torch.zeros_like(b.running_var)] for b in layers]
    groups = list(zip(x.split(m), y.split(m)))
    loss_sum, correct = 0.0, 0
    for xg, yg in groups:
        logits = model(xg)
        loss = nn.functional.cross_entropy(logits, yg)
        (loss * len(xg) / len(x)).backward()
        with torch.no_grad():
            for b, (mean0, var0, n0), s in zip(layers, start, sums):
                s[0] += b.running_mean
                s[1] += b.running_var
                b.running_mean.copy_(mean0)
                b.running_var.copy_(var0)
                b.num_batches_tracked.copy_(n0)
        loss_sum += loss.detach() * len(xg)
        correct += int((logits.argmax(1) == yg).sum())
    with torch.no_grad():
        for b, (_, _, n0), s in zip(layers, start, sums):
            b.running_mean.copy_(s[0] / len(groups))
            b.running_var.copy_(s[1] / len(groups))
            b.num_batches_tracked.copy_(n0 + 1)
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad.add_(p, alpha=group["l2_weight_decay"])
    opt.step()
    return loss_sum, correct


def assert_same(a: nn.Module, b: nn.Module):
    for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        if t.is_floating_point():
            torch.testing.assert_close(t, u, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert torch.equal(t, u), name


def data(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("m, micro", [(4, None), (2, None), (4, 8), (2, 4), (16, None)])
def test_one_pass_sgd_step_equals_a_pass_per_group(m, micro):
    torch.manual_seed(0)
    model = AllNorms().double()
    ref = copy.deepcopy(model)
    opt, ref_opt = sgd_for(model), sgd_for(ref)
    for s in range(3):  # momentum and running statistics carried over steps
        x, y = data(16, (2, 4, 5, 5), seed=s)
        stats = sgd_step(model, opt, x, y, StepContext(group_size=m, micro_batch=micro))
        loss_sum, correct = loop_sgd_step(ref, ref_opt, x, y, m)
        assert float(stats.loss_sum) == pytest.approx(float(loss_sum), rel=1e-6)  # the step sums in float32
        assert int(stats.correct) == correct
        assert_same(model, ref)


def test_one_pass_equals_the_loop_on_a_project_resnet():
    model = create_model("resnet8", num_classes=3).double()
    ref = copy.deepcopy(model)
    opt, ref_opt = sgd_for(model, wd=5e-4), sgd_for(ref, wd=5e-4)
    x, y = data(8, (3, 16, 16))
    sgd_step(model, opt, x, y, StepContext(group_size=2))
    loop_sgd_step(ref, ref_opt, x, y, 2)
    assert_same(model, ref)


def test_one_pass_covers_timm_batchnorm_act():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(4, act_layer=nn.ReLU), nn.Flatten(), nn.LazyLinear(3)
    ).double()
    x, y = data(8, (3, 6, 6))
    model(x[:2])  # materialise the lazy layer
    ref = copy.deepcopy(model)
    opt, ref_opt = sgd_for(model), sgd_for(ref)
    sgd_step(model, opt, x, y, StepContext(group_size=4))
    loop_sgd_step(ref, ref_opt, x, y, 4)
    assert_same(model, ref)


def test_ghost_batch_norm_normalises_each_group_with_its_own_statistics():
    bn = nn.BatchNorm2d(3).double().train()
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64) * torch.arange(1, 13, dtype=torch.float64).view(12, 1, 1, 1)
    with GhostBatchNorm(4):
        out = bn(x)
    for chunk in out.split(4):  # zero mean, unit (biased) variance per group and channel
        torch.testing.assert_close(chunk.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(
            chunk.var((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0
        )
    with GhostBatchNorm(4):
        bn.eval()
        torch.testing.assert_close(
            bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        )


def test_noisy_models_keep_a_pass_per_group(monkeypatch):
    # Dropout draws per group (keyed by the global group index): one pass would draw other masks.
    seen = []
    real = step_module._loss
    monkeypatch.setattr(step_module, "_loss", lambda model, x, *a: seen.append(len(x)) or real(model, x, *a))
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    sgd_step(model, sgd_for(model), x, y, StepContext(group_size=4))
    assert seen == [4, 4]
    seen.clear()
    model[2].p = 0.0
    sgd_step(model, sgd_for(model), x, y, StepContext(group_size=4))
    assert seen == [8]
    seen.clear()
    sgd_step(model, sgd_for(model), x, y, StepContext(group_size=2, micro_batch=4))  # accumulate = 2
    assert seen == [4, 4]


def test_looksam_cheap_steps_equal_the_loop(monkeypatch):
    def run(one_pass):
        monkeypatch.setattr(step_module, "one_pass_ghost_batch_norm", lambda model: one_pass)
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=3).double()
        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=2, lr=0.05, momentum=0.9, weight_decay=1e-2)
        for s in range(4):  # full, cheap, full, cheap
            x, y = data(8, (3, 8, 8), seed=s)
            looksam_step(model, opt, x, y, StepContext(group_size=4))
        return model

    assert_same(run(True), run(False))
