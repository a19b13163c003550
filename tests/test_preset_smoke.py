"""One preset of every paper table trained for one step through `sam-train`, with the paper's model and recipe.

Every run adds `debug=preset` (sam_repro/configs/debug/preset.yaml: one step of one epoch on 32 training and 16
test images, batch 8 in groups of m = 4, one thread, no W&B), which leaves the preset's model and recipe as the
paper has them. Beyond it:
  * Table 2: a 2-class ImageFolder of 40 x 40 PNGs written here, images reduced to 32 px (dataset.image_size=32),
             dataset.workers=0, and the whole of it (no subsets) in batches of 4 in groups of 2;
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
import yaml

from sam_repro.data.sources import cache_path

BIN = Path(sys.executable).parent
SMOKE = ["debug=preset"]


def smoke(tmp_path: Path, *overrides: str) -> dict:
    env = {**os.environ, "SAM_RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(BIN / "sam-train"), *overrides, *SMOKE], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    result = json.loads(summary.read_text())
    assert result["status"] == "stopped"  # debug=preset: trainer.max_steps=1, short of the schedule
    config = yaml.safe_load((summary.parent / "config.yaml").read_text())
    assert (config["trainer"]["max_steps"], config["logger"]["mode"]) == (1, "disabled")  # debug=preset applied
    return {"summary": result, "config": config, "metrics": (summary.parent / "metrics.jsonl").read_text()}


@pytest.mark.data
def test_table1_wrn28_10(tmp_path):
    out = smoke(tmp_path, "experiment=table1/wrn28_10_200ep", "dataset=cifar10", "augment=cutout", "optimizer=sam")
    config = out["config"]
    assert (config["model"]["name"], config["trainer"]["grad_clip"], config["optimizer"]["rho"]) == (
        "wrn28_10",
        5.0,
        0.05,
    )
    assert config["augment"]["cutout"] > 0


@pytest.mark.data
def test_table4_label_noise(tmp_path):
    out = smoke(tmp_path, "experiment=table4/resnet32_noise", "dataset.label_noise=0.8", "optimizer=sam")
    assert out["summary"]["label_noise"]["rate_requested"] == 0.8
    assert out["config"]["optimizer"]["rho"] == 0.05  # the paper's rho at 80% noise


@pytest.mark.skipif(
    not cache_path("fashion_mnist").exists() and not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Fashion-MNIST is neither prepared nor installed (apt-get install dataset-fashion-mnist)",
)
def test_table5_fashion_mnist(tmp_path):
    out = smoke(tmp_path, "experiment=table5/wrn28_10", "dataset=fashion_mnist", "optimizer=sam")
    assert out["config"]["dataset"]["in_channels"] == 1 and out["config"]["model"]["in_channels"] == 1


def test_table2_imagenet_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for wnid in ("n01440764", "n01443537"):
            folder = tmp_path / "data" / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = smoke(
        tmp_path,
        "experiment=table2/resnet50",
        "optimizer=sam",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.image_size=32",
        "dataset.workers=0",
        "dataset.train_subset=null",
        "dataset.test_subset=null",
        "trainer.batch_size=4",
        "trainer.m=2",
        "trainer.eval_batch_size=4",
    )
    config = out["config"]
    assert (config["model"]["name"], config["trainer"]["label_smoothing"]) == ("resnet50", 0.1)
    assert json.loads(out["metrics"].splitlines()[-1])["step"] == 1


@pytest.mark.data
def test_table3_finetune_from_a_local_checkpoint(tmp_path):
    from sam_repro.models import create_model

    weights = tmp_path / "b0.pt"
    torch.save(create_model("efficientnet_b0", num_classes=1000).state_dict(), weights)
    out = smoke(
        tmp_path,
        "experiment=table3/efficientnet_b7",
        "model=efficientnet_b0",
        f"model.pretrained_path={weights}",
        "dataset=cifar10",
        "optimizer=sam",
    )
    assert out["config"]["model"]["name"] == "efficientnet_b0"
    assert out["config"]["model"]["pretrained_path"] == str(weights)
