"""SVHN readers: the official cropped-digits `.mat` files (`train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat`).

Each file is a MATLAB v5 file with `X`: 32 x 32 x 3 x N uint8 (H, W, C, N: MATLAB's column-major image stack) and
`y`: N x 1 labels in 1..10, where the digit 0 has label 10. We return N x 32 x 32 x 3 and map 10 -> 0, as
torchvision does, so labels are the digits themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sam_repro.errors import DataError


def _load_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        stack, labels = mat["X"], mat["y"]
    except Exception as exc:  # scipy raises ValueError, KeyError, OSError... for damaged files
        raise DataError(f"{path}: not a readable SVHN .mat file ({exc}); delete it and prepare again") from exc
    if stack.dtype != np.uint8 or stack.ndim != 4 or stack.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: expected X uint8 32 x 32 x 3 x N (got {stack.dtype} {stack.shape})")
    labels = labels.reshape(-1)
    if labels.shape != (stack.shape[3],) or not np.all((labels >= 1) & (labels <= 10)):
        raise DataError(f"{path}: expected y with {stack.shape[3]} labels in 1..10")
    return stack, labels


def _count(path: Path) -> int:
    """Number of images in a .mat file, from its header only (`whosmat` reads no data)."""
    import scipy.io

    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
    except Exception as exc:
        raise DataError(f"{path}: not a readable SVHN .mat file ({exc}); delete it and prepare again") from exc
    if len(shapes.get("X", ())) != 4:
        raise DataError(f"{path}: no 32 x 32 x 3 x N variable X; delete it and prepare again")
    return int(shapes["X"][3])


def read_svhn_mats(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the given .mat files -> (images N x 32 x 32 x 3 uint8, labels N uint8 with 10 -> 0).

    The output is allocated once from the headers and each file's stack is transposed straight into its slice, so
    train+extra (604,388 images, 1.9 GB) peaks at the output plus one file's stack, not three copies.
    """
    counts = [_count(path) for path in paths]
    images = np.empty((sum(counts), 32, 32, 3), dtype=np.uint8)
    labels = np.empty(sum(counts), dtype=np.uint8)
    start = 0
    for path, count in zip(paths, counts):
        stack, y = _load_mat(path)
        if stack.shape[3] != count:
            raise DataError(f"{path}: header says {count} images, data holds {stack.shape[3]}")
        images[start : start + count] = stack.transpose(3, 0, 1, 2)
        labels[start : start + count] = y
        start += count
        del stack
    labels[labels == 10] = 0
    return images, labels
