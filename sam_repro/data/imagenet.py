"""ImageNet from class folders: the Inception-style input pipeline of the official code, sharded exactly per rank.

Layout (torchvision ImageFolder): `<root>/imagenet/train/<wnid>/*.JPEG` and `<root>/imagenet/val/<wnid>/*.JPEG`,
the same 1000 wnid folders in both. Official code [docs/paper_reference.md 2.3]:
  * train: a random crop covering 8-100% of the image area with aspect ratio in [3/4, 4/3], resized to 224 with
    bicubic interpolation, then a random horizontal flip;
  * eval: the centre crop of relative size 224 / (224 + 32) resized to 224, i.e. resize the short side to 256 and
    take the central 224 x 224;
  * normalization with the ImageNet mean/std (sam_repro/configs/dataset/imagenet.yaml).
Sharding: training shuffles with (seed, epoch), drops the `N mod world_size` examples at the end of the
permutation (a different few each epoch) and gives rank r every world_size-th index, so every rank runs the same
number of steps; evaluation gives each rank a contiguous block with no padding, so every example is counted once.
Randomness: each training example's crop and flip come from a generator seeded by (seed, epoch, index), so they do
not depend on the number of workers, on which worker decodes the example, on the world size, or on a resume.
Workers persist across epochs; batches are pinned for a GPU run only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from sam_repro.data.loader import seed_from
from sam_repro.errors import ConfigError, DataError

MEAN = (0.485, 0.456, 0.406)  # ImageNet training-set statistics (the official code's MEAN_RGB / 255)
STD = (0.229, 0.224, 0.225)
CROP_PADDING = 32  # eval: centre crop image_size / (image_size + 32) of the short side, as in the official code
SPLITS = ("train", "val")

LAYOUT_HELP = (
    "expected <root>/imagenet/train/<wnid>/*.JPEG and <root>/imagenet/val/<wnid>/*.JPEG with the same 1000 wnid "
    "folders (n01440764, ...). Unpack ILSVRC2012_img_train.tar and its per-class tars into train/; the official "
    "ILSVRC2012_img_val.tar is flat (ILSVRC2012_val_00000001.JPEG, ...): sort its 50,000 images into val/<wnid>/ "
    "using the devkit's ILSVRC2012_validation_ground_truth.txt (line i is the class id of image i; meta.mat maps "
    "class ids to wnids), e.g. with the widely used valprep.sh script"
)


def _check_split(folder: Path) -> None:
    if not folder.is_dir():
        raise DataError(f"ImageNet folder {folder} does not exist: {LAYOUT_HELP}")
    if not any(child.is_dir() for child in folder.iterdir()):
        raise DataError(f"ImageNet folder {folder} has no class folders (a flat val folder?): {LAYOUT_HELP}")


def train_transform(image_size: int = 224) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def eval_transform(image_size: int = 224) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(image_size + CROP_PADDING, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


class ShardSampler(Sampler):
    """This rank's indices of the split, as described in the module docstring (train: shuffled and cut to a
    multiple of world_size; eval: a contiguous block, in order). Training yields (epoch, index) keys for
    `SeededSamples`; evaluation yields plain indices."""

    def __init__(
        self, num_examples: int, rank: int, world_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}) (got {rank})")
        self.num_examples, self.rank, self.world_size = num_examples, rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.skip = 0  # indices to leave out at the start of the epoch (resuming mid-epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        n, r, w = self.num_examples, self.rank, self.world_size
        if not self.shuffle:
            return list(range(r * n // w, (r + 1) * n // w))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g)[: n - n % w]
        return order[r::w].tolist()

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self.indices()[self.skip :]
        return iter([(self.epoch, i) for i in indices] if self.shuffle else indices)

    def __len__(self) -> int:
        n, r, w = self.num_examples, self.rank, self.world_size
        return (n // w if self.shuffle else (r + 1) * n // w - r * n // w) - self.skip


class SeededSamples(Dataset):
    """The training split indexed by (epoch, index): the example's random transforms draw from torch's generator
    seeded by (seed, epoch, index), inside `fork_rng` so that the caller's generator (the main process's, with 0
    workers) is left as it was."""

    def __init__(self, dataset: datasets.ImageFolder, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_from(self.seed, epoch, index))
            return self.dataset[index]


class StreamingTrainLoader:
    """ImageNet training batches streamed from disk by DataLoader workers, behind the interface of the
    device-resident `TrainLoader` (epoch, position, resume mid-epoch, batches on the training device)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.epoch, self.position = 0, 0
        self.batches_per_epoch = len(loader.sampler.indices()) // loader.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position
        self.loader.sampler.set_epoch(epoch, skip=position * self.loader.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            self.position += 1
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class StreamingEvalLoader:
    """This rank's contiguous block of the validation split (exact evaluation: counts summed over ranks)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.total = len(loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build_imagenet_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    workers: int,
    image_size: int = 224,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over this rank's shard of `<root>/imagenet/<split>` (split: train | val).

    `batch_size` is per rank. Training batches are full (the incomplete last one is dropped, as in the official
    code); evaluation keeps every example. Scanning 1.28M files takes a while: build the loader once and move to
    the next epoch with `loader.sampler.set_epoch(epoch)`; the workers persist. Training crops and flips are
    functions of (seed, epoch, index) (`SeededSamples`). `pin_memory`: for batches bound for a GPU.
    """
    if split not in SPLITS:
        raise ConfigError(f"ImageNet split must be one of {', '.join(SPLITS)} (got {split!r})")
    folder = Path(root).expanduser() / "imagenet" / split
    _check_split(folder)
    train = split == "train"
    dataset = datasets.ImageFolder(
        str(folder), transform=train_transform(image_size) if train else eval_transform(image_size)
    )
    sampler = ShardSampler(len(dataset), rank, world_size, shuffle=train, seed=seed, epoch=epoch)
    return DataLoader(
        SeededSamples(dataset, seed) if train else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,  # not restarted (and the 1.28M-file list not re-sent) every epoch
        pin_memory=pin_memory,
        drop_last=train,
    )
