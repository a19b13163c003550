"""ImageNet networks from timm: the ResNets of the paper's Table 2 and the EfficientNets it finetunes (Table 3).

ResNet-50/101/152 are timm's (v1.5: stride in the 3x3 conv, as the Flax ResNet of the official code) built with
`zero_init_last=True`, which zero-initialises the scale of the last BatchNorm of every residual block, the
official `scale_init=zeros` (docs/paper_reference.md section 2.3).

EfficientNets are built from timm's `tf_efficientnet_b*` by default: the TF-ported variants ('SAME' padding,
BatchNorm eps 1e-3) whose weights are the paper's starting points (`tf_efficientnet_b7.ra_in1k` is the
RandAugment checkpoint of Table 3). Weights are read from a local file (`pretrained_path`); nothing is fetched
from a hub at run time. When the checkpoint's classifier does not match `num_classes` it is left out and the new
head keeps timm's initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from sam_repro.errors import CheckpointError, ConfigError, DataError


def create_timm_model(
    num_classes: int,
    in_channels: int = 3,
    norm: str = "batch",
    timm_name: str = "resnet50",
    pretrained_path: str | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """timm's `timm_name` with a `num_classes` head, optionally loaded from the local weights `pretrained_path`.

    `drop_rate` / `drop_path_rate` override timm's per-architecture defaults when given.
    """
    import timm  # here, not at the top: importing timm takes seconds that CIFAR runs need not pay

    if norm != "batch":
        raise ConfigError(f"model.norm={norm!r} is not available for the timm model {timm_name}; use model.norm=batch")
    if not timm.is_model(timm_name):
        raise ConfigError(f"model.timm_name {timm_name!r} is not a timm architecture (see timm.list_models())")
    overrides = {k: v for k, v in {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}.items() if v is not None}
    if timm_name.startswith("resnet"):
        overrides["zero_init_last"] = True
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **overrides)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load the weights in `path` (.safetensors, or a torch file holding a state dict) into the timm `model`.

    The classifier is taken from the file only when its shape matches; every other tensor must be present and fit.
    """
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"model.pretrained_path {path} does not exist: save the {model.pretrained_cfg.get('architecture')} weights "
            "there (Table 3's EfficientNet-b7 is timm's tf_efficientnet_b7.ra_in1k) or set it to null"
        )
    try:
        # safetensors holds tensors only; a torch file is read weights-only (explicit: older PyTorch defaults to
        # full unpickling), so weights from elsewhere cannot run code when they are opened.
        state_dict = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for a corrupt or foreign file
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            detail = "it holds objects other than tensors and plain containers, which are not loaded"
        raise CheckpointError(f"cannot read pretrained weights from {path}: {detail}") from None

    head = model.pretrained_cfg.get("classifier", "classifier")
    own = model.state_dict()
    head_keys = (f"{head}.weight", f"{head}.bias")
    new_head = [key for key in head_keys if key in state_dict and state_dict[key].shape != own[key].shape]
    for key in new_head:
        del state_dict[key]

    mismatched = [key for key, tensor in state_dict.items() if key in own and tensor.shape != own[key].shape]
    if mismatched:
        keys = ", ".join(mismatched[:5])
        raise CheckpointError(f"pretrained weights {path} do not fit the model: shape mismatch in {keys}")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if key not in new_head]
    if missing or unexpected:
        raise CheckpointError(
            f"pretrained weights {path} do not fit model.timm_name {model.pretrained_cfg.get('architecture')}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
