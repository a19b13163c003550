"""Top Hessian eigenvalues of the training loss: the paper's lambda_max and lambda_max / lambda_5 (section 4).

The paper measured the spectrum of a WideResNet40-10 without BatchNorm by Lanczos (Ghorbani et al., 2019) and reports
lambda_max ~ 24 for SGD vs 1.0 for SAM, lambda_max / lambda_5 up to 11.4 vs 2.6 (docs/paper_reference.md section 1.5).

Pieces, each usable alone:
  * `HessianOperator`: v -> H v for the loss averaged over a fixed data sample, by double backward
    (Pearlmutter's trick through `torch.autograd.grad`), one chunk at a time so memory is bounded by the chunk, and
    the chunk losses weighted by their sizes so the operator is exactly the Hessian of the sample mean;
  * `lanczos`: k extreme eigenvalues from a Krylov space with full reorthogonalization (every new vector is
    projected against all previous ones, twice, which keeps the basis orthogonal in float32 and avoids the spurious
    copies of converged eigenvalues that plain Lanczos produces);
  * `power_iteration`: the same by power iteration with projection deflation (a slower, independent cross-check);
  * `hessian_spectrum`: the report the CLI writes.

Conventions: eigenvalues are of the data loss (mean cross-entropy), weight decay excluded (its L2 term would add
weight_decay to every eigenvalue). The model runs in eval mode: dropout off, and BatchNorm, which the paper's network
did not have, normalizes with its running statistics, so the operator is a fixed symmetric matrix
(`bn_mode: "eval"`; `"absent"` when the model has no BatchNorm). Lanczos returns the largest *algebraic*
eigenvalues; power iteration finds the largest in *magnitude* (the same near a minimum, where the top of the spectrum
is positive and dominates).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> batch-mean loss
MatVec = Callable[[torch.Tensor], torch.Tensor]


def bn_mode(model: nn.Module) -> str:
    """`"eval"` when the model has BatchNorm (analysed with running statistics), `"absent"` otherwise."""
    has_bn = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    return "eval" if has_bn else "absent"


class HessianOperator:
    """Hessian-vector products of the mean `criterion` over `chunks`, w.r.t. the model's trainable parameters.

    Vectors are flat, in `model.parameters()` order. The model must be in eval mode (the caller's job:
    `hessian_spectrum` does it), otherwise BatchNorm statistics and dropout would make H v depend on the call.
    """

    def __init__(
        self,
        model: nn.Module,
        chunks: Sequence[tuple[torch.Tensor, torch.Tensor]],
        criterion: Criterion = F.cross_entropy,
    ) -> None:
        self.model = model
        self.chunks = chunks
        self.criterion = criterion
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.num_examples = sum(inputs.shape[0] for inputs, _ in chunks)
        if self.num_examples == 0:
            raise ValueError("no examples to compute the Hessian on")
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.matvecs = 0

    def _flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                (t if t is not None else torch.zeros(n, device=self.device, dtype=self.dtype)).reshape(-1)
                for t, n in zip(tensors, self.numels)
            ]
        )

    def _unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(vector.split(self.numels), self.shapes)]

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """H v, accumulated chunk by chunk: H = sum_c (n_c / N) * Hessian of the chunk-mean loss."""
        directions = self._unflatten(vector)
        product = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        for inputs, targets in self.chunks:
            weight = inputs.shape[0] / self.num_examples
            loss = self.criterion(self.model(inputs), targets) * weight
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            grad_dot_v = sum((g * v).sum() for g, v in zip(grads, directions) if g is not None)
            if not torch.is_tensor(grad_dot_v) or not grad_dot_v.requires_grad:
                continue  # the loss is at most linear in the parameters on this chunk: zero curvature
            product += self._flatten(torch.autograd.grad(grad_dot_v, self.params, allow_unused=True))
        self.matvecs += 1
        return product

    @torch.no_grad()
    def loss(self) -> float:
        """The sample-mean loss at the current weights (the point whose curvature is measured)."""
        return sum(float(self.criterion(self.model(x), y)) * x.shape[0] for x, y in self.chunks) / self.num_examples


@dataclass
class Spectrum:
    """Eigenvalue estimates, largest first, with `residuals[i]` ~ ||H v_i - lambda_i v_i|| for the unit eigenvector
    estimate v_i (measured by power iteration; Lanczos' Krylov estimate, floored at the working precision)."""

    eigenvalues: list[float]
    residuals: list[float]
    method: str
    iterations: int
    matvecs: int

    @property
    def lambda_max(self) -> float:
        return self.eigenvalues[0]

    def ratio(self, k: int = 5) -> float | None:
        """lambda_max / lambda_k (the paper's lambda_max / lambda_5); None with fewer than k eigenvalues or
        lambda_k = 0 (JSON has no infinity)."""
        if len(self.eigenvalues) < k or self.eigenvalues[k - 1] == 0:
            return None
        return self.lambda_max / self.eigenvalues[k - 1]


def _start_vector(dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Drawn on the CPU so the start (and hence the result) is the same on every device.
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (vector / vector.norm()).to(device=device, dtype=dtype)


def _orthogonalize(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the span of the orthonormal rows of `basis` from `vector`; two passes ("twice is enough", Kahan)."""
    if basis.shape[0] == 0:
        return vector
    for _ in range(2):
        vector = vector - basis.T @ (basis @ vector)
    return vector


def lanczos(
    matvec: MatVec,
    dim: int,
    k: int = 5,
    iterations: int | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Spectrum:
    """The k largest eigenvalues of the symmetric operator `matvec` by Lanczos with full reorthogonalization.

    `iterations` Krylov steps (default max(3k, 30), at most `dim`), each one product. Memory: the basis,
    `iterations` vectors of `dim` entries. The tridiagonal T = Q^T H Q is diagonalized in float64; the residual of
    Ritz pair i is |beta_m * s_i[-1]| (no extra product). When the Krylov space is exhausted (beta ~ 0), Lanczos
    restarts from a random vector orthogonal to the basis, so eigenvalues outside that space (or further copies of a
    repeated one) can still be found.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    steps = min(iterations or max(3 * k, 30), dim)
    if steps < k:
        raise ValueError(f"{steps} Lanczos iterations cannot give {k} eigenvalues")
    basis = torch.zeros(steps, dim, device=device, dtype=dtype)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]; 0 after a restart
    vector = _start_vector(dim, seed, torch.device(device), dtype)
    scale = 0.0  # running estimate of ||H||, for the breakdown threshold
    residual_norm = 0.0
    restarts = 0
    for j in tqdm(range(steps), desc="lanczos", disable=not progress, leave=False):
        basis[j] = vector
        product = matvec(vector)
        alphas.append(float(vector @ product))
        # Projecting against the whole basis subsumes the three-term recurrence (alpha q_j + beta q_{j-1}) and
        # repairs the loss of orthogonality that rounding causes once Ritz values converge.
        residual = _orthogonalize(product, basis[: j + 1])
        residual_norm = float(residual.norm())
        scale = max(scale, abs(alphas[-1]) + residual_norm)
        if j + 1 == steps:
            break
        if residual_norm <= 100 * torch.finfo(dtype).eps * max(scale, 1e-30):
            # Invariant subspace: its Ritz values are exact. Continue in the orthogonal complement.
            restarts += 1
            vector = _orthogonalize(_start_vector(dim, seed + restarts, torch.device(device), dtype), basis[: j + 1])
            vector = vector / vector.norm()
            betas.append(0.0)
        else:
            vector = residual / residual_norm
            betas.append(residual_norm)
    m = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
    order = ritz_values.argsort(descending=True)[:k]
    # The Krylov estimate |beta_m s_i[-1]| ignores rounding; no residual is smaller than eps * ||H||.
    floor = torch.finfo(dtype).eps * scale
    return Spectrum(
        eigenvalues=[float(v) for v in ritz_values[order]],
        residuals=[max(abs(residual_norm * float(ritz_vectors[-1, i])), floor) for i in order],
        method="lanczos",
        iterations=m,
        matvecs=m,
    )


def power_iteration(
    matvec: MatVec,
    dim: int,
    k: int = 5,
    max_iterations: int = 100,
    tol: float = 1e-3,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Spectrum:
    """The k largest-magnitude eigenvalues by power iteration, deflating each found eigenvector by projection.

    Eigenvalue i iterates v <- P H P v / ||.|| with P the projector onto the complement of the eigenvectors found
    before, and stops when the residual ||P H P v - lambda v|| <= tol * |lambda| (the eigenvalue error is then of
    order tol^2 |lambda| / gap) or after `max_iterations` products. Convergence goes as |lambda_{i+1} / lambda_i|
    per step: slow for close eigenvalues, which is why Lanczos is the default.
    """
    found = torch.zeros(0, dim, device=device, dtype=dtype)
    eigenvalues: list[float] = []
    residuals: list[float] = []
    total = 0
    bar = tqdm(total=k * max_iterations, desc="power iteration", disable=not progress, leave=False)
    for i in range(k):
        vector = _orthogonalize(_start_vector(dim, seed + i, torch.device(device), dtype), found)
        vector = vector / vector.norm()
        eigenvalue, residual = 0.0, math.inf
        for _ in range(max_iterations):
            product = _orthogonalize(matvec(vector), found)
            total += 1
            bar.update()
            eigenvalue = float(vector @ product)  # Rayleigh quotient of the unit vector
            residual = float((product - eigenvalue * vector).norm())
            norm = product.norm()
            if norm == 0:
                break  # the deflated operator vanishes on this vector: eigenvalue 0
            vector = product / norm
            if residual <= tol * abs(eigenvalue):
                break
        eigenvalues.append(eigenvalue)
        residuals.append(residual)
        found = torch.cat([found, vector.unsqueeze(0)])
    bar.close()
    return Spectrum(eigenvalues, residuals, method="power_iteration", iterations=total, matvecs=total)


def hessian_spectrum(
    model: nn.Module,
    chunks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    k: int = 5,
    method: str = "lanczos",
    iterations: int | None = None,
    tol: float = 1e-3,
    *,
    criterion: Criterion = F.cross_entropy,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-k Hessian eigenvalues of the sample-mean loss at the model's weights, as a JSON-ready report.

    `chunks` are (inputs, targets) batches on the model's device; together they are the fixed sample. `iterations`
    is the number of Lanczos steps or the per-eigenvalue cap of power iteration.
    """
    was_training = model.training
    model.eval()
    try:
        operator = HessianOperator(model, chunks, criterion)
        start = time.perf_counter()
        if method == "lanczos":
            spectrum = lanczos(
                operator,
                operator.dim,
                k,
                iterations,
                seed=seed,
                device=operator.device,
                dtype=operator.dtype,
                progress=progress,
            )
        elif method == "power":
            spectrum = power_iteration(
                operator,
                operator.dim,
                k,
                iterations or 100,
                tol,
                seed=seed,
                device=operator.device,
                dtype=operator.dtype,
                progress=progress,
            )
        else:
            raise ValueError(f"method must be lanczos or power (got {method!r})")
        wall_time = time.perf_counter() - start
        loss = operator.loss()
    finally:
        model.train(was_training)
    return {
        "lambda_max": spectrum.lambda_max,
        "lambda_max_over_lambda_5": spectrum.ratio(5),
        **asdict(spectrum),
        "k": k,
        "loss": loss,
        "loss_function": "mean cross-entropy over the sample, weight decay excluded"
        if criterion is F.cross_entropy
        else getattr(criterion, "__name__", repr(criterion)),
        "num_examples": operator.num_examples,
        "num_parameters": operator.dim,
        "bn_mode": bn_mode(model),
        "wall_time_s": wall_time,
    }


def plot_spectra(spectra: dict[str, Sequence[float]], title: str = "Top Hessian eigenvalues"):
    """A Figure with eigenvalue i vs i on a log scale, one marker series per run (e.g. SGD and SAM side by side)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5.5, 3.8))
    axes = figure.add_subplot()
    for label, eigenvalues in spectra.items():
        ranks = range(1, len(eigenvalues) + 1)
        axes.plot(ranks, eigenvalues, marker="o", label=f"{label}: " + r"$\lambda_{max}$" + f"={eigenvalues[0]:.3g}")
    if all(v > 0 for values in spectra.values() for v in values):
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("eigenvalue rank i")
    axes.set_ylabel(r"$\lambda_i$ of the training-loss Hessian")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure
