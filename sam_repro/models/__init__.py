"""The model zoo: every network of the paper behind one factory, keyed by the config name.

`create_model(name, num_classes, in_channels, norm, **architecture)` is what `configs/model/<name>.yaml`
instantiates (`_target_: sam_repro.models.create_model`). A name fixes an architecture; keys given in the config
or on the command line (`model.depth=40`) override its defaults.

  CIFAR-style (any input size, any `in_channels`, `norm` = batch | group | none):
    wrn16_4 wrn16_8 wrn28_10 wrn40_2 wrn40_10      pre-activation Wide ResNets (wide_resnet.py)
    resnet8 resnet20 resnet32 resnet44 resnet56 resnet110   He et al. CIFAR ResNets (resnet_cifar.py)
    shake_shake_26_2x96d shake_shake_26_2x32d     Shake-Shake ResNets (shake_shake.py)
    pyramidnet272[_shakedrop] pyramidnet110[_shakedrop]   PyramidNets (pyramidnet.py)
  ImageNet / finetuning, from timm (norm = batch only):
    resnet50 resnet101 resnet152, efficientnet_b0 ... efficientnet_b7 (timm_models.py)

Models know nothing of SAM; the one hook the engine needs is `set_true_gradient` for the stochastic layers, and
`convert_sync_batchnorm` serves `trainer.sync_bn`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from sam_repro.errors import ConfigError
from sam_repro.models.layers import NORMS, make_norm
from sam_repro.models.pyramidnet import PyramidNet
from sam_repro.models.resnet_cifar import CifarResNet
from sam_repro.models.shake import ShakeDrop, ShakeShake, set_true_gradient
from sam_repro.models.shake_shake import ShakeShakeResNet
from sam_repro.models.timm_models import create_timm_model, load_pretrained
from sam_repro.models.wide_resnet import WideResNet

__all__ = [
    "NORMS",
    "CifarResNet",
    "PyramidNet",
    "ShakeDrop",
    "ShakeShake",
    "ShakeShakeResNet",
    "WideResNet",
    "architecture_defaults",
    "convert_sync_batchnorm",
    "create_model",
    "list_models",
    "load_pretrained",
    "make_norm",
    "set_true_gradient",
]

# name -> (constructor, architecture defaults). Each entry has a configs/model/<name>.yaml spelling out the same keys.
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "wrn16_4": (WideResNet, {"depth": 16, "widen_factor": 4}),
    "wrn16_8": (WideResNet, {"depth": 16, "widen_factor": 8}),
    "wrn28_10": (WideResNet, {"depth": 28, "widen_factor": 10}),
    "wrn40_2": (WideResNet, {"depth": 40, "widen_factor": 2}),
    # The paper's Hessian analysis (section 4.2) uses WideResNet40-10 without BatchNorm: model=wrn40_10 model.norm=none.
    "wrn40_10": (WideResNet, {"depth": 40, "widen_factor": 10}),
    **{f"resnet{depth}": (CifarResNet, {"depth": depth}) for depth in (8, 20, 32, 44, 56, 110)},
    "shake_shake_26_2x96d": (ShakeShakeResNet, {"depth": 26, "width": 96}),
    "shake_shake_26_2x32d": (ShakeShakeResNet, {"depth": 26, "width": 32}),
    "pyramidnet272": (PyramidNet, {"depth": 272, "alpha": 200, "bottleneck": True, "shakedrop": False}),
    "pyramidnet272_shakedrop": (PyramidNet, {"depth": 272, "alpha": 200, "bottleneck": True, "shakedrop": True}),
    "pyramidnet110": (PyramidNet, {"depth": 110, "alpha": 48, "bottleneck": False, "shakedrop": False}),
    "pyramidnet110_shakedrop": (PyramidNet, {"depth": 110, "alpha": 48, "bottleneck": False, "shakedrop": True}),
    **{f"resnet{depth}": (create_timm_model, {"timm_name": f"resnet{depth}"}) for depth in (50, 101, 152)},
    **{f"efficientnet_b{i}": (create_timm_model, {"timm_name": f"tf_efficientnet_b{i}"}) for i in range(8)},
}


_FROM_DATASET = ("num_classes", "in_channels", "norm")


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    if name not in _REGISTRY:
        raise ConfigError(f"model.name {name!r} is unknown; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def architecture_defaults(name: str) -> dict[str, Any]:
    """Every architecture key of `name` with its default value, i.e. what configs/model/<name>.yaml spells out
    besides `num_classes`, `in_channels` and `norm`."""
    constructor, defaults = _lookup(name)
    parameters = inspect.signature(constructor).parameters
    return {**{key: p.default for key, p in parameters.items() if key not in _FROM_DATASET}, **defaults}


def create_model(name: str, num_classes: int, in_channels: int = 3, norm: str = "batch", **kwargs: Any) -> nn.Module:
    """Build the network registered as `name` with a `num_classes`-way classifier for `in_channels` input channels.

    `kwargs` override the architecture defaults of `name` (e.g. `depth`, `widen_factor`, `shortcut`, `alpha`,
    `pretrained_path`); an unknown name or key raises ConfigError.
    """
    constructor, defaults = _lookup(name)
    accepted = architecture_defaults(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        keys = ", ".join(f"model.{key}" for key in unknown)
        raise ConfigError(f"{keys} not understood by model {name!r}; its keys are: {', '.join(accepted)}")
    return constructor(num_classes=num_classes, in_channels=in_channels, norm=norm, **{**defaults, **kwargs})


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm layer replaced by a SyncBatchNorm sharing its parameters and buffers.

    timm's norm + activation layers (`BatchNormAct2d`, EfficientNet's) go through timm's converter, which keeps
    their activation and dropout; torch's converter would turn them into a bare SyncBatchNorm, silently dropping the
    activation. CIFAR models use torch's (importing timm costs seconds).
    """
    if any(type(m).__module__.startswith("timm.") for m in model.modules()):
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
