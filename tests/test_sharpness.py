"""m-sharpness against its closed form on a quadratic, and the grouping it averages over.

Per example i, L_i(w) = 0.5 w^T A w + b_i^T w. A group S has g_S = A w + mean_S b_i and, with
eps_S = rho g_S / ||g_S||, exactly L_S(w + eps_S) - L_S(w) = rho ||g_S|| + 0.5 rho^2 u^T A u, u = g_S / ||g_S||.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.checkpoints import write_run
from helpers.quadratic import mean_output, quadratic_problem
from sam_repro.analysis.loading import file_stem
from sam_repro.analysis.sharpness import disjoint_subsets, group_sharpness, m_sharpness
from sam_repro.cli.analyze import main as analyze

RHOS = [0.0, 0.05, 0.3, 1.0]


def closed_form(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rho: float) -> float:
    g = a @ w + b.mean(0)
    u = g / g.norm()
    return float(rho * g.norm() + 0.5 * rho**2 * u @ a @ u)


@pytest.fixture
def quadratic():
    return quadratic_problem(dim=20, n=24, seed=7)


@pytest.mark.parametrize("m", [1, 4, 6, 24])
def test_m_sharpness_equals_closed_form(quadratic, m):
    model, b = quadratic
    w = model.w.detach().clone()
    report = m_sharpness(model, b, torch.zeros(24), [m], RHOS, criterion=mean_output, seed=11)
    groups = disjoint_subsets(24, m, seed=11)
    for j, rho in enumerate(RHOS):
        expected = sum(closed_form(model.a, w, b[s], rho) for s in groups) / len(groups)
        assert report["sharpness"][0][j] == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert report["groups"] == [24 // m]
    assert report["grad_norm"][0] == pytest.approx(
        sum(float((model.a @ w + b[s].mean(0)).norm()) for s in groups) / len(groups), rel=1e-12
    )
    assert torch.equal(model.w.detach(), w)  # weights restored


def test_m_sharpness_grows_as_m_shrinks_on_the_quadratic(quadratic):
    """Smaller groups have noisier, larger gradients: rho ||g_S|| grows as m falls (the paper's m effect)."""
    model, b = quadratic
    report = m_sharpness(model, b, torch.zeros(24), [1, 4, 24], [0.05], criterion=mean_output)
    values = [row[0] for row in report["sharpness"]]
    assert values[0] > values[1] > values[2]


def test_disjoint_subsets_are_disjoint_nested_and_seeded():
    groups = disjoint_subsets(50, 8, seed=0)
    assert len(groups) == 6 and all(len(g) == 8 for g in groups)
    flat = torch.cat(groups)
    assert len(set(flat.tolist())) == 48  # disjoint; the remainder of 2 left out
    pairs = disjoint_subsets(50, 4, seed=0)
    assert all(
        set(groups[i].tolist()) == set(pairs[2 * i].tolist()) | set(pairs[2 * i + 1].tolist()) for i in range(6)
    )  # m=4 groups nest in m=8 groups
    assert all(torch.equal(x, y) for x, y in zip(groups, disjoint_subsets(50, 8, seed=0)))
    assert not all(torch.equal(x, y) for x, y in zip(groups, disjoint_subsets(50, 8, seed=1)))
    with pytest.raises(ValueError):
        disjoint_subsets(10, 11, seed=0)


def test_first_order_on_a_network_and_eval_mode():
    """On a real classifier, sharpness ~ rho ||g|| for small rho (Taylor), BatchNorm untouched, weights restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    inputs = torch.randn(16, 6, dtype=torch.float64)
    targets = torch.randint(0, 3, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    values, grad_norm = group_sharpness(model, inputs, targets, [1e-4, 1e-3])
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert grad_norm == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-12)
    for rho, value in zip([1e-4, 1e-3], values):
        assert value == pytest.approx(rho * grad_norm, rel=20 * rho)  # error O(rho^2 lambda)
    model.train()
    report = m_sharpness(model, inputs, targets, [4], [0.05])
    assert report["bn_mode"] == "eval" and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sam_analyze_msharpness_end_to_end(tmp_path, fake_dataset, capsys):
    write_run(tmp_path / "sgd", optimizer="sgd", seed=0)
    write_run(tmp_path / "sam", optimizer="sam", seed=1)
    out = tmp_path / "out"
    args = [
        "msharpness",
        str(tmp_path / "sgd"),
        str(tmp_path / "sam"),
        "--subset",
        "32",
        "--m",
        "1",
        "8",
        "32",
        "--rho",
        "0",
        "0.05",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert analyze(args) == 0, capsys.readouterr().err
    settings = "msharpness.train-32.seed0.m1-8-32.rho0-0.05"
    records = [json.loads(p.read_text()) for p in sorted(out.glob(f"*.{settings}.json"))]
    assert len(records) == 2 and len(list(out.glob("*.json"))) == 2
    assert [p.name for p in out.glob("*.png")] == [
        f"{file_stem(tmp_path / 'sgd')}+{file_stem(tmp_path / 'sam')}.{settings}.png"
    ]
    for record in records:
        result = record["result"]
        assert result["m"] == [1, 8, 32] and result["groups"] == [32, 4, 1] and result["stderr"][2] is None
        assert [row[0] for row in result["sharpness"]] == [0.0, 0.0, 0.0]  # rho = 0
        assert all(row[1] > 0 for row in result["sharpness"])  # first-order ascent increases the loss
    # The same command again gives the same numbers (seeded sample and grouping).
    assert analyze(args) == 0
    again = [json.loads(p.read_text())["result"]["sharpness"] for p in sorted(out.glob(f"*.{settings}.json"))]
    assert again == [r["result"]["sharpness"] for r in records]


def test_sam_analyze_rejects_m_larger_than_the_sample(tmp_path, fake_dataset, capsys):
    write_run(tmp_path / "run")
    rc = analyze(
        [
            "msharpness",
            str(tmp_path / "run"),
            "--subset",
            "16",
            "--m",
            "32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --m [32]") and err.count("\n") == 1
