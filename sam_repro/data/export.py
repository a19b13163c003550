"""A small extract of a prepared dataset that checks itself, for machines that cannot fetch the dataset (a GPU node
without internet and with little room for copying files):

    sam-data cifar10 --export-subset 10000 [--test-subset 2000] [--out cifar10-subset10000.npz]

The file is a plain `.npz` that numpy alone reads (no pickle): N training images chosen as `dataset.train_subset=N`
chooses them (`select_train_indices`, `dataset.subset_seed`), the first M test images (as `dataset.test_subset=M`),
labels as uint8, the training indices taken, and JSON metadata with every array's SHA-256 and the checksums of the
full dataset it came from. `read_export` verifies all of it. At most MAX_BYTES, so that it fits a small allowance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sam_repro.data import select_train_indices
from sam_repro.data.arrays import SPLIT_KEYS, DatasetArrays, Splits, splits_sha256, verify_sha256
from sam_repro.errors import DataError
from sam_repro.files import atomic_write_bytes

EXPORT_FORMAT = 1
MAX_BYTES = 40_000_000  # 40 MB


def export_size(arrays: DatasetArrays, n_train: int, n_test: int) -> int:
    """Bytes of the arrays an export of (n_train, n_test) examples holds (the file adds a few KB of headers)."""
    per_image = int(np.prod(arrays.train_images.shape[1:]))
    return (n_train + n_test) * (per_image + 1) + n_train * 8


def export_subset(
    arrays: DatasetArrays, n_train: int, n_test: int, path: Path, subset_seed: int = 0, source: dict | None = None
) -> dict:
    """Write the extract atomically; returns its metadata. DataError (naming the options) if it would not fit."""
    if not 0 < n_test <= len(arrays.test_labels):
        raise DataError(f"--test-subset must be in [1, {len(arrays.test_labels)}] (got {n_test})")
    size = export_size(arrays, n_train, n_test)
    if size > MAX_BYTES:
        raise DataError(
            f"--export-subset {n_train} --test-subset {n_test} would write {size / 1e6:.1f} MB, more than "
            f"the {MAX_BYTES / 1e6:.0f} MB an export may take: choose fewer images"
        )
    try:
        train_idx, _ = select_train_indices(len(arrays.train_labels), 0.0, n_train, subset_seed)
    except Exception as exc:  # ConfigError naming dataset.train_subset: say it in this command's words
        raise DataError(f"--export-subset must be in [1, {len(arrays.train_labels)}] (got {n_train})") from exc
    splits = Splits(
        arrays.train_images[train_idx],
        arrays.train_labels[train_idx].astype(np.uint8),
        arrays.test_images[:n_test],
        arrays.test_labels[:n_test].astype(np.uint8),
    )
    meta = {
        "format": EXPORT_FORMAT,
        "dataset": arrays.name,
        "num_classes": arrays.num_classes,
        "num_train": n_train,
        "num_test": n_test,
        "subset_seed": subset_seed,
        "sha256": splits_sha256(splits),
        "source": source or {},
    }
    atomic_write_bytes(
        path,
        lambda f: np.savez(
            f, meta=np.array(json.dumps(meta)), train_indices=train_idx.astype(np.int64), **splits._asdict()
        ),
    )
    return meta


def read_export(path: Path) -> tuple[DatasetArrays, dict]:
    """The verified arrays of an export and its metadata; DataError naming the file if it is not a sound export."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            splits = Splits(*(npz[key] for key in SPLIT_KEYS))
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist: write it with `sam-data cifar10 --export-subset N --out {path}`"
        ) from None
    except Exception as exc:
        raise DataError(f"{path} is not a sam-data export ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise DataError(
            f"{path}: export format {meta.get('format') if isinstance(meta, dict) else None}, "
            f"expected {EXPORT_FORMAT}: export it again"
        )
    if not isinstance(meta.get("sha256"), dict) or set(meta["sha256"]) != set(SPLIT_KEYS):
        raise DataError(f"{path}: its metadata does not record a checksum for every array: export it again")
    verify_sha256(splits, meta["sha256"], str(path))
    return DatasetArrays.from_splits(meta["dataset"], int(meta["num_classes"]), splits), meta
