"""A tiny run as sam-train leaves it (config.yaml + checkpoints/last.pt), and fake dataset arrays to evaluate it on.

The `fake_dataset` fixture (tests/conftest.py) serves `fake_arrays()` in place of the data layer's readers, so the
analysis tests need no data on disk.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
import yaml

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10


def tiny_model_config(in_features: int = 3 * 8 * 8) -> dict:
    """A small convnet with BatchNorm, as a hydra config (the shape `cfg.model` has in a run's config)."""
    return {
        "_target_": "torch.nn.Sequential",
        "_args_": [
            {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
            {"_target_": "torch.nn.BatchNorm2d", "num_features": 4},
            {"_target_": "torch.nn.ReLU"},
            {"_target_": "torch.nn.AdaptiveAvgPool2d", "output_size": 2},
            {"_target_": "torch.nn.Flatten"},
            {"_target_": "torch.nn.Linear", "in_features": 16, "out_features": NUM_CLASSES},
        ],
    }


def run_config(model_cfg: dict | None = None, optimizer: str = "sam", seed: int = 0) -> dict:
    return {
        "experiment": "test",
        "seed": seed,
        "dataset": {
            "name": "fake10",
            "root": "/nonexistent/data",
            "num_classes": NUM_CLASSES,
            "in_channels": 3,
            "mean": list(MEAN),
            "std": list(STD),
            "train_subset": None,
            "label_noise": 0.0,
            "noise_seed": 0,
        },
        "model": model_cfg or tiny_model_config(),
        "optimizer": {"name": optimizer, "lr": 0.1, "weight_decay": 5e-4, "rho": 0.05 if optimizer == "sam" else None},
        "trainer": {"epochs": 3, "epoch_scale": 1.0, "batch_size": 16, "m": None},
    }


def write_run(run_dir: Path, seed: int = 0, optimizer: str = "sam", model_cfg: dict | None = None) -> torch.nn.Module:
    """A run directory as sam-train leaves it (config.yaml + checkpoints/last.pt); returns the saved model.

    BatchNorm running statistics are set far from (0, 1), so evaluating in train mode by mistake changes the result.
    """
    import hydra.utils

    config = run_config(model_cfg, optimizer, seed)
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(config["model"])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    # The keys of the trainer's checkpoints that the analyses read, and its per-rank torch RNG states.
    checkpoint = {
        "format": 1,
        "model": model.state_dict(),
        "config": config,
        "epoch": 3,
        "step": 30,
        "optimizer": {},
        "rng": [{"cpu": torch.get_rng_state(), "cuda": None}],
    }
    torch.save(checkpoint, run_dir / "checkpoints" / "last.pt")
    return model.eval()


def fake_arrays(num_train: int = 48, num_test: int = 40, size: int = 8) -> types.SimpleNamespace:
    generator = np.random.default_rng(0)
    return types.SimpleNamespace(
        name="fake10",
        num_classes=NUM_CLASSES,
        train_images=generator.integers(0, 256, (num_train, size, size, 3), dtype=np.uint8),
        train_labels=generator.integers(0, NUM_CLASSES, num_train).astype(np.int64),
        test_images=generator.integers(0, 256, (num_test, size, size, 3), dtype=np.uint8),
        test_labels=generator.integers(0, NUM_CLASSES, num_test).astype(np.int64),
    )
