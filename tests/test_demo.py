"""`make demo`'s profiles: the GPU demo where CUDA is available, the CPU demo elsewhere, either one on request; the
GPU profile's preset and its code path at toy size on this CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from sam_repro.acceptance.throughput import flops_per_image
from sam_repro.data.sources import cache_path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def test_profile_follows_cuda_unless_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.choose_profile("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.choose_profile("auto") == "gpu"
    assert demo.choose_profile("cpu") == "cpu" and demo.choose_profile("gpu") == "gpu"
    assert demo.PROFILES == {"cpu": "demo", "gpu": "demo_gpu"}


def test_make_demo_passes_the_profile():
    dry = subprocess.run(
        ["make", "-n", "demo", "DEMO=gpu", "VENV=/nonexistent"], cwd=ROOT, capture_output=True, text=True
    )
    assert "scripts/demo.py --profile gpu" in dry.stdout
    dry = subprocess.run(["make", "-n", "demo", "VENV=/nonexistent"], cwd=ROOT, capture_output=True, text=True)
    assert "scripts/demo.py --profile auto" in dry.stdout


def test_gpu_preset_is_all_clean_cifar10_on_a_wrn_in_bf16_for_minutes():
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo_gpu", "optimizer=sam"])
    assert cfg.dataset.name == "cifar10" and cfg.dataset.train_subset is None and cfg.dataset.label_noise == 0
    assert cfg.dataset.test_subset is None and cfg.model.name.startswith("wrn")
    assert (cfg.trainer.precision, cfg.trainer.channels_last, cfg.trainer.m) == ("bf16", True, 32)
    # SGD (one forward-backward per image) plus SAM (two): FLOPs of both runs, against a few minutes at 300 TFLOP/s.
    total = 3 * 50_000 * cfg.trainer.epochs * flops_per_image(cfg.model.name, 32, 3, 10)
    assert 10e15 < total < 100e15, total / 1e15


@pytest.mark.skipif(not cache_path("cifar10").exists(), reason="CIFAR-10 is not prepared (make test does)")
def test_gpu_profile_code_path_at_toy_size():
    """`scripts/demo.py --profile gpu` end to end on this CPU: the GPU preset, shrunk."""
    runs = Path("runs") / f"test-demo-gpu-{uuid.uuid4().hex[:8]}"  # relative: the demo prints paths under the root
    toy = [
        "trainer.device=cpu",
        "model.depth=10",
        "model.widen_factor=1",
        "dataset.train_subset=256",
        "dataset.test_subset=500",
        "trainer.batch_size=64",
        "trainer.epochs=1",
        "trainer.eval_every=1",
        "logger.mode=disabled",
        "trainer.threads=1",
    ]
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--profile", "gpu", *toy],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
            env={**os.environ, "SAM_RUNS_DIR": str(runs)},
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "demo: the gpu profile (experiment=demo_gpu)" in result.stdout
        assert "SGD vs SAM on real CIFAR-10 (experiment=demo_gpu" in result.stdout
        for optimizer in ("sgd", "sam"):
            (run_dir,) = (ROOT / runs / "demo_gpu").glob(f"*optimizer={optimizer}*/seed0")
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "finished" and summary["num_train"] == 256
            config = (run_dir / "config.yaml").read_text()
            for line in ("precision: bf16", "channels_last: true", "name: wrn16_8", f"name: {optimizer}"):
                assert line in config
    finally:
        shutil.rmtree(ROOT / runs, ignore_errors=True)
