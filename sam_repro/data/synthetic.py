"""`dataset=synthetic`: random images generated in memory, no files, for tests and trials where the data is beside
the point (a CLI contract, a resume, a SLURM requeue) and CIFAR-10 need not be prepared.

Every class has a random prototype image; an example of that class is half its prototype and half uniform noise,
so a network can learn the task and its loss falls. The images are a function of (`image_seed`, sizes, class
count) only: every rank of a DDP run, every resume and every process generates the same arrays. Shapes and dtypes
are those of a prepared dataset (uint8 N x H x W x C, int64 labels), so everything downstream (subsets, label
noise, augmentation, the device-resident loaders) treats them like CIFAR-10.
"""

from __future__ import annotations

import numpy as np

from sam_repro.data.arrays import DatasetArrays

NAME = "synthetic"


def synthetic_arrays(
    *, train_size: int, test_size: int, image_size: int, in_channels: int, num_classes: int, image_seed: int
) -> DatasetArrays:
    """`train_size` training and `test_size` test images of `image_size` x `image_size` x `in_channels`."""
    rng = np.random.default_rng(image_seed)
    shape = (image_size, image_size, in_channels)
    prototypes = rng.integers(0, 256, size=(num_classes, *shape), dtype=np.uint8)
    train_images, train_labels = _split(rng, prototypes, train_size)
    test_images, test_labels = _split(rng, prototypes, test_size)
    return DatasetArrays(NAME, num_classes, train_images, train_labels, test_images, test_labels)


def _split(rng: np.random.Generator, prototypes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images, each its class's prototype plus noise (half of each), drawn from `rng`."""
    labels = rng.integers(0, len(prototypes), size=n, dtype=np.int64)
    noise = rng.integers(0, 256, size=(n, *prototypes.shape[1:]), dtype=np.uint8)
    images = (prototypes[labels] >> 1) + (noise >> 1)  # at most 127 + 127: no overflow
    return images, labels


def from_config(ds) -> DatasetArrays:
    """The arrays that the `dataset` config group (configs/dataset/synthetic.yaml) describes."""
    return synthetic_arrays(
        train_size=int(ds.train_size),
        test_size=int(ds.test_size),
        image_size=int(ds.image_size),
        in_channels=int(ds.in_channels),
        num_classes=int(ds.num_classes),
        image_seed=int(ds.image_seed),
    )
