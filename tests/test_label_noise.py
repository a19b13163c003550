"""Label noise: exactly round(rate * N) labels move to a uniformly drawn other class, reproducibly from the seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sam_repro.data.noise import corrupt_labels
from sam_repro.errors import ConfigError


def clean_labels(n: int = 10_000, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(123).integers(0, num_classes, size=n).astype(np.int64)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6, 0.8, 0.123])  # the paper's Table 4 levels and an odd one
def test_realised_rate_is_the_requested_one_and_noisy_labels_are_never_true(rate):
    labels = clean_labels()
    noisy, info = corrupt_labels(labels, rate, 10, seed=0)
    changed = noisy != labels
    assert changed.sum() == info["n_corrupted"] == round(rate * len(labels))
    assert info["rate_realised"] == changed.mean() == pytest.approx(rate, abs=0.5 / len(labels))
    assert info["rate_requested"] == rate
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert noisy.min() >= 0 and noisy.max() < 10


def test_new_classes_are_uniform_over_the_other_classes():
    # All labels class 3, rate 1: the 9 other classes should each get ~1/9 of 90,000 draws. The binomial std of
    # one count is sqrt(90000 * 1/9 * 8/9) ~ 94, so +-5 std is a bound that only a biased draw breaks.
    labels = np.full(90_000, 3)
    noisy, _ = corrupt_labels(labels, 1.0, 10, seed=7)
    counts = np.bincount(noisy, minlength=10)
    assert counts[3] == 0
    np.testing.assert_allclose(np.delete(counts, 3), 10_000, atol=5 * 94)


def test_reproducible_from_the_seed_and_different_for_another_seed():
    labels = clean_labels()
    a, info_a = corrupt_labels(labels, 0.4, 10, seed=1)
    b, info_b = corrupt_labels(labels, 0.4, 10, seed=1)
    c, info_c = corrupt_labels(labels, 0.4, 10, seed=2)
    np.testing.assert_array_equal(a, b)
    assert info_a == info_b
    assert (a != c).any() and info_c["labels_sha256"] != info_a["labels_sha256"]
    assert info_c["n_corrupted"] == info_a["n_corrupted"]


def test_rate_zero_is_the_identity_and_input_is_untouched():
    labels = clean_labels()
    before = labels.copy()
    noisy, info = corrupt_labels(labels, 0.0, 10, seed=5)
    np.testing.assert_array_equal(noisy, labels)
    np.testing.assert_array_equal(labels, before)
    assert info["n_corrupted"] == 0 and info["rate_realised"] == 0.0
    # Hashed as uint8, the dataset checksums' convention: rate 0 reproduces the clean labels' checksum.
    assert info["labels_sha256"] == hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest()
    corrupt_labels(labels, 0.8, 10, seed=5)
    np.testing.assert_array_equal(labels, before)


def test_info_is_json_serialisable_python_values():
    import json

    _, info = corrupt_labels(clean_labels(100), 0.25, 10, seed=0)
    assert json.loads(json.dumps(info)) == info
    assert set(info) == {"rate_requested", "rate_realised", "n_corrupted", "labels_sha256"}


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_rate_outside_unit_interval_is_a_config_error(rate):
    with pytest.raises(ConfigError, match="dataset.label_noise"):
        corrupt_labels(clean_labels(10), rate, 10, seed=0)
