"""`sam-data <name> --export-subset N`: a small extract that checks itself, read back with numpy alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_repro.data import select_train_indices
from sam_repro.data.arrays import DatasetArrays
from sam_repro.data.export import MAX_BYTES, export_size, export_subset, read_export
from sam_repro.data.sources import cache_path, verify
from sam_repro.errors import DataError

BIN = Path(sys.executable).parent


def fake_arrays(n_train: int = 300, n_test: int = 120) -> DatasetArrays:
    rng = np.random.default_rng(1)
    return DatasetArrays(
        "cifar10",
        10,
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.int64),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.int64),
    )


def test_export_holds_the_train_subset_and_the_first_test_images(tmp_path):
    arrays = fake_arrays()
    export_subset(arrays, 50, 20, tmp_path / "x.npz", subset_seed=3)
    back, meta = read_export(tmp_path / "x.npz")
    idx, _ = select_train_indices(300, 0.0, 50, 3)  # exactly what dataset.train_subset=50 subset_seed=3 trains on
    np.testing.assert_array_equal(back.train_images, arrays.train_images[idx])
    np.testing.assert_array_equal(back.train_labels, arrays.train_labels[idx])
    np.testing.assert_array_equal(back.test_images, arrays.test_images[:20])
    np.testing.assert_array_equal(back.test_labels, arrays.test_labels[:20])
    assert back.train_labels.dtype == np.int64 and (back.name, back.num_classes) == ("cifar10", 10)
    assert (meta["num_train"], meta["num_test"], meta["subset_seed"]) == (50, 20, 3)
    with np.load(tmp_path / "x.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["train_indices"], idx)


def test_a_changed_pixel_is_caught(tmp_path):
    export_subset(fake_arrays(), 50, 20, tmp_path / "x.npz")
    with np.load(tmp_path / "x.npz", allow_pickle=False) as npz:
        content = {key: npz[key].copy() for key in npz.files}
    content["test_images"][0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "x.npz", **content)
    with pytest.raises(DataError, match=r"x\.npz.*test_images"):
        read_export(tmp_path / "x.npz")


def test_size_limit_and_bad_counts_are_one_line_errors(tmp_path):
    arrays = fake_arrays()
    assert export_size(arrays, 10_000, 2_000) <= MAX_BYTES < export_size(arrays, 12_000, 2_000)
    big = DatasetArrays(
        "cifar10",
        10,
        np.zeros((13_000, 32, 32, 3), np.uint8),
        np.zeros(13_000, np.int64),
        arrays.test_images,
        arrays.test_labels,
    )
    with pytest.raises(
        DataError,
        match=r"--export-subset 13000 --test-subset 100 would write 40\.4 MB, more than "
        r"the 40 MB",
    ):
        export_subset(big, 13_000, 100, tmp_path / "big.npz")
    assert not (tmp_path / "big.npz").exists()
    with pytest.raises(DataError, match=r"--export-subset must be in \[1, 300\] \(got 301\)"):
        export_subset(arrays, 301, 20, tmp_path / "x.npz")
    with pytest.raises(DataError, match=r"--test-subset must be in \[1, 120\]"):
        export_subset(arrays, 10, 121, tmp_path / "x.npz")
    with pytest.raises(DataError, match="does not exist"):
        read_export(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a sam-data export"):
        read_export(tmp_path / "junk.npz")


@pytest.mark.skipif(not cache_path("cifar10").exists(), reason="CIFAR-10 is not prepared (make test does)")
def test_cli_exports_real_cifar10_within_40_mb(tmp_path):
    out = tmp_path / "cifar10-subset10000.npz"
    result = subprocess.run(
        [str(BIN / "sam-data"), "cifar10", "--export-subset", "10000", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exported 10000 training and 2000 test images" in result.stdout
    assert out.stat().st_size <= 40_000_000
    back, meta = read_export(out)
    full, cache_meta = verify("cifar10")
    idx, _ = select_train_indices(50_000, 0.0, 10_000, 0)
    np.testing.assert_array_equal(back.train_images, full.train_images[idx])
    np.testing.assert_array_equal(back.test_labels, full.test_labels[:2000])
    assert meta["source"]["sha256"] == cache_meta["sha256"]
    json.dumps(meta)  # plain JSON metadata

    too_big = subprocess.run(
        [str(BIN / "sam-data"), "cifar10", "--export-subset", "20000", "--out", str(tmp_path / "big.npz")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: --export-subset 20000 --test-subset 2000")
    assert len(too_big.stderr.strip().splitlines()) == 1 and not (tmp_path / "big.npz").exists()


def test_the_trainer_reads_an_export_through_dataset_export(tmp_path):
    """`dataset.export=FILE`: build_data serves the export's images (not the prepared cache), in its order, and the
    train subset and test subset still apply on top."""
    from helpers.training import compose_config
    from sam_repro.data import build_data

    arrays = fake_arrays()
    export_subset(arrays, 200, 100, tmp_path / "x.npz", subset_seed=0)
    back, _ = read_export(tmp_path / "x.npz")
    cfg = compose_config(
        f"dataset.export={tmp_path / 'x.npz'}",
        "dataset.root=/nonexistent",  # the cache is not read
        "dataset.test_subset=40",
        "trainer.batch_size=50",
        "trainer.eval_batch_size=40",
    )
    data = build_data(cfg, torch.device("cpu"))
    assert data.num_train == 200
    np.testing.assert_array_equal(data.train.labels.numpy(), back.train_labels)
    np.testing.assert_array_equal(data.test.labels.numpy(), back.test_labels[:40])

    other = DatasetArrays(
        "fashion_mnist",
        10,
        *(getattr(arrays, k) for k in ("train_images", "train_labels")),
        arrays.test_images,
        arrays.test_labels,
    )
    export_subset(other, 50, 20, tmp_path / "f.npz")
    with pytest.raises(DataError, match=r"dataset.export: .*f.npz is an export of fashion_mnist, not cifar10"):
        build_data(compose_config(f"dataset.export={tmp_path / 'f.npz'}"), torch.device("cpu"))
