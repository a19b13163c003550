"""How torch computes on the run's hardware: the precision of float32 matmuls and convolutions, and determinism.

  * float32 is IEEE float32 unless `trainer.tf32=true`. cuDNN convolutions default to TF32 on Ampere and later GPUs
    (10-bit mantissa, about 1e-3 relative precision), which `trainer.precision=fp32` must not silently mean; TF32
    is a training key because it changes the numbers a run computes, as `trainer.precision` does. The analyses
    (`sam-analyze`, `sam-eval`) always run in IEEE float32: a Hessian-vector product or a small-rho m-sharpness
    at 1e-3 relative precision measures the rounding.
  * `trainer.deterministic=true`: `torch.use_deterministic_algorithms(True)`, cuDNN's autotuner off, and
    `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless the environment sets it), without which cuBLAS refuses deterministic
    mode on CUDA. It is set before any CUDA work, since cuBLAS reads it when it starts.

On Linux with glibc, training also keeps freed memory in the process (`keep_freed_memory`): by default glibc hands
large freed blocks back to the OS and the next step faults them in again, page by page. A SAM step of ResNet-20 on
a batch of 128 took 60,000-70,000 such page faults (about 250 MiB touched afresh) against 15,000-30,000 for an SGD
step, which made SAM cost 2.07-2.16 times SGD on a 2-core CPU instead of 2.0; with freed memory kept, both take none,
both steps are about 15% faster and the ratio is 2.01-2.02 (benchmarks/results/allocator.json). It changes no
number a run computes.

TF32 is set through `compat.set_tf32`: the `fp32_precision` API where the installed PyTorch has it (mixing it with the
legacy `allow_tf32` flags makes PyTorch raise when either is read), the legacy flags elsewhere. For the same reason
cuDNN's determinism is switched for a block with `deterministic_cudnn()`, not `torch.backends.cudnn.flags(...)`:
that context manager sets (and first reads) the legacy `allow_tf32` flag too, which raises once `set_tf32` has run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator

import torch

from sam_repro.engine.compat import set_tf32

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest mmap threshold glibc accepts on 64-bit systems
# Set by someone who chose the allocator's behaviour: left alone.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # the value PyTorch's reproducibility notes give for deterministic cuBLAS


def configure(*, deterministic: bool, tf32: bool) -> None:
    """A run's numerics (see the module docstring); call before any CUDA work."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    set_tf32(tf32)


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """Within: cuDNN picks deterministic kernels and no autotuning; the previous settings afterwards. Touches no TF32
    flag (see the module docstring)."""
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def keep_freed_memory() -> bool:
    """glibc only: serve blocks of up to 32 MiB from the heap and never trim it, so that the memory one step frees is
    reused by the next instead of being returned to the OS and faulted in again (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD). The process keeps its peak memory. Does nothing, and returns False, off Linux, on another C
    library, or where the environment already chose (MALLOC_* variables, GLIBC_TUNABLES, a preloaded allocator
    such as jemalloc or tcmalloc)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in ALLOCATOR_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # The mmap threshold first: setting the trim threshold alone also freezes the mmap threshold at its 128 KiB
    # default, which makes every large block an mmap (more faults, not fewer).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
