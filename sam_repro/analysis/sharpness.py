"""The paper's m-sharpness (section 4): sharpness measured over disjoint groups of m examples.

For a sample of n examples cut into n // m disjoint groups S of size m, and a radius rho,

    m-sharpness(rho) = mean over S of  L_S(w + eps_S) - L_S(w),     eps_S = rho * g_S / ||g_S||_2,  g_S = grad L_S(w)

with L_S the mean loss over S. eps_S is the first-order solution of max_{||eps|| <= rho} L_S(w + eps), the one SAM
steps with, so m-sharpness(rho) is the sharpness that SAM with m examples per device penalizes. The paper finds that
it tracks the generalization gap better as m shrinks (Fig. 3).

The sample is shuffled once by `seed` and cut into consecutive groups (`disjoint_subsets`): for m that divide one
another the groups are nested, so values for different m are paired comparisons on the same examples. One gradient
per group serves every rho. The model runs in eval mode (BatchNorm with running statistics: a group of m = 1 has no
batch statistics, and the measurement is of the trained function, not of a training step); the report says so
(`bn_mode`). A group whose gradient is exactly zero contributes 0 (eps is undefined and the loss is flat to first
order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sam_repro.analysis.hessian import bn_mode

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> batch-mean loss


def disjoint_subsets(num_examples: int, m: int, seed: int) -> list[torch.Tensor]:
    """num_examples // m disjoint index groups of size m: a seeded shuffle cut into consecutive pieces.

    The shuffle depends only on (num_examples, seed), so groups for different m are nested when the m divide each
    other. The remainder (num_examples mod m examples) is left out.
    """
    if m < 1 or m > num_examples:
        raise ValueError(f"m must be in [1, {num_examples}] (got {m})")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    groups = num_examples // m
    return list(order[: groups * m].view(groups, m))


def group_sharpness(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    rhos: Sequence[float],
    criterion: Criterion = F.cross_entropy,
) -> tuple[list[float], float]:
    """(L_S(w + eps_S(rho)) - L_S(w) for each rho, ||g_S||) on one group S; the weights are left unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = criterion(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if grad_norm == 0.0:
        return [0.0 for _ in rhos], 0.0
    clean = float(loss.detach())
    originals = [p.detach().clone() for p in params]
    values = []
    try:
        with torch.no_grad():
            for rho in rhos:
                scale = rho / grad_norm
                for p, w, g in zip(params, originals, grads):
                    p.copy_(w + scale * g)
                values.append(float(criterion(model(inputs), targets)) - clean)
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals):
                p.copy_(w)
    return values, grad_norm


def m_sharpness(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ms: Sequence[int],
    rhos: Sequence[float],
    *,
    criterion: Criterion = F.cross_entropy,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """m-sharpness for every (m, rho) on the sample (inputs, targets), as a JSON-ready report.

    `sharpness[i][j]` is the mean over groups for ms[i], rhos[j]; `stderr` its standard error over groups (None
    with a single group); `grad_norm[i]` the mean ||g_S||. Uses `len(inputs) // m` groups for each m.
    """
    num_examples = inputs.shape[0]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    sharpness, stderr, grad_norms, groups_used = [], [], [], []
    total = sum(num_examples // m for m in ms if 1 <= m <= num_examples)
    bar = tqdm(total=total, desc="m-sharpness", disable=not progress, leave=False)
    try:
        for m in ms:
            groups = disjoint_subsets(num_examples, m, seed)
            per_group = torch.zeros(len(groups), len(rhos), dtype=torch.float64)
            norms = []
            for row, indices in enumerate(groups):
                indices = indices.to(inputs.device)
                values, grad_norm = group_sharpness(model, inputs[indices], targets[indices], rhos, criterion)
                per_group[row] = torch.tensor(values, dtype=torch.float64)
                norms.append(grad_norm)
                bar.update()
            count = len(groups)
            sharpness.append(per_group.mean(0).tolist())
            stderr.append((per_group.std(0, correction=1) / math.sqrt(count)).tolist() if count > 1 else None)
            grad_norms.append(sum(norms) / count)
            groups_used.append(count)
    finally:
        bar.close()
        model.train(was_training)
    return {
        "m": list(ms),
        "rho": list(rhos),
        "sharpness": sharpness,
        "stderr": stderr,
        "grad_norm": grad_norms,
        "groups": groups_used,
        "num_examples": num_examples,
        "seed": seed,
        "perturbation": "first-order eps_S = rho * g_S / ||g_S||_2 per group",
        "bn_mode": bn_mode(model),
        "wall_time_s": time.perf_counter() - start,
    }


def plot_m_sharpness(reports: dict[str, dict[str, Any]]):
    """A Figure with one panel per run: m-sharpness vs rho, one line per m (with standard-error bars)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(reports), 3.6))
    axes_list = figure.subplots(1, len(reports), sharey=True, squeeze=False)[0]
    for axes, (label, report) in zip(axes_list, reports.items()):
        for m, values, errors in zip(report["m"], report["sharpness"], report["stderr"]):
            axes.errorbar(report["rho"], values, yerr=errors, marker="o", markersize=3, capsize=2, label=f"m={m}")
        axes.set_xlabel(r"$\rho$")
        axes.set_title(label, fontsize=9)
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(r"m-sharpness  $L_S(w+\epsilon_S)-L_S(w)$")
    axes_list[0].legend(fontsize=8)
    return figure
