"""In-memory datasets as uint8 arrays, and the SHA-256 checksums that pin them to the official data.

Every source of a dataset (official archive, npm copy, Debian package, prepared cache) decodes to one `Splits`:
images uint8 N x H x W x C, labels uint8 N. A checksum is the SHA-256 of `array.tobytes()` (C order) with labels as
uint8, so two sources that agree byte for byte agree on every checksum, whatever the file format they came from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from sam_repro.errors import DataError

SPLIT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


class Splits(NamedTuple):
    """The four arrays of a dataset as decoded from a source: images N x H x W x C uint8, labels N uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class DatasetArrays:
    """What the trainer gets: the splits of one dataset, labels widened to int64 for `cross_entropy`."""

    name: str
    num_classes: int
    train_images: np.ndarray  # uint8, N x H x W x C
    train_labels: np.ndarray  # int64, N
    test_images: np.ndarray
    test_labels: np.ndarray

    @classmethod
    def from_splits(cls, name: str, num_classes: int, splits: Splits) -> DatasetArrays:
        return cls(
            name=name,
            num_classes=num_classes,
            train_images=splits.train_images,
            train_labels=splits.train_labels.astype(np.int64),
            test_images=splits.test_images,
            test_labels=splits.test_labels.astype(np.int64),
        )


def sha256_array(array: np.ndarray) -> str:
    """SHA-256 of `array.tobytes()`, hashed from the array's own buffer when it is contiguous (no 150 MB copy)."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def splits_sha256(splits: Splits) -> dict[str, str]:
    return {key: sha256_array(array) for key, array in zip(SPLIT_KEYS, splits)}


def check_splits(splits: Splits, num_classes: int, source: str) -> None:
    """Shapes, dtypes and label range that every decoded dataset must have; DataError naming `source` if not."""
    for kind in ("train", "test"):
        images, labels = getattr(splits, f"{kind}_images"), getattr(splits, f"{kind}_labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{source}: {kind} images must be uint8 N x H x W x C (got {images.dtype} {images.shape})")
        if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
            raise DataError(
                f"{source}: {kind} labels must be uint8 of shape ({images.shape[0]},) "
                f"(got {labels.dtype} {labels.shape})"
            )
        if labels.size and int(labels.max()) >= num_classes:
            raise DataError(f"{source}: {kind} label {int(labels.max())} is outside [0, {num_classes})")


def verify_sha256(splits: Splits, expected: Mapping[str, str], source: str) -> dict[str, str]:
    """Checksum every array and compare with `expected`; DataError naming the arrays that differ. Returns the sums."""
    actual = splits_sha256(splits)
    wrong = [key for key in SPLIT_KEYS if key in expected and actual[key] != expected[key]]
    if wrong:
        details = ", ".join(f"{key} {actual[key][:12]}... != {expected[key][:12]}..." for key in wrong)
        raise DataError(
            f"{source}: decoded arrays do not match the known SHA-256 ({details}); "
            "the source is corrupt or not the official data: delete it and prepare again"
        )
    return actual
