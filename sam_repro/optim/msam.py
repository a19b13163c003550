"""Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
arXiv 2401.12033; reference code MarlonBecker/MSAM).

SAM's ascent costs a forward-backward for the gradient that defines eps. MSAM takes the direction from the base
optimizer's momentum buffer v instead, which it already has, so a step costs one forward-backward, as SGD:

    eps = -rho * v / ||v||                 first_step(): w <- w + eps (v: the buffer before this step's update)
    g   = grad f(w + eps)                  the one forward-backward (the engine's, or the closure)
    w   = w - lr * (base update with g)    second_step(): w <- w (restored), the base optimizer steps with g

v is torch's SGD `momentum_buffer` (v <- mu * v + g, w <- w - lr * v): the direction of the last updates, so
-v points back up the valley the trajectory just crossed; Becker et al. perturb along it ("negative momentum").
With AdamW it is `exp_avg`. Before the first step there is no buffer: eps = 0, a plain step. The norm is global over
all parameters, with no epsilon in the denominator (a zero buffer gives eps = 0), as SAM's here.

Weight decay as SAM's: in l2 mode f includes 0.5 * wd * ||w||^2, so g includes wd * (w + eps) (the engine adds it
while perturbed); `weight_decay_mode=base_optimizer` leaves it to the base optimizer at w.

The perturbation does not depend on the batch, so under m-sharpness every group shares it; the groups still get
their own BatchNorm statistics (the engine's `msam_step` is `sgd_step` at w + eps). Its one pass is also the pass
whose BatchNorm running statistics are kept (the reference code stores the perturbed weights between steps and
trains at them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sam_repro.optim.sam import SAM, _foreach_scale

MOMENTUM_STATE = ("momentum_buffer", "exp_avg")  # torch.optim.SGD, torch.optim.AdamW


class MSAM(SAM):
    def __init__(self, params, base_optimizer, rho: float = 3.0, **kwargs) -> None:
        if kwargs.get("adaptive") or kwargs.get("p", 2) != 2:
            raise ValueError("MSAM perturbs along the momentum with the 2-norm (adaptive=False, p=2)")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        """The base optimizer's momentum of `p` (None before its first step)."""
        state = self.base_optimizer.state.get(p, {})
        return next((state[key] for key in MOMENTUM_STATE if state.get(key) is not None), None)

    def _momenta(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The momentum of each of `params`, every one of which has one."""
        return [v for v in map(self.momentum, params) if v is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scale: float | torch.Tensor = 1.0, grads=None) -> None:
        """w <- w - rho * v / ||v||. Gradients play no part (`grad_scale` and `grads` are accepted and ignored);
        `zero_grad` clears `.grad` for the perturbed backward."""
        pairs = [(group, [p for p in group["params"] if self.momentum(p) is not None]) for group in self.param_groups]
        pairs = [(group, params) for group, params in pairs if params]
        norms = [n for _, params in pairs for n in torch._foreach_norm(self._momenta(params), 2)]
        device = self.param_groups[0]["params"][0].device
        norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])) if norms else None
        perturbation_norms: list[torch.Tensor] = []
        if norm is not None:
            inv_norm = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
            for group, params in pairs:
                eps = _foreach_scale(self._momenta(params), -group["rho"] * inv_norm)
                perturbation_norms.extend(n.to(norm) for n in self._perturb(params, eps))
        self.last_grad_norm = norm if norm is not None else torch.zeros((), device=device)  # ||v||
        self.perturbation_norm = (
            torch.linalg.vector_norm(torch.stack(perturbation_norms))
            if perturbation_norms
            else torch.zeros((), device=device)
        )
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, base_step: Callable[[], object] | None = None) -> None:
        """The L2 term at the current point (w + eps; w before the first step, when eps is 0), restore w, and the
        base optimizer's step: the drop-in path (the engine's `msam_step` runs SGD's step at w + eps instead)."""
        self.add_perturbed_weight_decay()
        self.restore()
        (base_step or self.base_step)()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One MSAM step with a closure that does a full forward-backward (no earlier backward is needed)."""
        if closure is None:
            raise RuntimeError("MSAM.step needs a closure that evaluates the loss and calls backward()")
        self.first_step(zero_grad=True)
        loss = torch.enable_grad()(closure)()
        self.second_step()
        return loss
