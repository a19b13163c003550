"""How torch computes on the run's hardware: the precision of float32 matmuls and convolutions, and determinism.

  * float32 is IEEE float32 unless `trainer.tf32=true`. cuDNN convolutions default to TF32 on Ampere and later GPUs
    (10-bit mantissa, about 1e-3 relative precision), which `trainer.precision=fp32` must not silently mean; TF32
    is a training key because it changes the numbers a run computes, as `trainer.precision` does. The analyses
    (`sam-analyze`, `sam-eval`) always run in IEEE float32: a Hessian-vector product or a small-rho m-sharpness
    at 1e-3 relative precision measures the rounding.
  * `trainer.deterministic=true`: `torch.use_deterministic_algorithms(True)`, cuDNN's autotuner off, and
    `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless the environment sets it), without which cuBLAS refuses deterministic
    mode on CUDA. It is set before any CUDA work, since cuBLAS reads it when it starts.

TF32 is set through `compat.set_tf32`: the `fp32_precision` API where the installed PyTorch has it (mixing it with the
legacy `allow_tf32` flags makes PyTorch raise when either is read), the legacy flags elsewhere. For the same reason
cuDNN's determinism is switched for a block with `deterministic_cudnn()`, not `torch.backends.cudnn.flags(...)`:
that context manager sets (and first reads) the legacy `allow_tf32` flag too, which raises once `set_tf32` has run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from sam_repro.engine.compat import set_tf32

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
