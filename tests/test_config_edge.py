"""A start resolves its config once and checks it once, at sam-train's edge (`sam_repro.train.checked_config`), and
the trainer and the builders it calls check nothing again; the fault tests' hook lives outside the config
(SAM_REPRO_FAULT, `sam_repro.engine.faults`). In-process `sam-train` starts on generated data (seconds)."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import sam_repro.engine.config as config_module
from helpers.training import compose_config, only_run_dir
from sam_repro import train as train_cli
from sam_repro.engine.config import validate, validate_config
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.faults import FAULT_ENV, Faults, read_faults
from sam_repro.engine.overrides import check_overrides
from sam_repro.engine.rundir import config_changes
from sam_repro.errors import ConfigError
from sam_repro.run_keys import NEUTRAL_KEYS, RETIRED_KEYS, matches

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")
# ResNet-8 on 256 generated images, batch 64: one epoch of 4 steps.
RUN = ["dataset=synthetic", "debug=tiny", "logger=none", "trainer.epochs=1", "trainer.progress=off"]


@pytest.fixture
def start(monkeypatch, tmp_path):
    """`start(*overrides)`: `sam-train <overrides>` in this process, runs under tmp_path/runs; its exit status
    (0 when it returned). Hydra's logging set-up and global state are put back afterwards."""
    monkeypatch.setenv("SAM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv(FAULT_ENV, raising=False)
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
    summary = json.loads((only_run_dir(tmp_path / "runs") / "summary.json").read_text())
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
        validate_config(compose_config("dataset=synthetic", "dataset.val_fraction=1.0"))
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
    validate(compose_config("dataset=imagenet"), CPU)
    with pytest.raises(ConfigError) as refused:
        validate(compose_config("dataset=imagenet", override), CPU)
    assert str(refused.value) == message


# ---- the fault hook: an environment variable, not a config key ------------------------------------------------


def test_the_fault_hooks_are_no_config_keys():
    cfg = compose_config()
    assert not [key for key in OmegaConf.to_container(cfg.trainer) if "inject" in key or "fault" in key]
    for key in RETIRED_KEYS:
        with pytest.raises(ConfigError, match=f"^{key} was retired: set the environment variable SAM_REPRO_FAULT="):
            check_overrides([f"{key}=4"])


@pytest.mark.parametrize(
    "value, faults",
    [
        ("", Faults()),
        ("nonfinite_at_step=4", Faults(4, None)),
        ("nonfinite_at_step=4,nonfinite_rank=1", Faults(4, 1)),
        (" nonfinite_rank = 0 , nonfinite_at_step = 7 ", Faults(7, 0)),
    ],
)
def test_sam_repro_fault_is_read(value, faults):
    assert read_faults(2, {FAULT_ENV: value}) == faults
    assert read_faults(2, {}) == Faults() and not Faults()


def test_a_fault_hits_its_step_on_its_rank_only():
    everywhere, one = Faults(4, None), Faults(4, 1)
    assert [everywhere.nonfinite(s, r) for s in (3, 4, 5) for r in (0, 1)] == [0, 0, 1, 1, 0, 0]
    assert [one.nonfinite(s, r) for s in (3, 4, 5) for r in (0, 1)] == [0, 0, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "value, message",
    [
        ("nonfinite_at_step=-3", "SAM_REPRO_FAULT: nonfinite_at_step must be >= 1 (got -3)"),
        ("nonfinite_at_step=four", "SAM_REPRO_FAULT: nonfinite_at_step must be an integer (got 'four')"),
        ("nonfinite_at_step=4,nonfinite_rank=2", "SAM_REPRO_FAULT: nonfinite_rank (2) must be a rank below 2"),
        ("crash=3", "SAM_REPRO_FAULT='crash=3': expected nonfinite_at_step=N[,nonfinite_rank=R]"),
        ("nonfinite_rank=1", "SAM_REPRO_FAULT='nonfinite_rank=1': expected nonfinite_at_step=N[,nonfinite_rank=R]"),
    ],
)
def test_a_bad_sam_repro_fault_is_one_line(value, message):
    with pytest.raises(ConfigError) as refused:
        read_faults(2, {FAULT_ENV: value})
    assert str(refused.value) == message


def test_sam_repro_fault_makes_the_loss_non_finite_at_its_step(start, monkeypatch, tmp_path, capsys):
    """The hook end to end, in one process: step 3 of 4 (checks every 2 steps and at the epoch's end) fails the run
    at its end-of-epoch check; config.yaml records no trace of the hook."""
    monkeypatch.setenv(FAULT_ENV, "nonfinite_at_step=3")
    assert start(*RUN, "trainer.log_every=2") == 2
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite by step 4" in summary["reason"]
    assert "SAM_REPRO_FAULT (a test hook): the training loss is made non-finite at step 3" in capsys.readouterr().out
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert not [key for key in recorded["trainer"] if "inject" in key]


# ---- run directories written before: they still record the retired keys -------------------------------------


def test_the_retired_keys_change_no_run_identity():
    assert all(matches(key, NEUTRAL_KEYS) for key in RETIRED_KEYS)
    current = OmegaConf.to_container(compose_config("dataset=synthetic"), resolve=True)
    recorded = json.loads(json.dumps(current))
    recorded["trainer"].update({"inject_nonfinite_at_step": None, "inject_nonfinite_rank": None})
    assert config_changes(recorded, current, lambda keys: {}) == []


def test_a_run_directory_that_records_the_retired_keys_is_still_the_same_run(start, tmp_path, capsys):
    """A run directory written before the keys were removed records them (results/ has such runs): the same
    command finds it finished, instead of refusing it as another configuration."""
    assert start(*RUN) == 0
    run_dir = only_run_dir(tmp_path / "runs")
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    recorded["trainer"].update({"inject_nonfinite_at_step": None, "inject_nonfinite_rank": None})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    capsys.readouterr()
    assert start(*RUN) == 0
    out = capsys.readouterr().out
    assert "already finished: test error" in out and "error:" not in out
