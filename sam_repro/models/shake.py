"""Stochastic residual regularisers: Shake-Shake (Gastaldi 2017) and ShakeDrop (Yamada et al. 2018).

Both scale a residual branch by one random coefficient in the forward pass and by an independent one in the
backward pass, per example. Three properties matter for SAM (docs/paper_reference.md section 2.2, "Stochastic layers"):

  * Replayable noise. SAM runs two forward passes per step and the official code feeds both the same PRNG key, so
    both see the same coefficients. Here every coefficient comes from torch's global generator on the input's device
    (`torch.rand(..., device=x.device)`); restoring that generator's state before the second pass replays the draws.
    Each layer draws the same amount of randomness whatever its settings, so `true_gradient` cannot shift the
    random stream of the layers after it.
  * `true_gradient`. The official code (commit c2b0a5f, "true gradient fix") computes SAM's *ascent* gradient with
    the backward coefficient equal to the forward one, i.e. the true gradient of the sampled network.
    `set_true_gradient(model, flag)` switches every such layer; the engine sets it around the first pass.
  * Deterministic evaluation: in eval mode the branch is scaled by the expected forward coefficient.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _Shake(torch.autograd.Function):
    """y = forward_coefficient * x, with dL/dx = backward_coefficient * dL/dy (coefficients broadcast per example)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_coefficient: torch.Tensor, backward_coefficient: torch.Tensor):
        ctx.save_for_backward(backward_coefficient)
        return x * forward_coefficient

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (backward_coefficient,) = ctx.saved_tensors
        return grad_output * backward_coefficient, None, None


def shake(x: torch.Tensor, forward_coefficient: torch.Tensor, backward_coefficient: torch.Tensor) -> torch.Tensor:
    return _Shake.apply(x, forward_coefficient.to(x.dtype), backward_coefficient.to(x.dtype))


def _per_example_uniform(count: int, x: torch.Tensor) -> torch.Tensor:
    """`count` independent U[0, 1) draws per example, shaped to broadcast over (C, H, W).

    Drawn in float32 (a bfloat16 uniform has only 256 levels) from the global generator of `x`'s device.
    """
    return torch.rand(count, x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=torch.float32)


class ShakeShake(nn.Module):
    """Mix two residual branches: alpha*a + (1-alpha)*b forward, gradients beta*g and (1-beta)*g backward.

    alpha, beta ~ U[0, 1], independent per example.
    """

    def __init__(self):
        super().__init__()
        self.true_gradient = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return 0.5 * (a + b)
        alpha, beta = _per_example_uniform(2, a)
        if self.true_gradient:
            beta = alpha
        return shake(a, alpha, beta) + shake(b, 1.0 - alpha, 1.0 - beta)


class ShakeDrop(nn.Module):
    """Scale a residual branch by b + alpha - b*alpha forward and b + beta - b*beta backward (Yamada et al., eq. 6).

    b ~ Bernoulli(keep_prob) keeps the branch unchanged; otherwise it is scaled by alpha ~ U[alpha_range] forward and
    beta ~ U[beta_range] backward. Evaluation uses the expectation keep_prob + E[alpha] (1 - keep_prob).
    """

    def __init__(
        self,
        keep_prob: float,
        alpha_range: tuple[float, float] = (-1.0, 1.0),
        beta_range: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        if not 0.0 <= keep_prob <= 1.0:
            raise ValueError(f"ShakeDrop keep_prob must lie in [0, 1] (got {keep_prob})")
        self.keep_prob = float(keep_prob)
        self.alpha_range = tuple(float(v) for v in alpha_range)
        self.beta_range = tuple(float(v) for v in beta_range)
        self.true_gradient = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            expected_alpha = 0.5 * (self.alpha_range[0] + self.alpha_range[1])
            return x * (self.keep_prob + expected_alpha * (1.0 - self.keep_prob))
        u_gate, u_alpha, u_beta = _per_example_uniform(3, x)
        gate = (u_gate < self.keep_prob).to(torch.float32)
        alpha = self.alpha_range[0] + (self.alpha_range[1] - self.alpha_range[0]) * u_alpha
        beta = self.beta_range[0] + (self.beta_range[1] - self.beta_range[0]) * u_beta
        forward_coefficient = gate + (1.0 - gate) * alpha
        backward_coefficient = forward_coefficient if self.true_gradient else gate + (1.0 - gate) * beta
        return shake(x, forward_coefficient, backward_coefficient)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}, alpha_range={self.alpha_range}, beta_range={self.beta_range}"


def set_true_gradient(model: nn.Module, flag: bool) -> int:
    """Make every Shake-Shake/ShakeDrop layer of `model` back-propagate with its forward coefficient (`flag=True`)
    or with its independent backward coefficient (`flag=False`, the regulariser as published).

    Returns the number of layers switched (0 for models without stochastic layers, where the call is a no-op).
    """
    layers = [m for m in model.modules() if isinstance(m, (ShakeShake, ShakeDrop))]
    for layer in layers:
        layer.true_gradient = bool(flag)
    return len(layers)
