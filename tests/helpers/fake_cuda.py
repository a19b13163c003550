"""`fake_cuda()`: tensors on `cuda:0` without a GPU (PyTorch's FakeTensorMode: shapes, dtypes and devices, no
values), for tests that check the device placement of the engine's code on every CPU run.

What has to be stood in for, because it asks the CUDA driver:
  * autograd's backward (it wants a primary context): `Tensor.backward` and `torch.autograd.grad` are replaced by
    functions that find the leaves a loss depends on (its graph's AccumulateGrad nodes) and give each a gradient
    `ones_like(leaf)`, on the leaf's own device and dtype, accumulated into `.grad` as autograd does;
  * the CUDA generators: one CPU generator behind `torch.cuda.default_generators`, `get_rng_state` and
    `set_rng_state`;
  * autocast's and the GradScaler's "is CUDA there?" and "does it do bf16?" questions answer yes;
  * pinning host memory (FakeTensorMode has no `_pin_memory`) returns the tensor as it is.
So these tests see every operation the engine issues from Python (forward passes, BatchNorm, the optimizers, the
scaler, clipping, the loader's gathers and augmentation) with the devices its tensors really get, and an operation
that mixes devices raises as it would on a GPU. They do not see the backward kernels, any value (no numerics:
`pytest -m cuda` on a GPU checks those), synchronisations inside PyTorch's C++, pinned memory, or the CUDA
generator's own semantics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

DEVICE = torch.device("cuda", 0)


def _leaves(output: torch.Tensor) -> list[torch.Tensor]:
    seen, found, stack = set(), [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            found.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return found


def _backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    with torch.no_grad():
        for leaf in _leaves(self):
            g = torch.ones_like(leaf)
            leaf.grad = g if leaf.grad is None else leaf.grad + g


def _grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=None, **kwargs):
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    reached = {id(leaf) for out in outputs for leaf in _leaves(out)}
    with torch.no_grad():
        return tuple(torch.ones_like(i) if id(i) in reached else None for i in inputs)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Within: `cuda:0` tensors are fake (see the module docstring). Build a model outside and move it inside with
    `.to(DEVICE)`, as the trainer does."""
    generator = torch.Generator()
    with contextlib.ExitStack() as stack:
        for target, value in (
            ("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
            ("torch.cuda.is_bf16_supported", lambda *args, **kwargs: True),
            ("torch.cuda.default_generators", (generator,)),
            ("torch.cuda.get_rng_state", lambda device="cuda": generator.get_state()),
            ("torch.cuda.set_rng_state", lambda state, device="cuda": generator.set_state(state)),
            ("torch.autograd.grad", _grad),
        ):
            stack.enter_context(mock.patch(target, value))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", _backward))
        stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self))
        yield stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
