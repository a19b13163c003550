"""Batched augmentation and the device-resident loaders (sam_repro/data/{augment,loader}.py)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from sam_repro.data import select_train_indices
from sam_repro.data.augment import BatchAugment, crop, cutout, flip, normalize
from sam_repro.data.autoaugment import autoaugment_batch
from sam_repro.data.loader import EvalLoader, TrainLoader, seed_from
from sam_repro.errors import ConfigError

MEAN, STD = [0.5, 0.25, 0.125], [0.25, 0.5, 1.0]


def images(n=16, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_normalize_matches_formula():
    x = images(2)
    out = normalize(x, MEAN, STD)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_crop_is_a_window_of_the_padded_image(mode):
    x = images(6)
    pad = 4
    offsets = torch.tensor([[0, 0], [8, 8], [4, 4], [0, 8], [3, 5], [7, 1]])
    out = crop(x, offsets, pad, mode)
    padded = torch.nn.functional.pad(x.float(), (pad,) * 4, mode=mode).to(torch.uint8)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
    assert torch.equal(out[2], x[2])  # offset (pad, pad) is the identity
    # reflect: no pixel value outside the original image's set appears
    if mode == "reflect":
        assert set(out[1].unique().tolist()) <= set(x[1].unique().tolist())


def test_random_crop_offsets_stay_in_bounds_and_flip_rate_is_half():
    cfg = OmegaConf.create({"crop": True, "pad": 4, "flip": True, "cutout": 0})
    aug = BatchAugment(cfg, MEAN, STD, (32, 32))
    draws = aug.draw(20000, torch.Generator().manual_seed(0))
    assert draws.offsets.min() == 0 and draws.offsets.max() == 8
    assert abs(draws.flips.float().mean().item() - 0.5) < 0.015  # 4.2 standard errors
    x = images(3)
    mask = torch.tensor([True, False, True])
    out = flip(x, mask)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_cutout_masks_exactly_a_clipped_square():
    x = torch.ones(3, 2, 32, 32)
    out = cutout(x, torch.tensor([[16, 16]]), 16)  # one mask for the whole batch (official)
    assert (out == 0).all(dim=1).sum(dim=(1, 2)).tolist() == [256, 256, 256]
    assert (out[:, :, 8:24, 8:24] == 0).all()
    corner = cutout(torch.ones(2, 1, 32, 32), torch.tensor([[0, 0], [31, 20]]), 16)  # per image, clipped
    assert (corner[0] == 0).sum() == 8 * 8 and (corner[0, 0, :8, :8] == 0).all()
    assert (corner[1] == 0).sum() == 9 * 16 and (corner[1, 0, 23:, 12:28] == 0).all()


def make_train_loader(world_size=1, rank=0, batch=8, n=40, seed=3):
    cfg = OmegaConf.create({"crop": True, "pad": 2, "flip": True, "cutout": 4, "cutout_per_image": True})
    aug = BatchAugment(cfg, MEAN, STD, (8, 8))
    return TrainLoader(images(n), torch.arange(n), batch, aug, seed=seed, rank=rank, world_size=world_size)


def test_train_loader_covers_each_example_once_per_epoch_and_drops_the_remainder():
    loader = make_train_loader(batch=8, n=44)
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 5 and len(labels) == 40 and len(set(labels.tolist())) == 40
    loader.set_epoch(1)
    labels_next = torch.cat([y for _, y in loader])
    assert not torch.equal(labels, labels_next)  # a new order each epoch


def test_two_ranks_see_exactly_the_single_process_batches():
    single = list(make_train_loader(world_size=1, batch=8))
    ranks = [list(make_train_loader(world_size=2, rank=r, batch=8)) for r in range(2)]
    for b, (x, y) in enumerate(single):
        torch.testing.assert_close(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)


def test_loader_resumes_mid_epoch_exactly():
    full = list(make_train_loader())
    loader = make_train_loader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    resumed = make_train_loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (x, y), (xf, yf) in zip(rest, full[2:]):
        assert torch.equal(x, xf) and torch.equal(y, yf)


def autoaugment(images, generator):
    return autoaugment_batch(images, "cifar10", generator)


@pytest.mark.parametrize("cpu_augment", [None, autoaugment], ids=["batched", "autoaugment"])
def test_batches_are_those_drawn_batch_by_batch(cpu_augment):
    # The epoch's indices and draws are made at once and AutoAugment runs a batch ahead in a thread: the batches
    # must be exactly those of drawing (seed, epoch, batch) batch by batch, for any rank and resume position.
    n, batch, world, rank, seed, epoch = 48, 8, 2, 1, 3, 2
    data = images(n, 32, 32)
    cfg = OmegaConf.create({"crop": True, "pad": 4, "flip": True, "cutout": 8, "cutout_per_image": False})
    aug = BatchAugment(cfg, MEAN, STD, (32, 32))
    loader = TrainLoader(
        data, torch.arange(n), batch, aug, seed=seed, rank=rank, world_size=world, cpu_augment=cpu_augment
    )
    loader.set_epoch(epoch, position=2)
    got = list(loader)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_from(seed, epoch)))
    lo, hi = rank * batch // world, (rank + 1) * batch // world
    assert len(got) == n // batch - 2
    for b, (x, y) in enumerate(got, start=2):
        idx = perm[b * batch : (b + 1) * batch][lo:hi]
        g = torch.Generator().manual_seed(seed_from(seed, epoch, b))
        draws = aug.draw(batch, g).slice(lo, hi)
        chosen = data[idx] if cpu_augment is None else cpu_augment(data[idx], g)
        assert torch.equal(y, idx) and torch.equal(x, aug(chosen, draws)), b


class HostOps(TorchDispatchMode):
    """The tensor operations run inside the block that read or make a CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cpu" for t in tensors) or str(kwargs.get("device")) == "cpu":
            self.ops.append(str(func))
        return func(*args, **kwargs)


def test_no_host_to_device_copy_per_batch():
    # The meta device stands in for a GPU: after the epoch's set-up (first batch), a batch of the training or the
    # evaluation loader must not touch a CPU tensor (each would be a blocking copy from pageable memory).
    meta = torch.device("meta")
    train = make_train_loader(batch=8, n=40)
    train.images, train.labels = train.images.to(meta), train.labels.to(meta)
    evaluation = EvalLoader(images(20).to(meta), torch.arange(20).to(meta), 5, MEAN, STD)
    for loader in (train, evaluation):
        batches = iter(loader)
        next(batches)
        with HostOps() as host:
            rest = list(batches)
        assert len(rest) == len(loader) - 1 and all(x.device == meta for x, _ in rest)
        assert host.ops == [], host.ops


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_the_split_exactly_once(world_size):
    n = 100
    seen = torch.cat(
        [y for r in range(world_size) for _, y in EvalLoader(images(n), torch.arange(n), 7, MEAN, STD, r, world_size)]
    )
    assert sorted(seen.tolist()) == list(range(n))


def test_validation_split_and_subset():
    train, val = select_train_indices(1000, 0.1, None, 0)
    assert len(val) == 100 and val[0] == 900 and len(train) == 900
    sub_a, _ = select_train_indices(1000, 0.1, 50, 7)
    sub_b, _ = select_train_indices(1000, 0.1, 50, 7)
    sub_c, _ = select_train_indices(1000, 0.1, 50, 8)
    assert np.array_equal(sub_a, sub_b) and not np.array_equal(sub_a, sub_c) and sub_a.max() < 900
    with pytest.raises(ConfigError, match="dataset.train_subset"):
        select_train_indices(1000, 0.1, 901, 0)
