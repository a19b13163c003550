"""A start resolves its config once and checks it once, at sam-train's edge (`sam_repro.train.checked_config`), and
the trainer and the builders it calls check nothing again. In-process `sam-train` starts on generated data
(seconds)."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import sam_repro.engine.config as config_module
from sam_repro import train as train_cli
from sam_repro.engine.config import validate, validate_config
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.rundir import register_resolvers
from sam_repro.errors import ConfigError

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")
# ResNet-8 on 256 generated images, batch 64: one epoch of 4 steps.
RUN = ["dataset=synthetic", "debug=tiny", "logger=none", "trainer.epochs=1", "trainer.progress=off"]


def compose_train(*overrides):
    register_resolvers()
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def start(monkeypatch, tmp_path):
    """`start(*overrides)`: `sam-train <overrides>` in this process, runs under tmp_path/runs; its exit status
    (0 when it returned). Hydra's logging set-up and global state are put back afterwards."""
    monkeypatch.setenv("SAM_RUNS_DIR", str(tmp_path / "runs"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    sam_logger = logging.getLogger("sam_repro")
    saved_sam = sam_logger.handlers[:], sam_logger.level, sam_logger.propagate

    def run(*overrides: str) -> int:
        monkeypatch.setattr(sys, "argv", ["sam-train", *overrides])
        try:
            train_cli.main()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            GlobalHydra.instance().clear()
            for handler in root.handlers:
                if handler not in saved[0]:
                    handler.close()
            root.handlers[:], root.level = saved
            sam_logger.handlers[:], sam_logger.level, sam_logger.propagate = saved_sam
        return 0

    return run


def the_run_dir(tmp_path):
    [run_dir] = [p.parent for p in (tmp_path / "runs").rglob("config.yaml") if p.parent.name.startswith("seed")]
    return run_dir


def spy_on_checks(monkeypatch) -> Counter:
    """Counts, over what follows: resolutions of the config (`resolve_config`, wherever it is imported), schema
    checks (the rule of trainer.epochs consulted) and checks of the constraints (the batch divides over ranks)."""
    counts: Counter = Counter()
    resolve, error, require = config_module.resolve_config, config_module.Rule.error, config_module._require

    def counted_resolve(cfg):
        counts["resolved"] += 1
        return resolve(cfg)

    def counted_error(self, key, value):
        counts["schema"] += key == "trainer.epochs"
        return error(self, key, value)

    def counted_require(ok, message):
        counts["relations"] += message.startswith("trainer.batch_size (") and "must divide evenly" in message
        return require(ok, message)

    import sam_repro.engine.trainer  # noqa: F401 -- imported by the start anyway; its names are patched too

    for name, module in list(sys.modules.items()):
        if name.startswith("sam_repro") and getattr(module, "resolve_config", None) is resolve:
            monkeypatch.setattr(module, "resolve_config", counted_resolve)
    monkeypatch.setattr(config_module.Rule, "error", counted_error)
    monkeypatch.setattr(config_module, "_require", counted_require)
    return counts


# ---- one resolution, one check per start ------------------------------------------------------------------------


def test_a_start_resolves_and_checks_its_config_once(start, monkeypatch, tmp_path):
    counts = spy_on_checks(monkeypatch)
    assert start(*RUN) == 0
    summary = json.loads((the_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 1  # a whole start, trainer included
    assert dict(counts) == {"resolved": 1, "schema": 1, "relations": 1}


def test_a_refused_start_is_refused_at_the_edge_before_any_output(start, monkeypatch, tmp_path, capsys):
    # A constraint between keys (trainer.m divides the micro-batch of 64) used to be checked by the trainer, after
    # the run directory was claimed; now with the schema, before anything is written.
    trainer_ran = []
    monkeypatch.setattr("sam_repro.engine.trainer.train", lambda *a, **k: trainer_ran.append(a))
    assert start(*RUN, "trainer.m=5") == 2
    assert not trainer_ran
    assert "error: trainer.m (5) must divide the per-rank micro-batch" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_the_trainer_and_the_data_check_no_config_value_again(monkeypatch):
    """What the schema refuses is not refused again downstream: the trainer calls no validation, and the data's
    split takes the schema's word for dataset.val_fraction (its own check was a copy)."""
    import sam_repro.engine.trainer as trainer
    from sam_repro.data import select_train_indices

    assert not hasattr(trainer, "validate") and not hasattr(trainer, "validate_config")
    with pytest.raises(ConfigError, match=r"^dataset\.val_fraction must be in \[0, 1\) \(got 1\.0\)$"):
        validate_config(compose_train("dataset=synthetic", "dataset.val_fraction=1.0"))
    train, val = select_train_indices(10, 0.2, None, 0)
    assert (len(train), len(val)) == (8, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.train_subset=100", "dataset.train_subset is not supported for imagenet (got 100)"),
        ("dataset.label_noise=0.2", "dataset.label_noise is not supported for imagenet (got 0.2)"),
        ("dataset.val_fraction=0.1", "dataset.val_fraction is not supported for imagenet (got 0.1)"),
        ("dataset.test_subset=50", "dataset.test_subset is not supported for imagenet (got 50)"),
    ],
)
def test_imagenet_s_unsupported_keys_are_refused_by_the_config_check(override, message):
    """The one check of these keys was in the ImageNet loader's builder; it moved into the config's constraints,
    with its message."""
    validate(compose_train("dataset=imagenet"), CPU)
    with pytest.raises(ConfigError) as refused:
        validate(compose_train("dataset=imagenet", override), CPU)
    assert str(refused.value) == message
