"""Data: sources with checksums and caches (`sources`), device-resident loaders (`loader`), batched augmentation
(`augment`), label noise (`noise`), AutoAugment (`autoaugment`), ImageNet folders (`imagenet`) and generated
images (`synthetic`, no files).

`dataset_arrays(cfg.dataset)` is a dataset's arrays: generated for `dataset=synthetic`, else the prepared cache.

`build_data(cfg, device, rank, world_size)` turns the `dataset` and `augment` config groups into loaders:
  1. the validation split (`dataset.val_fraction`) is the *last* share of the official training set (official
     code), with clean labels;
  2. `dataset.train_subset=N` then picks N of the remaining examples with `dataset.subset_seed`, the same for every
     optimizer and seed of a sweep;
  3. `dataset.label_noise` corrupts the training labels with `dataset.noise_seed`; validation and test stay clean.
     Such runs also get `Data.noise_probe`: the training images un-augmented, with the pair (trained-on label,
     true label), on which the trainer measures how much of the corrupted labels the network has memorised. On
     more than MEMORIZATION_SAMPLE training examples it is a fixed sample of that many (drawn with
     `dataset.noise_seed`, the same for every optimizer and seed).
`dataset.export=FILE` (CIFAR-10) reads a `sam-data --export-subset` file instead of the prepared cache, on a machine
that has only the extract (a GPU node): its training images are the export's, the steps above apply to them.

The config's values were checked where it was started (`sam_repro.engine.config`); what is checked here depends on
the data: a subset or a batch larger than the split it is taken from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from sam_repro.data import synthetic
from sam_repro.data.arrays import DatasetArrays
from sam_repro.data.augment import BatchAugment
from sam_repro.data.loader import EvalLoader, TrainLoader, to_device_uint8
from sam_repro.errors import ConfigError

MEMORIZATION_SAMPLE = 10_000  # training examples the memorisation probe evaluates (all of them when fewer)


@dataclass
class Data:
    train: TrainLoader
    test: EvalLoader
    val: EvalLoader | None
    num_train: int
    noise_probe: EvalLoader | None = None  # label noise only: training images with (noisy, true) label pairs
    info: dict = field(default_factory=dict)  # label-noise record etc., goes into summary.json


def select_train_indices(
    n_total: int, val_fraction: float, train_subset: int | None, subset_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of the official training set, as described in the module docstring.
    `val_fraction` lies in [0, 1) (the schema's `dataset.val_fraction`); `train_subset` must fit the split."""
    n_val = int(round(n_total * val_fraction))
    train_idx, val_idx = np.arange(n_total - n_val), np.arange(n_total - n_val, n_total)
    if train_subset is not None:
        if not 0 < train_subset <= len(train_idx):
            raise ConfigError(
                f"dataset.train_subset must be in [1, {len(train_idx)}] for this split (got {train_subset})"
            )
        rng = np.random.default_rng(subset_seed)
        train_idx = np.sort(rng.choice(train_idx, size=train_subset, replace=False))
    return train_idx, val_idx


def dataset_arrays(ds, root: str | os.PathLike | None = None) -> DatasetArrays:
    """The arrays of the `dataset` config group `ds`: generated for synthetic, else read from the prepared cache
    under `root` (default `ds.root`)."""
    if ds.name == synthetic.NAME:
        return synthetic.from_config(ds)
    from sam_repro.data.sources import load_arrays

    return load_arrays(str(ds.name), str(root if root is not None else ds.root))


def build_data(cfg, device: torch.device, rank: int = 0, world_size: int = 1) -> Data:
    if cfg.dataset.name == "imagenet":
        return _build_imagenet(cfg, device, rank, world_size)
    ds, aug, tr = cfg.dataset, cfg.augment, cfg.trainer
    if ds.get("export"):
        from sam_repro.data.export import read_export
        from sam_repro.errors import DataError

        arrays, meta = read_export(ds.export)
        if meta["dataset"] != ds.name:
            raise DataError(f"dataset.export: {ds.export} is an export of {meta['dataset']}, not {ds.name}")
    else:
        arrays = dataset_arrays(ds)
    train_idx, val_idx = select_train_indices(
        len(arrays.train_labels), float(ds.val_fraction), ds.train_subset, int(ds.subset_seed)
    )
    true_labels = labels = arrays.train_labels[train_idx].astype(np.int64)
    info: dict = {"num_train": len(train_idx), "num_val": len(val_idx)}
    if ds.label_noise:
        from sam_repro.data.noise import corrupt_labels

        labels, info["label_noise"] = corrupt_labels(
            labels, float(ds.label_noise), int(ds.num_classes), int(ds.noise_seed)
        )
    if tr.batch_size > len(train_idx):
        raise ConfigError(f"trainer.batch_size ({tr.batch_size}) is larger than the training set ({len(train_idx)})")

    height, width = arrays.train_images.shape[1:3]
    augment = BatchAugment(aug, ds.mean, ds.std, (height, width))
    cpu_augment = None
    if aug.get("autoaugment"):
        from sam_repro.data.autoaugment import autoaugment_batch

        policy = str(aug.autoaugment)
        cpu_augment = lambda images, generator: autoaugment_batch(images, policy, generator)  # noqa: E731

    to_dev = lambda x: to_device_uint8(x, device)  # noqa: E731
    train = TrainLoader(
        to_dev(arrays.train_images[train_idx]),
        torch.from_numpy(labels).to(device),
        int(tr.batch_size),
        augment,
        seed=int(cfg.seed),
        rank=rank,
        world_size=world_size,
        cpu_augment=cpu_augment,
    )
    n_test = len(arrays.test_labels) if ds.get("test_subset") is None else int(ds.test_subset)
    if not 0 < n_test <= len(arrays.test_labels):
        raise ConfigError(f"dataset.test_subset must be in [1, {len(arrays.test_labels)}] (got {ds.test_subset})")
    test_labels = torch.from_numpy(arrays.test_labels[:n_test].astype(np.int64)).to(device)
    test = EvalLoader(
        to_dev(arrays.test_images[:n_test]), test_labels, int(tr.eval_batch_size), ds.mean, ds.std, rank, world_size
    )
    val = None
    if len(val_idx):
        val_labels = torch.from_numpy(arrays.train_labels[val_idx].astype(np.int64)).to(device)
        val = EvalLoader(
            to_dev(arrays.train_images[val_idx]), val_labels, int(tr.eval_batch_size), ds.mean, ds.std, rank, world_size
        )
    noise_probe = None
    if ds.label_noise:
        probe = np.arange(len(labels))
        if len(probe) > MEMORIZATION_SAMPLE:
            probe = np.sort(np.random.default_rng(int(ds.noise_seed)).choice(probe, MEMORIZATION_SAMPLE, replace=False))
        pairs = torch.from_numpy(np.stack([labels[probe], true_labels[probe]], axis=1)).to(device)
        noise_probe = EvalLoader(
            train.images[torch.from_numpy(probe).to(device)],
            pairs,
            int(tr.eval_batch_size),
            ds.mean,
            ds.std,
            rank,
            world_size,
        )
        info["memorization_sample"] = len(probe)
    return Data(train=train, test=test, val=val, num_train=len(train_idx), info=info, noise_probe=noise_probe)


def _build_imagenet(cfg, device: torch.device, rank: int, world_size: int) -> Data:
    """ImageNet is too large for the device: DataLoader workers decode and augment (Inception crop + flip for
    training, resize + centre crop for evaluation), batches stream to the device."""
    from sam_repro.data.imagenet import StreamingEvalLoader, StreamingTrainLoader, build_imagenet_loader

    ds, tr = cfg.dataset, cfg.trainer  # subsets, label noise and a validation split: refused by the config's check
    common = dict(
        root=ds.root,
        rank=rank,
        world_size=world_size,
        seed=int(cfg.seed),
        epoch=0,
        workers=int(ds.get("workers", 8)),
        image_size=int(ds.image_size),
        pin_memory=device.type == "cuda",
    )
    train = StreamingTrainLoader(
        build_imagenet_loader(split="train", batch_size=tr.batch_size // world_size, **common), device
    )
    test = StreamingEvalLoader(build_imagenet_loader(split="val", batch_size=int(tr.eval_batch_size), **common), device)
    n_train = len(train.loader.dataset)
    return Data(train=train, test=test, val=None, num_train=n_train, info={"num_train": n_train})
