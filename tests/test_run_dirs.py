"""`engine.rundir.run_dir`, the one way to name a run directory outside Hydra (the scripts, the demo, the cluster
scripts), gives the directory sam-train's root config derives (`hydra.run.dir`), SAM_RUNS_DIR included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from helpers.scripts import load_file
from sam_repro.engine.rundir import RunFiles, register_resolvers, run_dir, run_path, runs_root

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    [],
    ["experiment=demo", "optimizer=sam"],
    ["experiment=cpu_scale", "dataset.label_noise=0.4", "optimizer=sgd", "seed=2", "trainer.threads=1"],
    ["optimizer=sam", "seed=1", "trainer.epochs=3", "seed=4", "logger.mode=disabled"],
    ["experiment=cpu_scale", "optimizer=sam", "++trainer.m=32", "run_root=elsewhere"],
]


def hydra_run_dir(overrides: list[str], monkeypatch, runs_dir: str | None) -> Path:
    """hydra.run.dir as sam-train resolves it, for these overrides and SAM_RUNS_DIR."""
    if runs_dir is None:
        monkeypatch.delenv("SAM_RUNS_DIR", raising=False)
    else:
        monkeypatch.setenv("SAM_RUNS_DIR", runs_dir)
    register_resolvers()
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        return Path(OmegaConf.select(cfg, "hydra.run.dir"))
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("overrides", CASES)
@pytest.mark.parametrize("runs_dir", [None, "rel/runs", "/abs/runs"])
def test_run_dir_is_the_directory_the_root_config_derives(overrides, runs_dir, monkeypatch):
    expected = hydra_run_dir(overrides, monkeypatch, runs_dir)
    assert run_dir(overrides) == expected
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    others = [o for o in overrides if not o.startswith("experiment=")]
    assert run_dir(others, experiment) == expected


def test_roots_and_explicit_directories():
    assert runs_root({}) == Path("runs") and runs_root({"SAM_RUNS_DIR": "/x"}) == Path("/x")
    assert run_dir(["optimizer=sam"], "demo", environ={"SAM_RUNS_DIR": "/x"}) == Path("/x/demo/optimizer=sam/seed0")
    assert run_dir(["optimizer=sam"], "demo", root="/y", environ={"SAM_RUNS_DIR": "/x"}).parent.parent.parent == Path(
        "/y"
    )
    assert run_dir(["optimizer=sam", "hydra.run.dir=/z/run"]) == Path("/z/run")
    assert run_path(["seed=3", "optimizer=sgd"], "demo") == Path("demo/optimizer=sgd/seed3")


def test_the_module_prints_it_for_shell_scripts(tmp_path):
    env = {"SAM_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in __import__("os").environ.items() if k == "PYTHONPATH"})
    args = ["experiment=cpu_scale", "dataset.label_noise=0.4", "optimizer=sgd", "seed=0"]
    out = subprocess.run(
        [sys.executable, "-m", "sam_repro.engine.rundir", *args], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(tmp_path / "cpu_scale" / "dataset.label_noise=0.4,optimizer=sgd" / "seed0")
    root = subprocess.run(
        [sys.executable, "-m", "sam_repro.engine.rundir", "--root"], env=env, capture_output=True, text=True
    )
    assert root.stdout.strip() == str(tmp_path)


def test_run_files_name_each_file_of_a_run_directory_once():
    files = RunFiles("runs/demo/seed0")
    assert files.root == Path("runs/demo/seed0")
    got = [files.config, files.summary, files.metrics, files.steps, files.checkpoint, files.train_log]
    names = ["config.yaml", "summary.json", "metrics.jsonl", "steps.jsonl", "checkpoints/last.pt", "train.log"]
    assert got == [Path("runs/demo/seed0", name) for name in names]
    assert (files.hydra_record, files.lock, files.analysis) == tuple(
        files.root / n for n in (".hydra", ".lock", "analysis")
    )
    assert RunFiles.of_checkpoint(files.checkpoint) == files and RunFiles.in_checkpoints(files.checkpoint)
    assert not RunFiles.in_checkpoints(files.config)


def test_hydra_logs_to_the_run_files_log():
    """train.log is written by Hydra's logging config, which cannot import RunFiles: the two must agree."""
    import yaml

    config = ROOT / "sam_repro" / "configs" / "hydra" / "job_logging" / "sam.yaml"
    filename = yaml.safe_load(config.read_text())["handlers"]["file"]["filename"]
    assert filename == "${hydra.runtime.output_dir}/" + RunFiles.LOG


# ---- the scripts name their runs with it -------------------------------------------------------------------------


def fake_sam_train(monkeypatch, module, files=("config.yaml", "metrics.jsonl", "summary.json")):
    """`subprocess.call` of sam-train replaced by writing a finished run where run_dir says sam-train trains."""
    summary = {
        "status": "finished",
        "test_error": 20.0,
        "best_test_error": 19.0,
        "epochs": 1,
        "wall_time_s": 1.0,
        "images_per_second": 1.0,
    }

    def call(cmd, cwd, **_):
        overrides = [word for word in cmd[1:] if "=" in word]
        directory = Path(cwd) / run_dir(overrides)
        directory.mkdir(parents=True)
        for name in files:
            (directory / name).write_text(__import__("json").dumps(summary) if name == "summary.json" else "x\n")
        return 0

    monkeypatch.setattr(module.subprocess, "call", call)


@pytest.mark.parametrize("absolute", [True, False])
def test_demo_finds_its_runs_under_sam_runs_dir_inside_or_outside_the_repository(
    absolute, tmp_path, monkeypatch, capsys
):
    demo = load_file("scripts/demo.py", "demo")
    runs = tmp_path / "runs" if absolute else Path("runs") / f"test-run-dirs-{tmp_path.name}"
    monkeypatch.setenv("SAM_RUNS_DIR", str(runs))
    fake_sam_train(monkeypatch, demo)
    try:
        assert demo.run_demo("demo", ["seed=3"]) == 0
        shown = capsys.readouterr().out.split("Run directories:")[1].split()
        expected = [runs / "demo" / f"optimizer={o}" / "seed3" for o in ("sgd", "sam")]
        assert shown == [str(p) for p in expected]
    finally:
        if not absolute:
            import shutil

            shutil.rmtree(ROOT / runs, ignore_errors=True)


def test_run_cpu_scale_keeps_each_run_from_sam_runs_dir(tmp_path, monkeypatch):
    script = load_file("scripts/run_cpu_scale.py", "run_cpu_scale")
    monkeypatch.setenv("SAM_RUNS_DIR", str(tmp_path / "elsewhere"))
    fake_sam_train(monkeypatch, script)
    overrides = ["dataset.label_noise=0.4", "optimizer=sam", "seed=1", "trainer.m=32"]
    _, rc, _ = script.run_one("cpu_scale", overrides, tmp_path / "results")
    kept = tmp_path / "results" / "runs" / "cpu_scale" / "dataset.label_noise=0.4,optimizer=sam,trainer.m=32" / "seed1"
    assert rc == 0 and sorted(p.name for p in kept.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert (tmp_path / "elsewhere" / kept.relative_to(tmp_path / "results" / "runs") / "summary.json").is_file()


def test_run_cpu_scale_grid_takes_per_optimizer_overrides():
    script = load_file("scripts/run_cpu_scale.py", "run_cpu_scale")
    jobs = script.grid([0], [0.4], ["sgd", "sgd,trainer.epochs=160", "sam,optimizer.sam_every=2"], ["x=1"])
    assert jobs == [
        ["dataset.label_noise=0.4", "optimizer=sam", "seed=0", "x=1", "optimizer.sam_every=2"],
        ["dataset.label_noise=0.4", "optimizer=sgd", "seed=0", "x=1"],
        ["dataset.label_noise=0.4", "optimizer=sgd", "seed=0", "x=1", "trainer.epochs=160"],
    ]
