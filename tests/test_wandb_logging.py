"""W&B logging: what the runs carry for the dashboard, offline runs on disk, and training that goes on when W&B
cannot start."""

from __future__ import annotations

import sys
import types

import pytest
from omegaconf import OmegaConf

from helpers.training import TINY, only_run_dir, train
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.loggers import MetricsLogger


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, None

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row):
        self.logged.append(row)

    def finish(self, exit_code=0):
        self.finished = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    module.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def config(mode="online", experiment="table1/wrn28_10_200ep"):
    return OmegaConf.create(
        {
            "experiment": experiment,
            "seed": 3,
            "dataset": {"name": "cifar100"},
            "model": {"name": "wrn28_10"},
            "augment": {"name": "cutout"},
            "optimizer": {"name": "sam"},
            "logger": {"name": "wandb", "mode": mode, "project": "p", "entity": None, "group": None, "tags": ["x"]},
        }
    )


def env():
    import torch

    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")


def test_run_carries_group_job_type_and_tags(fake_wandb, tmp_path):
    logger = MetricsLogger(config(), tmp_path, env())
    run = fake_wandb.runs[0]
    assert run.kwargs["group"] == "table1/wrn28_10_200ep/cifar100/wrn28_10/cutout"
    assert run.kwargs["job_type"] == "sam"
    assert {"dataset:cifar100", "model:wrn28_10", "augment:cutout", "optimizer:sam", "x"} <= set(run.kwargs["tags"])
    assert run.kwargs["resume"] == "allow" and run.kwargs["mode"] == "online"
    row = {
        "epoch": 1,
        "step": 10,
        "train_loss": 1.0,
        "train_error": 50.0,
        "test_error": 40.0,
        "images_per_second": 100.0,
    }
    logger.log_epoch(row)
    assert run.logged == [row]
    logger.finish({"status": "failed", "test_error": 40.0})
    assert run.finished == 1 and run.summary["status"] == "failed"
    # Online runs keep their id across requeues; offline ones cannot resume, so they start a new run.
    again = MetricsLogger(config(), tmp_path, env(), resume_epoch=1, wandb_id=logger.wandb_id)
    assert fake_wandb.runs[1].kwargs["id"] == logger.wandb_id
    MetricsLogger(config(mode="offline"), tmp_path, env(), resume_epoch=1, wandb_id=again.wandb_id)
    offline = fake_wandb.runs[2]
    assert offline.kwargs["id"] != logger.wandb_id and offline.kwargs["resume"] is None
    assert offline.logged == [row]  # the new offline run gets the history it would otherwise miss


def test_a_failing_wandb_is_a_warning(fake_wandb, tmp_path, caplog):
    def broken(**kwargs):
        raise ConnectionError("no route to host")

    fake_wandb.init = broken
    logger = MetricsLogger(config(), tmp_path, env())
    assert logger.wandb_run is None and "W&B could not start" in caplog.text
    logger.log_epoch(
        {"epoch": 1, "step": 1, "train_loss": 1.0, "train_error": 1.0, "test_error": 1.0, "images_per_second": 1.0}
    )
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.data
def test_offline_run_is_written_beside_the_metrics(tmp_path):
    train(tmp_path, *TINY, "trainer.epochs=1", "logger.mode=offline")
    run_dir = only_run_dir(tmp_path)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))


@pytest.mark.data
def test_unreachable_wandb_server_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    proc = train(tmp_path, *TINY, "trainer.epochs=1", "logger.mode=online", "logger.init_timeout=5")
    assert "W&B could not start" in proc.stdout + proc.stderr
    assert (only_run_dir(tmp_path) / "summary.json").exists()
