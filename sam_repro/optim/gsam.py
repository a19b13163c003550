"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022, Algorithm 1).

SAM minimises the perturbed loss f_p(w) = f(w + eps). GSAM also minimises the surrogate gap h = f_p - f, without
disturbing f_p to first order: it ascends f along the part of the clean gradient g orthogonal to the SAM gradient
g_s. Per step t, with the learning rate lr_t:

    rho_t  = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)     clamped to [rho_min, rho_max]
    g      = grad f(w)                     eps = rho_t * g / ||g||
    g_s    = grad f(w + eps)
    g_perp = g - (g . g_s / ||g_s||^2) g_s             g = g_par + g_perp, decomposed w.r.t. g_s
    w      = w - lr_t * (g_s - alpha * g_perp)

rho follows the learning rate (lr_max: the peak, lr_min: the schedule's floor); the clamp keeps rho in range during
a warm-up that starts below lr_min (the paper's formula alone would give rho < rho_min there, even rho < 0).
With rho_max = rho_min and alpha = 0 this is SAM, bit for bit (tests/test_gsam_msam.py).

m-sharpness: every group of m examples (a virtual device) decomposes its own gradients, g_i against g_s,i, and the
engine averages the groups' directions (and the ranks', one all-reduce), as each device of GSAM's reference code
computes its direction before the mean over devices. The L2 term (l2 mode) belongs to f: wd*w is in g, wd*(w+eps)
in g_s.

The engine's SAM step (`sam_repro/engine/step.py`, `sam_step`) runs GSAM unchanged, through SAM's hooks:
  * `first_step(grads=g_i)` sets rho_t from the group's lr, keeps g_i, and sets aside the perturbed gradients that
    earlier groups accumulated in `.grad`, so that the group's perturbed backward lands in an empty `.grad`;
  * `add_perturbed_weight_decay(scale)` only notes the group's scale (its weight times the fp16 loss scale): the
    L2 term at w + eps_i is added at `restore()`, in the same order as SAM adds it;
  * `restore()`, still at w + eps_i: `.grad` <- the set-aside sum + this group's L2 term + its perturbed gradient
    (SAM's sum, in SAM's order of additions) - alpha * scale * g_perp,i; then w + eps_i -> w.
Everything happens on the loss-scaled gradients before fp16's overflow check (the decomposition is linear in the
pair (g, g_s), and g_perp's coefficient is scale-free), with no read of a tensor by the host.
"""

from __future__ import annotations

from typing import cast

import torch

from sam_repro.optim.sam import SAM, _foreach_scale, add_l2_gradient_


class GSAM(SAM):
    def __init__(
        self,
        params,
        base_optimizer,
        rho_max: float = 0.04,
        rho_min: float = 0.02,
        alpha: float = 0.01,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs,
    ) -> None:
        if not 0 <= rho_min <= rho_max:
            raise ValueError(f"GSAM needs 0 <= rho_min <= rho_max (got rho_min={rho_min}, rho_max={rho_max})")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (got {alpha})")
        kwargs.pop("rho", None)  # rho is rho_t, set from the learning rate every step
        super().__init__(params, base_optimizer, rho=rho_max, **kwargs)
        self.rho_max, self.rho_min, self.alpha = rho_max, rho_min, alpha
        self.lr_max = self.param_groups[0]["lr"] if lr_max is None else lr_max  # the peak, before any schedule
        self.lr_min = lr_min
        if self.lr_min > self.lr_max:
            raise ValueError(f"GSAM needs lr_min <= lr_max (got lr_min={self.lr_min}, lr_max={self.lr_max})")
        self._clean: dict[torch.Tensor, torch.Tensor] | None = None  # g_i of the group now perturbed
        self._set_aside: dict[torch.Tensor, torch.Tensor | None] = {}  # `.grad` of the earlier groups
        self._scale: float | torch.Tensor | None = None  # the group's weight (times the loss scale)

    def rho_at(self, lr: float) -> float:
        """rho_t for learning rate `lr`: linear in lr between (lr_min, rho_min) and (lr_max, rho_max), clamped."""
        if self.rho_max == self.rho_min or self.lr_max == self.lr_min:
            return self.rho_max
        rho = self.rho_min + (self.rho_max - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return min(self.rho_max, max(self.rho_min, rho))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scale: float | torch.Tensor = 1.0, grads=None) -> None:
        for group in self.param_groups:
            group["rho"] = self.rho_at(group["lr"])
        self._clean = self._ascent_gradients(grad_scale, grads)
        self._scale = None
        self._set_aside = {}
        if grads is not None:  # `.grad` holds the earlier groups' perturbed gradients, not this group's g
            for group in self.param_groups:
                for p in group["params"]:
                    self._set_aside[p], p.grad = p.grad, None
        super().first_step(zero_grad=zero_grad, grad_scale=grad_scale, grads=grads)

    @torch.no_grad()
    def add_perturbed_weight_decay(self, scale: float | torch.Tensor = 1.0) -> None:
        """Note the group's scale; the L2 term at w + eps is added by `restore()` (still at w + eps)."""
        self._scale = scale

    @torch.no_grad()
    def restore(self) -> None:
        if self._clean is not None:
            self._add_group_direction()
        super().restore()

    @torch.no_grad()
    def _add_group_direction(self) -> None:
        """`.grad` <- set-aside sum + this group's perturbed gradient (with its L2 term) - alpha * k * g_perp."""
        k = 1.0 if self._scale is None else self._scale
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        perturbed = {p: p.grad for p in params if p.grad is not None}  # k * grad L_i(w + eps_i)
        # k * wd * (w + eps_i): the L2 part of the perturbed gradient, for the decomposition
        l2 = {
            p: p.detach() * (group["l2_weight_decay"] * k)
            for group in self.param_groups
            if group.get("l2_weight_decay", 0.0) != 0 and self._scale is not None
            for p in group["params"]
            if p.requires_grad
        }
        summed = {
            p: perturbed[p] + l2[p] if p in l2 and p in perturbed else perturbed.get(p, l2.get(p)) for p in params
        }
        full = {p: t for p, t in summed.items() if t is not None}  # k * g_s,i

        # SAM's sum, in SAM's order: (earlier groups + L2 term at w + eps_i) + perturbed gradient
        for p in params:
            p.grad = self._set_aside.get(p)
        if self._scale is not None:
            add_l2_gradient_(self.param_groups, self._scale)
        for p, g in perturbed.items():
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

        # - alpha * k * g_perp,i, with k * g_perp,i = k g_i - c * k g_s,i and c = (k g_i . k g_s,i) / ||k g_s,i||^2
        # (= g_i . g_s,i / ||g_s,i||^2: the loss scale and the group's weight cancel)
        clean = cast("dict[torch.Tensor, torch.Tensor]", self._clean)  # set by first_step
        scaled = dict(zip(clean, _foreach_scale(list(clean.values()), k)))  # k * g_i
        both = [p for p in full if p in scaled]
        zero = torch.zeros((), device=params[0].device, dtype=torch.float64) if params else None
        if both:
            dot = torch.stack([torch.vdot(scaled[p].flatten(), full[p].flatten()).to(zero) for p in both]).sum()
            square = torch.stack([torch.vdot(full[p].flatten(), full[p].flatten()).to(zero) for p in both]).sum()
            coef = torch.where(square > 0, dot / square, torch.zeros_like(square))
        else:
            coef = cast(torch.Tensor, zero)  # None only without parameters, when the loop below has nothing to do
        for p in dict.fromkeys([*clean, *full]):
            correction = scaled.get(p)
            if p in full:
                projection = full[p] * coef.to(full[p])
                correction = -projection if correction is None else correction - projection
            correction = cast(torch.Tensor, correction)  # p is in clean (so in scaled) or in full
            if p.grad is None:
                p.grad = correction * -self.alpha
            else:
                p.grad.add_(correction, alpha=-self.alpha)
        self._clean, self._set_aside, self._scale = None, {}, None
