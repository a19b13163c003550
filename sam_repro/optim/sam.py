"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, Algorithm 1) as a wrapper around any torch optimizer.

The optimizer knows parameters and gradients only. Algorithm 1, line by line:

    g   = grad L_B(w)                       # first forward-backward (the caller's)
    eps = rho * g / ||g||_2                 # first_step(): w <- w + eps
    g_s = grad L_B(w + eps)                 # second forward-backward (the caller's, or the closure)
    w   = w - lr * g_s                      # second_step(): w <- w (restored), base optimizer steps with g_s

Drop-in API, as the common PyTorch port:

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)

Paper semantics by default, every deviation a named option:
  * the norm is global over all parameters, with no epsilon in the denominator (a zero gradient gives eps = 0);
    `p=inf` gives eps = rho * sign(g), the paper's p = infinity ablation;
  * `weight_decay_mode="l2"` (default): weight decay is the official code's L2 term 0.5*wd*||w||^2 in the loss, so
    wd*w is part of g (it shapes eps) and wd*(w+eps) is part of the gradient at the perturbed point; the base
    optimizer gets weight_decay=0. `weight_decay_mode="base_optimizer"` hands weight decay to the base optimizer,
    which applies it at w, after the ascent and outside eps (what the common port does);
  * `adaptive=True` is ASAM (Kwon et al., 2021): eps = rho * T^2 g / ||T g|| with T = |w| + eta, on the parameter
    groups whose `adaptive` is true (the engine puts biases in a group with adaptive=False, as ASAM's code scales
    only tensors named `weight`).

`rho`, `adaptive`, `eta` and `weight_decay` can be set per parameter group. `param_groups` is shared with the base
optimizer, so learning-rate schedulers work on the SAM object directly.

Hooks for an engine that splits a batch into groups of m examples (m-sharpness), each with its own eps, and
accumulates the groups' perturbed gradients in `.grad` (`sam_repro/engine/step.py`):

    for each group i:
        g_i = torch.autograd.grad(loss_i, params)        # clean gradient, `.grad` untouched
        first_step(grads=dict(zip(params, g_i)), grad_scale=S)   # w <- w + eps_i (S: an fp16 loss scale)
        add_perturbed_weight_decay(n_i / n * S)          # L2 gradient at w + eps_i into `.grad` (l2 mode)
        (n_i / n * S * perturbed_loss_i).backward()      # accumulates into `.grad`
        restore()                                        # w + eps_i -> w
    second_step(base_step=...)                           # w - lr * g_s: the engine's unscale, clip and step
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

WEIGHT_DECAY_MODES = ("l2", "base_optimizer")

TensorList = list[torch.Tensor] | tuple[torch.Tensor, ...]  # what the torch._foreach_* functions take and return


@torch.no_grad()
def add_l2_gradient_(param_groups: list[dict], scale: float | torch.Tensor = 1.0) -> None:
    """`.grad += scale * l2_weight_decay * w` for every parameter (creating `.grad` if absent).

    The gradient of the official code's L2 term 0.5*wd*||w||^2; used by SAM at w + eps and by the engine for
    plain SGD in l2 mode (before clipping, as the official code clips the full gradient). `scale` may be a 0-dim
    tensor on the parameters' device (an fp16 loss scale), which is never read back to the host.
    """
    for group in param_groups:
        wd = group.get("l2_weight_decay", 0.0)
        if wd == 0:
            continue
        params = [p for p in group["params"] if p.requires_grad]
        present = [p for p in params if p.grad is not None]
        for p in params:
            if p.grad is None:
                p.grad = p.detach() * (wd * scale)
        if not present:
            continue
        grads, weights = [p.grad for p in present], [p.detach() for p in present]
        if torch.is_tensor(scale):
            torch._foreach_add_(grads, torch._foreach_mul(weights, wd * scale))
        else:
            torch._foreach_add_(grads, weights, alpha=wd * scale)


def _foreach_scale(tensors: TensorList, scale: float | torch.Tensor) -> TensorList:
    """[t * scale]: a 0-dim tensor `scale` is moved to each tensor's device and dtype first (as `t * scale.to(t)`)."""
    if not torch.is_tensor(scale):
        return torch._foreach_mul(tensors, scale)
    out: list[torch.Tensor] = list(tensors)  # each entry replaced below
    for (device, dtype), index in _by_device_and_dtype(tensors).items():
        for i, t in zip(index, torch._foreach_mul([tensors[i] for i in index], scale.to(device, dtype))):
            out[i] = t
    return out


def _by_device_and_dtype(tensors: TensorList) -> dict[tuple, list[int]]:
    index: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        index.setdefault((t.device, t.dtype), []).append(i)
    return index


def _abs_plus(weights: TensorList, eta: float) -> TensorList:
    """|w| + eta, ASAM's T."""
    return torch._foreach_add(torch._foreach_abs(weights), eta)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around a base optimizer: one step is Algorithm 1 of Foret et al. (ICLR 2021).

    With g = grad L_B(w), the gradient of the batch loss at the current weights w (in `.grad`, from the caller's
    first forward-backward), Algorithm 1's lines map to the methods as follows (eps_hat is the paper's ε̂(w)):

        eps_hat(w) = rho * g / ||g||_2      equation 2 with p = 2. `first_step()`: keeps a copy of w and sets
                                            w <- w + eps_hat (no epsilon in the denominator: g = 0 gives eps_hat = 0)
        g_sam = grad L_B(w)|w+eps_hat       equation 3: the caller's second forward-backward, at w + eps_hat,
                                            into `.grad` (`step(closure)` calls the closure for it)
        w <- w - eta * g_sam                `second_step()`: puts back the saved w (bit for bit), then the base
                                            optimizer steps from w with g_sam (eta: its learning rate; the paper's
                                            runs use SGD with momentum, whose update replaces eta * g_sam)

    `step(closure)` is the three in one. `rho` is the paper's rho (the radius of the neighbourhood); `p=inf` is its
    p = infinity ablation, eps_hat = rho * sign(g). `weight_decay_mode="l2"` (default) puts the official code's
    L2 term in the loss, so g and g_sam include wd * w and wd * (w + eps_hat); `"base_optimizer"` leaves weight
    decay to the base optimizer, at w. `adaptive=True` with `eta` is ASAM (module docstring). `base_kwargs` (lr,
    momentum, ...) go to `base_optimizer`, which shares SAM's parameter groups. A negative `rho`, a `p` other than
    2 and inf, or an unknown `weight_decay_mode` is a ValueError.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        p: float = 2,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "l2",
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0 (got {rho})")
        if p not in (2, math.inf):
            raise ValueError(f"p must be 2 or inf (got {p})")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES} (got {weight_decay_mode!r})")
        self.p = p
        self.weight_decay_mode = weight_decay_mode
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, weight_decay=weight_decay, **base_kwargs)
        super().__init__(params, defaults)
        for group in self.param_groups:
            # In l2 mode the coefficient moves to `l2_weight_decay` and the base optimizer sees weight_decay=0.
            l2 = group["weight_decay"] if weight_decay_mode == "l2" else 0.0
            group["l2_weight_decay"] = l2
            if weight_decay_mode == "l2":
                group["weight_decay"] = 0.0
        # The base optimizer adopts our group dicts (add_param_group keeps the dict objects), so both share them.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.last_grad_norm: torch.Tensor | None = None  # ||g|| of the last first_step (a 0-dim tensor)
        self.perturbation_norm: torch.Tensor | None = None  # ||eps|| of the last first_step
        self._weight_buffers: dict[torch.Tensor, torch.Tensor] = {}  # the saved copy of w, reused every step

    # ------------------------------------------------------------------------------------------------------------
    # Algorithm 1
    @torch.no_grad()
    def first_step(
        self,
        zero_grad: bool = False,
        grad_scale: float | torch.Tensor = 1.0,
        grads: Mapping[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        """w <- w + eps(g), with g the current `.grad`, or `grads` (parameter -> gradient, as `torch.autograd.grad`
        returns them; None or absent: no gradient) when given, divided by `grad_scale`, plus wd*w in l2 mode.

        `grads` lets an engine take one group's clean gradient without touching the perturbed gradients of earlier
        groups that accumulate in `.grad`. No host-device synchronisation: a zero gradient gives eps = 0 through a
        masked division, and `grad_scale` may be a 0-dim device tensor (an fp16 loss scale).
        """
        ascent = self._ascent_gradients(grad_scale, grads)
        norm = self._ascent_norm(ascent)
        inv_norm = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        perturbation_norms: list[torch.Tensor] = []
        # One fused (foreach) kernel per operation and parameter group instead of one small kernel per tensor.
        for group, params in self._groups_with_ascent(ascent):
            gradient = [ascent[p] for p in params]
            weights = [p.detach() for p in params]
            eps: TensorList
            if self.p == 2:
                eps = _foreach_scale(gradient, group["rho"] * inv_norm)
                if group["adaptive"]:
                    eps = torch._foreach_mul(eps, torch._foreach_pow(_abs_plus(weights, group["eta"]), 2))
            else:
                # p = inf: the dual norm is l1, so eps = rho * sign(g) (times |w|+eta per coordinate for ASAM).
                eps = torch._foreach_mul(torch._foreach_sign(gradient), group["rho"])
                if group["adaptive"]:
                    eps = torch._foreach_mul(eps, _abs_plus(weights, group["eta"]))
            perturbation_norms.extend(n.to(norm) for n in self._perturb(params, eps))
        self.last_grad_norm = norm.detach()
        self.perturbation_norm = (
            torch.linalg.vector_norm(torch.stack(perturbation_norms), 2)
            if perturbation_norms
            else torch.zeros_like(norm)
        )
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def add_perturbed_weight_decay(self, scale: float | torch.Tensor = 1.0) -> None:
        """In l2 mode, add scale * wd * (w + eps) to `.grad` (creating it if absent); call while perturbed.

        `second_step` calls it itself; an engine that accumulates several perturbed gradients calls it once per
        group, before that group's perturbed backward, with scale = the group's weight (times the loss scale).
        """
        add_l2_gradient_(self.param_groups, scale)

    @torch.no_grad()
    def restore(self) -> None:
        """w + eps -> w, bit for bit (the saved copy, not a subtraction). Idempotent."""
        params = [p for g in self.param_groups for p in g["params"] if p in self.state and "old_p" in self.state[p]]
        if params:
            torch._foreach_copy_([p.detach() for p in params], [self.state[p].pop("old_p") for p in params])

    @property
    def is_perturbed(self) -> bool:
        return any("old_p" in self.state[p] for g in self.param_groups for p in g["params"] if p in self.state)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, base_step: Callable[[], object] | None = None) -> None:
        """Add the perturbed point's L2 gradient (if still perturbed), restore w and let the base optimizer step
        with grad L(w + eps): Algorithm 1's last line.

        `base_step` replaces the plain `base_optimizer.step()`: the engine passes its unscale (fp16), clip and step
        of the base optimizer, after it restored w per group and averaged the gradients over groups and ranks (then
        nothing is perturbed here and the restore is a no-op)."""
        if self.is_perturbed:
            self.add_perturbed_weight_decay()
        self.restore()
        (base_step or self.base_step)()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def base_step(self) -> None:
        """The base optimizer's step with the current `.grad` (call at w, after restore)."""
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """SAM step with a closure that does a full forward-backward (after the caller's first forward-backward)."""
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that re-evaluates the loss and calls backward()")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Helpers
    def _ascent_gradients(
        self,
        grad_scale: float | torch.Tensor,
        given: Mapping[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> dict[torch.Tensor, torch.Tensor]:
        """The gradient that defines eps: .grad (or `given`) / grad_scale, plus wd*w in l2 mode."""
        ascent: dict[torch.Tensor, torch.Tensor] = {}
        scaled = torch.is_tensor(grad_scale) or grad_scale != 1.0
        inv = 1.0 / grad_scale
        for group in self.param_groups:
            wd = group["l2_weight_decay"]
            grads: TensorList
            if given is None:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
            else:
                pairs = [(p, g) for p in group["params"] if (g := given.get(p)) is not None]
                params, grads = [p for p, _ in pairs], [g for _, g in pairs]
            if not params:
                continue
            if scaled:
                grads = _foreach_scale(grads, inv)
            if wd != 0:
                grads = torch._foreach_add(grads, [p.detach() for p in params], alpha=wd)
            ascent.update(zip(params, grads))
        return ascent

    def _groups_with_ascent(self, ascent: dict[torch.Tensor, torch.Tensor]) -> list[tuple[dict, list[torch.Tensor]]]:
        """(parameter group, its parameters that have an ascent gradient), for the groups that have any."""
        pairs = [(group, [p for p in group["params"] if p in ascent]) for group in self.param_groups]
        return [(group, params) for group, params in pairs if params]

    def _ascent_norm(self, ascent: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """||g||_2 over all parameters (||T g||_2 for ASAM groups). Computed on the first parameter's device."""
        norms: list[torch.Tensor] = []
        for group, params in self._groups_with_ascent(ascent):
            grads: TensorList = [ascent[p] for p in params]
            if group["adaptive"]:
                grads = torch._foreach_mul(grads, _abs_plus([p.detach() for p in params], group["eta"]))
            for dtype in dict.fromkeys(g.dtype for g in grads):  # foreach_norm's dtype: one per call
                same = [g for g in grads if g.dtype == dtype]
                norms.extend(torch._foreach_norm(same, 2, dtype=torch.promote_types(dtype, torch.float32)))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)

    def _perturb(self, params: list[torch.Tensor], eps: TensorList) -> TensorList:
        """w <- w + eps for `params`, keeping a copy of w for `restore`; returns the norms of eps's tensors."""
        weights = [p.detach() for p in params]
        saved = [self._saved_weight(p) for p in params]
        torch._foreach_copy_(saved, weights)
        for p, w in zip(params, saved):
            self.state[p]["old_p"] = w
        torch._foreach_add_(weights, eps)
        return torch._foreach_norm(eps, 2)

    def _saved_weight(self, p: torch.Tensor) -> torch.Tensor:
        """A buffer for the copy of w, kept between steps so that saving w allocates nothing after the first."""
        buf = self._weight_buffers.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._weight_buffers[p] = torch.empty_like(p.detach())
        return buf

    # ------------------------------------------------------------------------------------------------------------
    # State: the base optimizer's state dict (it holds the shared groups, so rho, eta and the L2 coefficient too),
    # plus any persistent per-parameter SAM state (variants such as LookSAM keep some). `old_p` is transient.
    def state_dict(self) -> dict[str, Any]:
        sd = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd["sam_state"] = {
            index[id(p)]: {k: v for k, v in s.items() if k != "old_p"}
            for p, s in self.state.items()
            if any(k != "old_p" for k in s)
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam_state", {})
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict rebuilt the base optimizer's group dicts: share them again (the common port's resume bug).
        self.param_groups = self.base_optimizer.param_groups
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = defaultdict(dict)
        for i, s in sam_state.items():
            p = params[int(i)]
            # onto the parameter's device (a checkpoint loads onto the CPU), floats in its dtype: as torch's own
            # Optimizer.load_state_dict casts the base optimizer's state
            self.state[p] = {
                k: v.to(p.device, p.dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
                for k, v in s.items()
            }
