"""`dataset=synthetic` (sam_repro/data/synthetic.py): generated images of a configurable size and class count, no
files; a run trains on them end to end without CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.training import TINY, compose_config, read_metrics
from sam_repro.data import build_data, sources
from sam_repro.data.synthetic import synthetic_arrays
from sam_repro.engine.config import validate_config
from sam_repro.engine.trainer import train

SMALL = dict(train_size=200, test_size=100, image_size=8, in_channels=3, num_classes=4, image_seed=0)


@pytest.fixture
def no_files(monkeypatch, tmp_path):
    """An empty data directory, and a data layer that fails if anything asks it for files."""
    monkeypatch.setenv("SAM_DATA_DIR", str(tmp_path / "no-data"))

    def load_arrays(name, root=None):
        raise AssertionError(f"dataset=synthetic read files ({name}, {root})")

    monkeypatch.setattr(sources, "load_arrays", load_arrays)


def test_the_arrays_have_the_asked_shapes_and_are_a_function_of_the_seed():
    a = synthetic_arrays(**SMALL)
    assert a.train_images.shape == (200, 8, 8, 3) and a.test_images.shape == (100, 8, 8, 3)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int64
    assert set(np.unique(a.train_labels)) == {0, 1, 2, 3} and a.num_classes == 4
    b = synthetic_arrays(**SMALL)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    c = synthetic_arrays(**{**SMALL, "image_seed": 1})
    assert not np.array_equal(a.train_images, c.train_images)
    gray = synthetic_arrays(**{**SMALL, "in_channels": 1, "image_size": 5})
    assert gray.train_images.shape == (200, 5, 5, 1)


def test_the_classes_are_learnable():
    """Half of every image is its class's prototype: the nearest training-class mean names every test label."""
    a = synthetic_arrays(**{**SMALL, "image_size": 16})
    flat = lambda images: images.reshape(len(images), -1).astype(np.float64)  # noqa: E731
    means = np.stack([flat(a.train_images)[a.train_labels == k].mean(0) for k in range(4)])
    distances = ((flat(a.test_images)[:, None, :] - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == a.test_labels).mean() == 1.0


def test_the_config_validates_and_builds_device_loaders_without_files(no_files):
    cfg = compose_config(
        "dataset=synthetic", "dataset.image_size=12", "dataset.num_classes=3", "dataset.in_channels=1",
        "dataset.mean=[0.5]", "dataset.std=[0.2]", "dataset.train_size=96", "dataset.test_size=40",
        "dataset.val_fraction=0.25", "dataset.label_noise=0.5", "trainer.batch_size=8",
    )  # fmt: skip
    validate_config(cfg)
    data = build_data(cfg, torch.device("cpu"))
    assert data.num_train == 72 and data.val is not None and data.noise_probe is not None
    assert tuple(data.train.images.shape) == (72, 1, 12, 12) and data.train.images.dtype == torch.uint8
    assert tuple(data.test.images.shape) == (40, 1, 12, 12)
    assert int(data.train.labels.max()) < 3


def test_a_run_trains_on_it_without_cifar10(no_files, tmp_path):
    cfg = compose_config("dataset=synthetic", *TINY, "trainer.device=cpu", "trainer.progress=off", "trainer.epochs=2")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["num_train"] == 256
    rows = read_metrics(tmp_path / "run")
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) for row in rows)
