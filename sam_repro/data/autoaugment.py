"""AutoAugment (Cubuk et al., 2019) for uint8 batches: torchvision's policies, drawn independently per image.

The paper's "AA" rows apply the CIFAR policy (SVHN policy for SVHN) per image before the basic crop/flip
[docs/paper_reference.md 2.2]. torchvision's `AutoAugment` draws one sub-policy per call from torch's *global* RNG, so
calling it on a batch would give every image the same operations, and calling it per image costs ~0.3 ms each
(15 s per CIFAR epoch on one core). Here:
  1. the sub-policies are drawn per image, in order, as torchvision's `AutoAugment.get_params` draws them, but from
     a private generator seeded from the caller's `generator`: the draws are exactly those of
     `[AutoAugment(policy)(image) for image in images]` under `torch.manual_seed` of that seed, reproducible from
     `generator`, and no global generator (CPU or CUDA) is read or reseeded, so the function is safe to run in a
     thread beside training, whose dropout and shake layers draw from the global generators;
  2. the images that drew the same (operation, magnitude) at the same stage are transformed together by
     torchvision's `_apply_op`, which is what `AutoAugment.forward` calls per image, so the result equals the
     per-image loop pixel for pixel (tests/test_autoaugment.py checks this) at a few dozen batched calls.
`_apply_op`, `_augmentation_space` and the order of `get_params`' draws are torchvision internals; torchvision is
pinned in pyproject.toml and the equality test catches a change in them.
"""

from __future__ import annotations

from functools import cache

import torch
from torchvision.transforms import AutoAugment, AutoAugmentPolicy
from torchvision.transforms.autoaugment import _apply_op

from sam_repro.errors import ConfigError

POLICIES = tuple(p.value for p in AutoAugmentPolicy)  # ("imagenet", "cifar10", "svhn")
_NUM_MAGNITUDE_BINS = 10  # AutoAugment.forward's value


@cache
def _augmenter(policy: str) -> AutoAugment:
    if policy not in POLICIES:
        raise ConfigError(f"augment.autoaugment must be one of {', '.join(POLICIES)} (got {policy!r})")
    return AutoAugment(AutoAugmentPolicy(policy))


def _sub_policy_draws(
    n: int, num_policies: int, generator: torch.Generator
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """`AutoAugment.get_params(num_policies)` for n images in turn, drawn from `generator` in the same order."""
    draws = []
    for _ in range(n):
        policy_id = int(torch.randint(num_policies, (1,), generator=generator).item())
        probs = torch.rand((2,), generator=generator)
        signs = torch.randint(2, (2,), generator=generator)
        draws.append((policy_id, probs, signs))
    return draws


def autoaugment_batch(images: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """Apply AutoAugment `policy` (cifar10 | svhn | imagenet) to each image of a uint8 N x C x H x W CPU batch with
    its own sub-policy draw; reproducible from `generator` (advanced by one draw). Returns a new uint8 tensor."""
    augment = _augmenter(policy)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.device.type != "cpu":
        raise ValueError(
            f"autoaugment_batch needs a uint8 N x C x H x W CPU tensor (got {images.dtype} "
            f"{tuple(images.shape)} on {images.device})"
        )
    n, _, height, width = images.shape
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    draws = _sub_policy_draws(n, len(augment.policies), torch.Generator().manual_seed(seed))

    operations = augment._augmentation_space(_NUM_MAGNITUDE_BINS, (height, width))
    out = images.clone()
    for stage in range(2):  # every sub-policy is two (operation, probability, magnitude bin) steps
        groups: dict[tuple[str, float], list[int]] = {}
        for i, (policy_id, probs, signs) in enumerate(draws):
            op_name, probability, magnitude_id = augment.policies[policy_id][stage]
            if probs[stage] <= probability:
                magnitudes, signed = operations[op_name]
                magnitude = float(magnitudes[magnitude_id].item()) if magnitude_id is not None else 0.0
                if signed and signs[stage] == 0:
                    magnitude = -magnitude
                groups.setdefault((op_name, magnitude), []).append(i)
        for (op_name, magnitude), members in groups.items():
            index = torch.tensor(members)
            out[index] = _apply_op(
                out[index], op_name, magnitude, interpolation=augment.interpolation, fill=augment.fill
            )
    return out
