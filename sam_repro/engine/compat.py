"""The PyTorch versions the project supports (pyproject.toml: torch>=2.5,<3) differ in a few APIs; each difference
is guarded here, once, so the rest of the code calls one function whatever the installed release.

- TF32: PyTorch 2.9 added `torch.backends.{cuda.matmul,cudnn.conv}.fp32_precision` ("ieee" | "tf32") and deprecated
  the `allow_tf32` flags; setting both kinds in one process raises on newer releases. `set_tf32` uses the new API
  where it exists and the old flags elsewhere.
Everything else the code calls (`torch.amp.GradScaler(device)`, `torch.load(weights_only=...)`,
`init_process_group(device_id=...)`, `torch.utils.flop_counter`, `torch.cuda.set_sync_debug_mode`) is in 2.5 already.
"""

from __future__ import annotations

import torch

MIN_TORCH = (2, 5)


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of `version` (default: the installed torch), ignoring local labels like `+cu130`."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def has_fp32_precision_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on (True) or IEEE float32 (False)."""
    if has_fp32_precision_api():
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    if has_fp32_precision_api():
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)
