"""Counting the host reads of a block of code: the operations that make the host wait for a tensor's value, which on a
GPU is a synchronisation (the host stops queuing work until the device has caught up).

The training step promises none in fp32 and bf16, and exactly one in fp16: `torch.amp.GradScaler.step` reads
whether the unscaled gradients held an inf or NaN (`found_inf`) to decide on the host whether to call the base
optimizer's `step()`. That read is kept by design. PyTorch's fused SGD could take `found_inf` on the device instead,
but where the very first step overflows (likely with the default scale of 2^16) it stores a momentum buffer made by
`torch.empty_like` that its kernel never filled, and the next step starts from that garbage; a skipped step must
leave no momentum behind (sam_repro/engine/step.py, the GPU check's overflow check).

`HostReads` sees what goes through PyTorch's dispatcher: `.item()`, `float(t)`, `bool(t)`, `if t:` (one
`_local_scalar_dense` each), `torch.equal`, the ops whose output size depends on values (`nonzero`, `masked_select`,
`unique`, boolean indexing) and copies from a device to the CPU (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(gpu)`).
It does not see `Tensor.tolist()` (no dispatched op) or synchronisations inside PyTorch's C++ (the caching
allocator, cuDNN's autotuner); on a GPU `torch.cuda.set_sync_debug_mode` sees those.

On the CPU every tensor is on the host, so `count_cpu=True` counts reads of CPU tensors as well (a CPU test of the
step's reads); by default only reads of tensors on another device count, as on a GPU or on fake CUDA tensors, where
`answer` (a number) stands in for the value a fake tensor does not have.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.equal.default}
_VALUE_SHAPED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.index.Tensor,  # only with a boolean mask: see _value_shaped_index
}


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = [*args, *(kwargs or {}).values()]
    out = []
    for a in flat:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


class HostReads(TorchDispatchMode):
    """Within: `self.reads` lists (operation, device) for every host read (see the module docstring)."""

    def __init__(self, count_cpu: bool = False, answer: float | None = None) -> None:
        super().__init__()
        self.count_cpu, self.answer = count_cpu, answer
        self.reads: list[tuple[str, str]] = []

    def _counts(self, device: torch.device) -> bool:
        return self.count_cpu or device.type != "cpu"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        read = None
        if func in _READS or (func in _VALUE_SHAPED and (func is not aten.index.Tensor or _mask_index(args))):
            read = next((t.device for t in tensors if self._counts(t.device)), None)
        elif func in (aten._to_copy.default, aten.copy_.default):
            source = tensors[1] if func is aten.copy_.default else tensors[0]
            target = tensors[0].device if func is aten.copy_.default else kwargs.get("device") or source.device
            if torch.device(target).type == "cpu" and source.device.type != "cpu":
                read = source.device
        if read is not None:
            self.reads.append((str(func.overloadpacket.__name__), str(read)))
            if func is aten._local_scalar_dense.default and self.answer is not None and _is_fake(tensors[0]):
                return type(self.answer)(self.answer)
        return func(*args, **kwargs)


def _mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
