"""The memorisation measures of label-noise runs (`memorized`, `flipped_true`, `clean_train_error`): hand counts,
zero without noise, and taken on un-augmented training images with BatchNorm in eval mode."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from sam_repro.data import build_data
from sam_repro.data.arrays import DatasetArrays
from sam_repro.data.augment import normalize
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.evaluation import MEMORIZATION_KEYS, memorization, memorization_counts, memorization_shares

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")


def test_shares_equal_a_hand_count():
    true = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    noisy = torch.tensor([1, 1, 3, 3, 5, 5, 7, 7, 9, 9])  # flipped: indices 0, 2, 4, 6, 8 (5 examples)
    predicted = torch.tensor([1, 1, 2, 0, 5, 5, 0, 7, 9, 8])
    # flipped predicted as the noisy label: 0 (1), 4 (5), 8 (9) -> 3 of 5; as the true label: 2 (2) -> 1 of 5.
    # clean (1, 3, 5, 7, 9): wrong at 3 (0) and 9 (8) -> 2 of 5.
    counts = memorization_counts(predicted, noisy, true)
    assert counts.tolist() == [5, 3, 1, 5, 2]
    assert memorization_shares(counts) == {"memorized": 60.0, "flipped_true": 20.0, "clean_train_error": 40.0}
    assert set(memorization_shares(counts)) == set(MEMORIZATION_KEYS)
    assert [k for k in MEMORIZATION_KEYS if "memori" in k] == ["memorized"]


def test_zero_without_noise():
    labels = torch.arange(10) % 3
    predicted = torch.tensor([0, 0, 0, 0, 1, 2, 0, 1, 2, 0])
    shares = memorization_shares(memorization_counts(predicted, labels, labels))
    assert shares["memorized"] == 0.0 and shares["flipped_true"] == 0.0
    assert shares["clean_train_error"] == pytest.approx(100.0 * 2 / 10)  # labels 0,1,2,0,1,2,...: wrong at 1, 2


class Recorder(nn.Module):
    """Predicts class `int(x[:, 0, 0, 0] * 1000) % 10` (a function of the exact input pixels) and records, per
    call, its inputs and whether its BatchNorm was in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def forward(self, x):
        self.calls.append((x.clone(), self.bn.training))
        self.bn(x)  # would update running statistics in training mode
        return nn.functional.one_hot(self.predict(x), 10).float()

    @staticmethod
    def predict(x):
        return (x[:, 0, 0, 0] * 1000).round().long().abs() % 10


@pytest.fixture
def tiny_noisy_data(monkeypatch):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(200, 32, 32, 3), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=200).astype(np.int64)
    arrays = DatasetArrays("cifar10", 10, train_images, train_labels, train_images[:20], train_labels[:20])
    monkeypatch.setattr("sam_repro.data.sources.load_arrays", lambda name, root=None: arrays)
    with initialize_config_module(version_base="1.3", config_module="sam_repro.configs"):
        cfg = compose(
            "train",
            overrides=[
                "dataset.label_noise=0.4",
                "augment=cutout",
                "trainer.batch_size=50",
                "trainer.eval_batch_size=64",
            ],
        )
    return arrays, build_data(cfg, torch.device("cpu"))


def test_probe_sees_every_training_image_unaugmented_with_both_labels(tiny_noisy_data):
    arrays, data = tiny_noisy_data
    probe = data.noise_probe
    assert probe is not None and probe.total == 200 and data.info["memorization_sample"] == 200
    images = torch.cat([x for x, _ in probe])
    pairs = torch.cat([y for _, y in probe])
    expected = normalize(torch.from_numpy(arrays.train_images).permute(0, 3, 1, 2), probe.mean, probe.std)
    assert torch.equal(images, expected)  # no crop, flip or cutout: the stored pixels, normalized
    assert torch.equal(pairs[:, 1], torch.from_numpy(arrays.train_labels))  # true labels
    assert torch.equal(pairs[:, 0], data.train.labels)  # the labels trained on
    assert (pairs[:, 0] != pairs[:, 1]).sum() == 80  # 40% of 200 flipped


def test_memorization_runs_in_eval_mode_and_matches_a_hand_count(tiny_noisy_data):
    arrays, data = tiny_noisy_data
    model = Recorder()
    model.train()
    result = memorization(model, data.noise_probe, ENV, contextlib.nullcontext)
    assert model.calls and all(not training for _, training in model.calls)  # BatchNorm in eval mode
    assert model.training  # and back to train mode afterwards
    assert model.bn.num_batches_tracked.item() == 0
    # The same percentages counted by hand from the model's predictions on the raw images.
    x = normalize(
        torch.from_numpy(arrays.train_images).permute(0, 3, 1, 2), data.noise_probe.mean, data.noise_probe.std
    )
    predicted = Recorder.predict(x).numpy()
    noisy, true = data.train.labels.numpy(), arrays.train_labels
    flipped = noisy != true
    assert result["memorized"] == pytest.approx(100 * np.mean(predicted[flipped] == noisy[flipped]))
    assert result["flipped_true"] == pytest.approx(100 * np.mean(predicted[flipped] == true[flipped]))
    assert result["clean_train_error"] == pytest.approx(100 * np.mean(predicted[~flipped] != true[~flipped]))


def test_clean_runs_have_no_probe(monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=100).astype(np.int64)
    arrays = DatasetArrays("cifar10", 10, images, labels, images[:10], labels[:10])
    monkeypatch.setattr("sam_repro.data.sources.load_arrays", lambda name, root=None: arrays)
    with initialize_config_module(version_base="1.3", config_module="sam_repro.configs"):
        cfg = compose("train", overrides=["trainer.batch_size=50"])
    assert build_data(cfg, torch.device("cpu")).noise_probe is None
