"""A loss whose Hessian is known exactly: per example i, 0.5 w^T A w + b_i^T w with A of a chosen spectrum."""

from __future__ import annotations

import torch
from torch import nn

TOP = [40.0, 25.0, 15.0, 9.0, 5.0]


def chosen_spectrum_matrix(dim: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(lambda) Q^T: top five eigenvalues TOP, the rest spread over [-1, 2] (an indefinite bulk)."""
    generator = torch.Generator().manual_seed(seed)
    eigenvalues = torch.tensor(TOP + torch.linspace(-1, 2, dim - len(TOP)).tolist(), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T, eigenvalues


class Quadratic(nn.Module):
    """Per example i: 0.5 w^T A w + b_i^T w, with b_i the input. The Hessian of any mean of these is A."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype, generator=torch.Generator().manual_seed(1)))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + b @ self.w


def quadratic_problem(dim: int, n: int, seed: int) -> tuple[Quadratic, torch.Tensor]:
    """`Quadratic(A)` with A = `chosen_spectrum_matrix(dim)` (the model's buffer `a`), and `n` inputs b_i (standard
    normal, float64, drawn from `seed`): the loss of any mean over the b_i has Hessian A."""
    a, _ = chosen_spectrum_matrix(dim)
    b = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return Quadratic(a), b


def mean_output(outputs: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(-1) - targets).pow(2).mean()
