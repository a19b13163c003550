"""AutoAugment on uint8 batches: torchvision's per-image policy, batched, reproducible from a generator."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torchvision.transforms import AutoAugment, AutoAugmentPolicy

from sam_repro.data.autoaugment import autoaugment_batch
from sam_repro.errors import ConfigError


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", ["cifar10", "svhn", "imagenet"])
def test_equals_torchvision_applied_image_by_image(policy):
    # The reference: torchvision's AutoAugment called per image under the global-RNG seed that autoaugment_batch
    # derives from the generator. Batched application must give the same pixels.
    x = images()
    out = autoaugment_batch(x, policy, torch.Generator().manual_seed(11))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(11)))
    reference = AutoAugment(AutoAugmentPolicy(policy))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = torch.stack([reference(image) for image in x])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_output_is_uint8_same_shape_and_differs_from_input():
    x = images()
    out = autoaugment_batch(x, "cifar10", torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    changed = (out != x).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 1.0  # most images change; sub-policies with p < 1 leave some alone
    torch.testing.assert_close(x, images())  # the input is not modified


def test_images_draw_independent_sub_policies():
    # The same image repeated 32 times: with one draw per batch every copy would come out identical.
    x = images(1).expand(32, -1, -1, -1).contiguous()
    out = autoaugment_batch(x, "cifar10", torch.Generator().manual_seed(3))
    assert len({bytes(o.numpy()) for o in out}) > 5


def test_reproducible_from_the_generator_and_independent_of_the_global_rng():
    x = images()
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    a = autoaugment_batch(x, "svhn", torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is left as it was
    torch.manual_seed(999)
    b = autoaugment_batch(x, "svhn", torch.Generator().manual_seed(5))
    c = autoaugment_batch(x, "svhn", torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_no_global_generator_is_reseeded(monkeypatch):
    # The CUDA generator drives dropout and the shake layers on a GPU; torch.manual_seed would reseed it (inside
    # fork_rng(devices=[]), which restores only the CPU one). No global generator may be seeded or forked here.
    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append(name) or contextlib.nullcontext()

    for module, name in (
        (torch, "manual_seed"),
        (torch.random, "manual_seed"),
        (torch.cuda, "manual_seed"),
        (torch.cuda, "manual_seed_all"),
        (torch.random, "fork_rng"),
        (torch, "set_rng_state"),
    ):
        monkeypatch.setattr(module, name, record(name))
    autoaugment_batch(images(8), "cifar10", torch.Generator().manual_seed(0))
    assert calls == []


def test_rejects_unknown_policy_and_float_input():
    with pytest.raises(ConfigError, match="augment.autoaugment"):
        autoaugment_batch(images(2), "mnist", torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        autoaugment_batch(images(2).float(), "cifar10", torch.Generator())
