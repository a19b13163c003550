"""`make demo`'s profiles: the GPU demo where CUDA is available, the CPU demo elsewhere, either one on request; the
GPU profile's preset and its code path at toy size on this CPU."""

from __future__ import annotations

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

from helpers.scripts import load_file
from sam_repro.acceptance.throughput import flops_per_image
from sam_repro.data.sources import cache_path

ROOT = Path(__file__).resolve().parents[1]
demo = load_file("scripts/demo.py", "demo")


def run_demo_script(profile: str, overrides: list[str], runs: Path) -> subprocess.CompletedProcess:
    """`scripts/demo.py --profile <profile> <overrides>` with its runs in `runs`; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--profile", profile, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "SAM_RUNS_DIR": str(runs)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


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
        result = run_demo_script("gpu", toy, runs)
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


def test_cpu_preset_is_the_setting_measured_over_five_seeds():
    """`experiment=demo` trains exactly as the 5-seed runs of results/cpu_scale_table4_search/ that the README
    quotes (cpu_scale_table4 on 1,000 images for 60 epochs, 40% noise, a 5-epoch warm-up): only keys that change
    nothing differ."""
    from omegaconf import OmegaConf

    from sam_repro.engine.rundir import config_changes

    measured = ["experiment=cpu_scale_table4", "dataset.train_subset=1000", "trainer.epochs=60"]
    measured += ["schedule.warmup_epochs=5"]
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        for optimizer in ("sgd", "sam"):
            cfg = compose("train", overrides=["experiment=demo", f"optimizer={optimizer}"])
            ref = compose("train", overrides=[*measured, f"optimizer={optimizer}", "dataset.label_noise=0.4"])
            demo_cfg, ref_cfg = (OmegaConf.to_container(c, resolve=True) for c in (cfg, ref))
            assert config_changes(ref_cfg, demo_cfg) == []
            assert config_changes(ref_cfg, {**demo_cfg, "seed": 1}) != []  # the comparison can fail
    assert (cfg.dataset.label_noise, cfg.dataset.train_subset, cfg.trainer.epochs) == (0.4, 1000, 60)
    assert cfg.trainer.m == cfg.trainer.batch_size == 128 and cfg.optimizer.rho == 0.1
    assert cfg.schedule.warmup_epochs == 5 and cfg.optimizer.sam_start == 0
    assert cfg.logger.mode == "offline" and list(cfg.logger.tags) == ["demo"]


def _table_rows(stdout: str) -> dict[str, dict[str, float]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], map(float, cells[1:])))
    return rows


@pytest.mark.skipif(not cache_path("cifar10").exists(), reason="CIFAR-10 is not prepared (make test does)")
def test_cpu_demo_closing_table_equals_the_two_summaries(tmp_path):
    """`scripts/demo.py --profile cpu` at toy size: its closing table holds each run's summary.json values (test
    error, best test error, memorized) and SAM - SGD computed from them."""
    runs = tmp_path / "runs"  # absolute, outside the checkout: the demo prints it as given
    toy = [
        "model=resnet8",
        "dataset.train_subset=256",
        "dataset.test_subset=500",
        "dataset.val_fraction=0",
        "trainer.batch_size=64",
        "trainer.m=64",
        "trainer.epochs=2",
        "trainer.eval_every=1",
        "logger.mode=disabled",
        "trainer.threads=1",
    ]
    result = run_demo_script("cpu", toy, runs)
    rows = _table_rows(result.stdout)
    assert set(rows) == {"sgd", "sam"}
    summaries = {}
    for optimizer in ("sgd", "sam"):
        (run_dir,) = (runs / "demo").glob(f"*optimizer={optimizer}*/seed0")
        s = summaries[optimizer] = json.loads((run_dir / "summary.json").read_text())
        assert s["status"] == "finished" and s["label_noise"]["n_corrupted"] > 0
        assert rows[optimizer]["test error %"] == round(s["test_error"], 2)
        assert rows[optimizer]["best test error %"] == round(s["best_test_error"], 2)
        assert rows[optimizer]["memorized %"] == round(s["memorized"], 2)
        assert rows[optimizer]["epochs"] == s["epochs"] == 2
        assert str(run_dir) in result.stdout
    diff = summaries["sam"]["test_error"] - summaries["sgd"]["test_error"]
    mem = summaries["sam"]["memorized"] - summaries["sgd"]["memorized"]
    assert f"SAM - SGD test error: {diff:+.2f} points, memorized {mem:+.2f} points" in result.stdout
