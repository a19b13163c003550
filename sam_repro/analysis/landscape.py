"""Loss landscapes around a trained model: 1D curves and 2D surfaces along filter-normalized random directions.

Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018): a random Gaussian direction d is rescaled
filter by filter, d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||w_{i,j}|| (filter j = slice j along dim 0 of layer i: an output
channel of a convolution, a row of a linear layer), so that the plot does not depend on the scale invariance that
BatchNorm gives each filter and landscapes of different networks (an SGD and a SAM minimum) are comparable. As in
their code (`ignore='biasbn'`), every 1-D parameter (biases, BatchNorm/LayerNorm scale and shift) gets a zero
direction. Buffers (BatchNorm running statistics) stay at the checkpoint's values: the landscape is of the network in
eval mode, as the paper's test error is measured.

Also `interpolation_curve`: the loss along the straight line (1 - alpha) w_a + alpha w_b between two checkpoints of
the same architecture (Goodfellow et al., 2015), BatchNorm statistics interpolated between the two (never
extrapolated).

Plots are matplotlib Figures (no pyplot, so no global backend state): `plot_curves` overlays several 1D curves,
`plot_surface` draws a 2D contour plot.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sam_repro.analysis.loading import evaluate_batches

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random direction per parameter (in `model.parameters()` order), filter-normalized to the weights.

    Drawn on the CPU from `generator` (same seed, same direction on any device), then moved to each parameter's
    device. The 1e-10 guards a zero filter, as in Li et al.'s code.
    """
    directions = []
    for param in model.parameters():
        weights = param.detach()
        if weights.dim() <= 1:
            directions.append(torch.zeros_like(weights))
            continue
        direction = torch.randn(weights.shape, generator=generator, dtype=torch.float32)
        direction = direction.to(device=weights.device, dtype=weights.dtype)
        filter_norms = weights.flatten(1).norm(dim=1)
        direction_norms = direction.flatten(1).norm(dim=1)
        scale = filter_norms / (direction_norms + 1e-10)
        directions.append(direction * scale.view(-1, *([1] * (weights.dim() - 1))))
    return directions


@contextmanager
def _displaced(model: nn.Module):
    """Yield a function that sets the parameters to w + sum_i c_i d_i; the weights are restored on exit."""
    params = list(model.parameters())
    originals = [p.detach().clone() for p in params]
    try:
        yield lambda coefficients, directions: _displace(params, originals, coefficients, directions)
    finally:
        with torch.no_grad():
            for param, weights in zip(params, originals):
                param.copy_(weights)


@torch.no_grad()
def _displace(
    params: Sequence[torch.Tensor],
    originals: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    directions: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Set `params` to their `originals` + sum_i coefficients[i] * directions[i]."""
    for index, (param, weights) in enumerate(zip(params, originals)):
        value = weights.clone()
        for coefficient, direction in zip(coefficients, directions):
            value.add_(direction[index], alpha=coefficient)
        param.copy_(value)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def linspace(start: float, stop: float, points: int) -> list[float]:
    """`points` evenly spaced coordinates, returned as Python floats (what the JSON reports hold)."""
    return torch.linspace(start, stop, points, dtype=torch.float64).tolist()


def loss_curve(
    model: nn.Module,
    batches: Batches,
    direction: Sequence[torch.Tensor],
    alphas: Sequence[float],
    *,
    criterion: Criterion = F.cross_entropy,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and top-1 error (percent, None for non-classifiers) at w + alpha * d for each alpha."""
    losses, errors = [], []
    with _eval_mode(model), _displaced(model) as displace:
        for alpha in tqdm(alphas, desc="landscape 1d", disable=not progress, leave=False):
            displace([alpha], [direction])
            result = evaluate_batches(model, batches, criterion)
            losses.append(result.loss)
            errors.append(result.top1_error)
    return {"alpha": list(alphas), "loss": losses, "error": errors}


def loss_surface(
    model: nn.Module,
    batches: Batches,
    directions: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    criterion: Criterion = F.cross_entropy,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and top-1 error at w + alpha * d1 + beta * d2 on the grid; `loss[i][j]` is at (alphas[j], betas[i])."""
    losses = [[0.0] * len(alphas) for _ in betas]
    errors: list[list[float | None]] = [[None] * len(alphas) for _ in betas]
    bar = tqdm(total=len(alphas) * len(betas), desc="landscape 2d", disable=not progress, leave=False)
    with _eval_mode(model), _displaced(model) as displace:
        for i, beta in enumerate(betas):
            for j, alpha in enumerate(alphas):
                displace([alpha, beta], directions)
                result = evaluate_batches(model, batches, criterion)
                losses[i][j], errors[i][j] = result.loss, result.top1_error
                bar.update()
    bar.close()
    return {"alpha": list(alphas), "beta": list(betas), "loss": losses, "error": errors}


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Batches,
    alphas: Sequence[float],
    *,
    criterion: Criterion = F.cross_entropy,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and top-1 error of (1 - alpha) * w_a + alpha * w_b for each alpha; neither model is modified.

    alpha = 0 is model_a, 1 is model_b; parameters extrapolate outside [0, 1]. Floating-point buffers (BatchNorm
    running statistics) are interpolated with alpha clipped to [0, 1]: they are statistics, not coordinates, and
    extrapolating them would give negative variances. Integer buffers (num_batches_tracked) stay model_a's.
    """
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if state_a.keys() != state_b.keys() or any(state_a[k].shape != state_b[k].shape for k in state_a):
        raise ValueError("interpolation needs two checkpoints of the same architecture")
    parameters = {name for name, _ in model_a.named_parameters()}
    probe = copy.deepcopy(model_a).eval()
    losses, errors = [], []
    for alpha in tqdm(alphas, desc="interpolation", disable=not progress, leave=False):
        mixed = {}
        for key, value in state_a.items():
            if not value.is_floating_point():
                mixed[key] = value
                continue
            weight = alpha if key in parameters else min(max(alpha, 0.0), 1.0)
            mixed[key] = torch.lerp(value, state_b[key].to(value.device), weight)
        probe.load_state_dict(mixed)
        result = evaluate_batches(probe, batches, criterion)
        losses.append(result.loss)
        errors.append(result.top1_error)
    return {"alpha": list(alphas), "loss": losses, "error": errors}


# ----------------------------------------------------------------------------------------------------- plots


def plot_curves(
    curves: Mapping[str, Mapping[str, Any]],
    xlabel: str = r"$\alpha$ (filter-normalized direction)",
    title: str = "Loss along a random direction",
):
    """A Figure overlaying 1D results (`alpha`, `loss`, optional `error`): loss on the left, error on the right."""
    from matplotlib.figure import Figure

    with_error = any(any(e is not None for e in curve.get("error") or []) for curve in curves.values())
    figure = Figure(figsize=(10 if with_error else 5.5, 3.8))
    panels = figure.subplots(1, 2 if with_error else 1, squeeze=False)[0]
    for label, curve in curves.items():
        panels[0].plot(curve["alpha"], curve["loss"], label=label)
        if with_error:
            panels[1].plot(curve["alpha"], curve["error"], label=label)
    panels[0].set_ylabel("loss")
    if with_error:
        panels[1].set_ylabel("top-1 error (%)")
    for axes in panels:
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    figure.suptitle(title)
    return figure


def plot_surface(surface: Mapping[str, Any], title: str = "Loss surface", levels: int = 20):
    """A Figure with contour lines of the 2D loss surface (`alpha`, `beta`, `loss` as from `loss_surface`)."""
    return plot_surfaces({title: surface}, levels=levels)


def plot_surfaces(surfaces: Mapping[str, Mapping[str, Any]], title: str | None = None, levels: int = 20):
    """Contour plots of several 2D loss surfaces side by side (e.g. SGD beside SAM), one panel each, drawn with the
    same contour levels so that a wide minimum shows as widely spaced rings and a sharp one as crowded rings."""
    from matplotlib.figure import Figure

    grids = {}
    for label, surface in surfaces.items():
        alphas = torch.tensor(surface["alpha"], dtype=torch.float64)
        betas = torch.tensor(surface["beta"], dtype=torch.float64)
        grid_a, grid_b = torch.meshgrid(alphas, betas, indexing="xy")
        grids[label] = (grid_a, grid_b, torch.tensor(surface["loss"], dtype=torch.float64))
    losses = torch.cat([loss.flatten() for _, _, loss in grids.values()])
    finite = losses[losses.isfinite()]
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    # Losses grow by orders of magnitude away from a minimum: geometric levels keep contours near the minimum,
    # where SGD and SAM differ, instead of spending them all on the steep rim.
    if 0 < low < high:
        contour_levels = torch.logspace(math.log10(low), math.log10(high), levels, dtype=torch.float64).numpy()
    else:
        contour_levels = levels
    figure = Figure(figsize=(5.2 * len(grids), 4.4), layout="constrained")
    panels = figure.subplots(1, len(grids), squeeze=False)[0]
    for axes, (label, (grid_a, grid_b, loss)) in zip(panels, grids.items()):
        contours = axes.contour(grid_a.numpy(), grid_b.numpy(), loss.numpy(), levels=contour_levels)
        axes.clabel(contours, inline=True, fontsize=6, fmt="%.3g")
        axes.plot([0], [0], marker="*", color="black", markersize=8)  # the trained weights
        axes.set_xlabel(r"$\alpha$ (direction 1)")
        axes.set_ylabel(r"$\beta$ (direction 2)")
        axes.set_aspect("equal")
        axes.set_title(label, fontsize=10)
    figure.colorbar(contours, ax=list(panels), label="loss")
    if title:
        figure.suptitle(title)
    return figure
