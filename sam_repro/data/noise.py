"""Symmetric label noise for the paper's robustness experiments (Table 4: CIFAR-10 with 20-80% noisy labels).

Convention: exactly round(rate * N) training examples are chosen without replacement by a generator seeded with
`seed`, and each gets a class drawn uniformly from the *other* num_classes - 1 classes. So the realised share of
wrong labels equals the requested rate up to rounding, for every seed; a "noisy" label is never accidentally the
true one (unlike the variant that redraws from all classes, whose realised rate is rate * (K - 1) / K).
`round` is Python's (ties to even). The record returned with the labels goes into the run's summary so a
reader can check which labels a run trained on.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sam_repro.errors import ConfigError


def labels_sha256(labels: np.ndarray, num_classes: int) -> str:
    """SHA-256 of the labels as uint8 (as in the dataset checksums, so rate 0 gives the published value), or as
    little-endian int64 when there are more than 256 classes."""
    dtype = np.uint8 if num_classes <= 256 else np.dtype("<i8")
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=dtype).data).hexdigest()


def corrupt_labels(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> tuple[np.ndarray, dict]:
    """Replace round(rate * N) labels by a uniformly drawn other class; see the module docstring.

    Returns (noisy labels, same dtype and shape as `labels`; info) with info = {rate_requested, rate_realised,
    n_corrupted, labels_sha256}. The input array is not modified; rate 0 returns an unchanged copy.
    """
    labels = np.asarray(labels)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"dataset.label_noise must be in [0, 1] (got {rate})")
    if num_classes < 2:
        raise ConfigError(f"dataset.num_classes must be >= 2 for label noise (got {num_classes})")
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional (got shape {labels.shape})")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (got {labels.min()}..{labels.max()})")

    n = len(labels)
    n_corrupted = round(rate * n)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=n_corrupted, replace=False)
    # An offset in 1..K-1 added modulo K is a uniform draw over the K-1 classes that differ from the true one.
    offsets = rng.integers(1, num_classes, size=n_corrupted)
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + offsets) % num_classes

    info = {
        "rate_requested": float(rate),
        "rate_realised": float(np.mean(noisy != labels)) if n else 0.0,
        "n_corrupted": int(n_corrupted),
        "labels_sha256": labels_sha256(noisy, num_classes),
    }
    return noisy, info
