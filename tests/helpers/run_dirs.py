"""Fake run directories, written the way sam-train writes them, for the tables and the report."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_run(
    root: Path,
    *,
    optimizer: str,
    seed: int,
    test_error: float | None,
    dataset: str = "cifar10",
    model: str = "wrn28_10",
    augment: str = "basic",
    epochs: int = 200,
    label_noise: float = 0.0,
    status: str = "finished",
    reason: str | None = None,
    rho: float | None = 0.05,
    lr: float = 0.1,
    top5: float | None = None,
    curve: list[float] | None = None,
    name: str | None = None,
    experiment: str | None = None,
    optimizer_keys: dict | None = None,
    summary_keys: dict | None = None,
) -> Path:
    """One run directory with config.yaml, summary.json and (when `curve` is given) metrics.jsonl.
    `optimizer_keys` and `summary_keys` add to (or replace) the optimizer config and the summary."""
    name = name or f"{dataset}_{model}_{augment}_{epochs}ep_noise{label_noise}/optimizer={optimizer}"
    directory = root / name / f"seed{seed}"
    directory.mkdir(parents=True)
    optimizer_config = {"name": optimizer, "lr": lr, "weight_decay": 5e-4, "momentum": 0.9}
    if optimizer != "sgd" and rho is not None:
        optimizer_config["rho"] = rho
    optimizer_config.update(optimizer_keys or {})
    config = {
        "experiment": experiment,
        "seed": seed,
        "run_root": str(root),
        "dataset": {
            "name": dataset,
            "root": "/data",
            "num_classes": 10,
            "in_channels": 3,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "train_subset": None,
            "label_noise": label_noise,
            "noise_seed": 0,
        },
        "model": {"_target_": "sam_repro.models.create_model", "name": model},
        "augment": {"name": augment},
        "optimizer": optimizer_config,
        "trainer": {"epochs": epochs, "epoch_scale": 1.0, "batch_size": 256, "m": 32},
        "logger": {"name": "none"},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = {
        "status": status,
        "reason": reason,
        "test_error": test_error,
        "best_test_error": test_error,
        "test_error_top5": top5,
        "epochs": epochs,
        "wall_time_s": 1.0,
        "images_per_second": 1.0,
        "label_noise": None,
        "provenance": {"command": "sam-train"},
        **(summary_keys or {}),
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    if curve is not None:
        lines = [
            json.dumps({"epoch": i + 1, "step": 10 * (i + 1), "test_error": e, "train_error": e + 1})
            for i, e in enumerate(curve)
        ]
        (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory
