"""One preset of every paper table trained for one step through `sam-train`, with the paper's model and recipe.

Overrides that keep each run to seconds on a CPU (the preset's other settings are left as the paper has them):
  * all:     trainer.max_steps=1 trainer.epochs=1 logger.mode=disabled trainer.threads=1, small batches, and
             trainer.m set to divide them (the presets use 32 or 128);
  * CIFAR-like: dataset.train_subset / dataset.test_subset of a few dozen images;
  * Table 2: a 2-class ImageFolder of 40 x 40 PNGs written here, images reduced to 32 px (dataset.image_size=32),
             dataset.workers=0;
  * Table 3: model=efficientnet_b0 in place of b7 (the preset's recipe otherwise), with a random-init checkpoint
             written here as model.pretrained_path (no hub).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_repro.data.sources import cache_path

BIN = Path(sys.executable).parent
FAST = ["trainer.max_steps=1", "trainer.epochs=1", "logger.mode=disabled", "trainer.threads=1"]
CIFAR_TINY = ["dataset.train_subset=32", "dataset.test_subset=16", "trainer.batch_size=8", "trainer.m=4",
              "trainer.eval_batch_size=16"]


def smoke(tmp_path: Path, *overrides: str) -> dict:
    env = {**os.environ, "SAM_RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "sam-train"), *overrides, *FAST], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    result = json.loads(summary.read_text())
    assert result["status"] == "finished"
    config = (summary.parent / "config.yaml").read_text()
    return {"summary": result, "config": config, "metrics": (summary.parent / "metrics.jsonl").read_text()}


needs_cifar = pytest.mark.skipif(not cache_path("cifar10").exists(), reason="CIFAR-10 is not prepared")


@needs_cifar
def test_table1_wrn28_10(tmp_path):
    out = smoke(tmp_path, "experiment=table1/wrn28_10_200ep", "dataset=cifar10", "augment=cutout", "optimizer=sam",
                *CIFAR_TINY)
    assert "name: wrn28_10" in out["config"] and "grad_clip: 5.0" in out["config"] and "rho: 0.05" in out["config"]


@needs_cifar
def test_table4_label_noise(tmp_path):
    out = smoke(tmp_path, "experiment=table4/resnet32_noise", "dataset.label_noise=0.8", "optimizer=sam",
                *CIFAR_TINY)
    assert out["summary"]["label_noise"]["rate_requested"] == 0.8
    assert "rho: 0.05" in out["config"]  # the paper's rho at 80% noise


@pytest.mark.skipif(not cache_path("fashion_mnist").exists() and not Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="Fashion-MNIST is neither prepared nor installed (apt-get install dataset-fashion-mnist)")
def test_table5_fashion_mnist(tmp_path):
    out = smoke(tmp_path, "experiment=table5/wrn28_10", "dataset=fashion_mnist", "optimizer=sam", *CIFAR_TINY)
    assert "in_channels: 1" in out["config"]


def test_table2_imagenet_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for wnid in ("n01440764", "n01443537"):
            folder = tmp_path / "data" / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = smoke(tmp_path, "experiment=table2/resnet50", "optimizer=sam", f"dataset.root={tmp_path / 'data'}",
                "dataset.image_size=32", "dataset.workers=0", "trainer.batch_size=4", "trainer.m=2",
                "trainer.eval_batch_size=4")
    assert "name: resnet50" in out["config"] and "label_smoothing: 0.1" in out["config"]
    assert json.loads(out["metrics"].splitlines()[-1])["step"] == 1


@needs_cifar
def test_table3_finetune_from_a_local_checkpoint(tmp_path):
    from sam_repro.models import create_model

    weights = tmp_path / "b0.pt"
    torch.save(create_model("efficientnet_b0", num_classes=1000).state_dict(), weights)
    out = smoke(tmp_path, "experiment=table3/efficientnet_b7", "model=efficientnet_b0", f"model.pretrained_path={weights}",
                "dataset=cifar10", "optimizer=sam", *CIFAR_TINY)
    assert "name: efficientnet_b0" in out["config"]
