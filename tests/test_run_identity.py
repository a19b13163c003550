"""Run identity: a run directory is only ever continued with the configuration it was started with.

Unit tests of the comparison, then `sam-train` end to end: a changed key on the command line or in an edited
preset is refused before any work (one line per key, no file of the run changed), `trainer.resume=force` continues
and is recorded, keys that change nothing are accepted, older records lacking a key resume, and a start refused
for a bad value leaves no run directory behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.training import TINY, only_run_dir, train
from sam_repro.engine.rundir import ABSENT, config_changes, run_name
from sam_repro.run_keys import IDENTITY_NEUTRAL, NEUTRAL_KEYS, RUN_NAME_NEUTRAL, TABLE_NEUTRAL, matches

# debug=tiny, evaluated on 200 test images in one batch.
RUN_ARGS = [*TINY, "dataset.test_subset=200", "trainer.eval_batch_size=200", "trainer.max_steps=2"]


# ---------------------------------------------------------------------------------------------- the comparison

RECORD = {
    "seed": 0,
    "experiment": None,
    "optimizer": {"name": "sam", "lr": 0.1, "weight_decay": 0.0005},
    "trainer": {"epochs": 200, "m": 32, "eval_every": 1, "compile": False, "sync_bn": False},
    "dataset": {"noise_seed": 0, "root": "/data"},
    "logger": {"mode": "offline"},
}


def current(**changes) -> dict:
    cfg = json.loads(json.dumps(RECORD))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def test_a_changed_training_key_is_reported_with_both_values():
    changes = config_changes(RECORD, current(trainer__epochs=2, optimizer__lr=0.2))
    assert [(c.key, c.recorded, c.current) for c in changes] == [("optimizer.lr", 0.1, 0.2), ("trainer.epochs", 200, 2)]
    assert changes[1].describe("runs/x") == "trainer.epochs: 200 in runs/x, 2 now"


def test_seed_experiment_and_noise_seed_are_compared():
    changes = config_changes(RECORD, current(seed=1, experiment="demo", dataset__noise_seed=3))
    assert [c.key for c in changes] == ["dataset.noise_seed", "experiment", "seed"]


def test_keys_that_change_nothing_are_left_out():
    changed = current(trainer__eval_every=5, trainer__compile=True, logger__mode="disabled", dataset__root="/else")
    assert config_changes(RECORD, changed) == []


def test_numbers_compare_by_value_and_booleans_by_identity():
    assert config_changes(RECORD, current(optimizer__weight_decay=5e-4, trainer__epochs=200.0)) == []
    assert [c.key for c in config_changes(RECORD, current(trainer__sync_bn=0))] == ["trainer.sync_bn"]


def test_a_key_absent_from_an_older_record_equals_its_default():
    newer = current(trainer__label_smoothing=0.0)
    assert config_changes(RECORD, newer, lambda keys: {"trainer.label_smoothing": 0.0}) == []
    changes = config_changes(RECORD, current(trainer__label_smoothing=0.1), lambda keys: {k: 0.0 for k in keys})
    assert [(c.key, c.recorded, c.current) for c in changes] == [("trainer.label_smoothing", ABSENT, 0.1)]
    assert changes[0].describe("r") == "trainer.label_smoothing: absent in r, 0.1 now"


def test_a_key_that_no_longer_exists_is_left_out():
    cfg = current()
    del cfg["trainer"]["m"]
    assert config_changes(RECORD, cfg) == []


def test_one_base_list_with_named_additions():
    assert set(NEUTRAL_KEYS) <= set(RUN_NAME_NEUTRAL) and set(NEUTRAL_KEYS) <= set(TABLE_NEUTRAL)
    assert IDENTITY_NEUTRAL == NEUTRAL_KEYS
    assert {"seed", "experiment"} <= set(RUN_NAME_NEUTRAL) - set(IDENTITY_NEUTRAL)
    assert {"trainer.name", "dataset.noise_seed"} <= set(TABLE_NEUTRAL) - set(IDENTITY_NEUTRAL)
    for key in (
        "trainer.resume",
        "trainer.compile",
        "trainer.channels_last",
        "trainer.deterministic",
        "trainer.eval_every",
        "trainer.inject_nonfinite_at_step",  # retired: run directories from before still record them
        "trainer.inject_nonfinite_rank",
        "logger.mode",
    ):
        assert matches(key, NEUTRAL_KEYS), key
    assert run_name("demo", ["optimizer=sam", "trainer.resume=force", "trainer.compile=true"]) == "demo/optimizer=sam"
    assert not matches("trainer.tf32", NEUTRAL_KEYS)  # it changes the numbers computed, as trainer.precision does


# ---------------------------------------------------------------------------------------------- end to end


def fingerprint(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the run except the log, which may grow."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


@pytest.mark.data
def test_a_changed_value_in_an_explicit_run_dir_is_refused_before_any_work(tmp_path):
    run = tmp_path / "mine"
    train(tmp_path, *RUN_ARGS, "optimizer=sam", f"hydra.run.dir={run}")
    before = fingerprint(run)
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before  # Hydra's record, written by us
    for finished in (True, False):
        if not finished:  # the same for a run that has not finished
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
            before = fingerprint(run)
        proc = train(
            tmp_path,
            *RUN_ARGS,
            "optimizer=sam",
            "optimizer.lr=0.2",
            "trainer.label_smoothing=0.1",
            f"hydra.run.dir={run}",
            check=False,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "Traceback" not in out
        assert f"optimizer.lr: 0.1 in {run}, 0.2 now" in out
        assert f"trainer.label_smoothing: 0.0 in {run}, 0.1 now" in out
        assert "trainer.resume=force" in out and "already finished" not in out
        assert fingerprint(run) == before  # config.yaml, summary.json, metrics.jsonl, checkpoint, .hydra/
        if finished:  # a bad value is refused before the run directory is looked at, even one that changes nothing
            proc = train(
                tmp_path, *RUN_ARGS, "optimizer=sam", "trainer.progress=loud", f"hydra.run.dir={run}", check=False
            )
            assert proc.returncode == 2 and "error: trainer.progress must be one of" in proc.stdout + proc.stderr
            assert "already finished" not in proc.stdout + proc.stderr and fingerprint(run) == before


@pytest.mark.data
def test_an_edited_preset_is_refused_and_force_continues_on_record(tmp_path):
    presets = tmp_path / "presets"
    (presets / "experiment").mkdir(parents=True)
    preset = presets / "experiment" / "mine.yaml"
    preset.write_text("# @package _global_\noptimizer:\n  lr: 0.1\n")
    args = [*RUN_ARGS, f"hydra.searchpath=[file://{presets}]", "experiment=mine", "trainer.max_steps=1"]
    train(tmp_path, *args)
    run = only_run_dir(tmp_path)
    (run / "summary.json").write_text(
        json.dumps({**json.loads((run / "summary.json").read_text()), "status": "interrupted"})
    )
    preset.write_text("# @package _global_\noptimizer:\n  lr: 0.05\n")
    before = fingerprint(run)
    refused = train(tmp_path, *args, check=False)
    assert refused.returncode == 2 and f"optimizer.lr: 0.1 in {run}, 0.05 now" in refused.stdout + refused.stderr
    assert fingerprint(run) == before

    train(tmp_path, *args, "trainer.resume=force")
    assert only_run_dir(tmp_path) == run  # trainer.resume is not part of the directory's name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped"  # trainer.max_steps=1, short of the schedule
    [forced] = summary["resume_forced"]
    assert forced["changes"] == [{"key": "optimizer.lr", "recorded": 0.1, "current": 0.05}]
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == 0.05
    again = train(tmp_path, *args)  # the run now carries the new value: the same command is accepted
    assert "already stopped" in again.stdout + again.stderr


@pytest.mark.data
def test_keys_that_change_nothing_and_older_records_resume(tmp_path):
    args = [*RUN_ARGS, "optimizer=sgd"]
    train(tmp_path, *args)
    run = only_run_dir(tmp_path)
    neutral = train(tmp_path, *args, "trainer.eval_every=3", "trainer.progress=off", "trainer.compile=false")
    assert "already stopped" in neutral.stdout + neutral.stderr  # RUN_ARGS stop at trainer.max_steps=2
    # A record written before trainer.label_smoothing existed: equal to its default, so the run is accepted ...
    record = yaml.safe_load((run / "config.yaml").read_text())
    del record["trainer"]["label_smoothing"]
    (run / "config.yaml").write_text(yaml.safe_dump(record))
    older = train(tmp_path, *args)
    assert "already stopped" in older.stdout + older.stderr
    # ... unless the command sets it to something else.
    changed = train(tmp_path, *args, "trainer.label_smoothing=0.1", f"hydra.run.dir='{run}'", check=False)
    assert changed.returncode == 2
    assert f"trainer.label_smoothing: absent in {run}, 0.1 now" in changed.stdout + changed.stderr


@pytest.mark.data
@pytest.mark.parametrize("override", ["trainer.epochs=0", "trainer.resume=sometimes", "trainer.eval_every=0"])
def test_a_refused_new_run_leaves_no_directory_behind(tmp_path, override):
    proc = train(tmp_path / "runs", *RUN_ARGS, override, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert f"error: {override.split('=')[0]} must be" in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    from sam_repro.engine.rundir import RunDirLock
    from sam_repro.errors import ConfigError

    run = tmp_path / "run"
    with RunDirLock(run) as held:
        held.claim()
        assert f"pid {os.getpid()}" in (run / ".lock").read_text()
        # Another process trying the same directory (flock locks belong to the open file, so a child process
        # is a faithful second sam-train).
        probe = (
            "import sys; from sam_repro.engine.rundir import RunDirLock\n"
            "try:\n    RunDirLock(sys.argv[1]).__enter__()\nexcept Exception as e:\n    print(e); sys.exit(3)"
        )
        proc = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3 and f"{run} is in use by sam-train pid {os.getpid()}" in proc.stdout
    with RunDirLock(run):  # released: the next start gets it
        pass
    with pytest.raises(ConfigError):  # and within one process a second holder is refused as well
        with RunDirLock(run), RunDirLock(run):
            pass


@pytest.mark.data
def test_force_on_a_finished_run_is_refused_with_the_command_for_a_longer_run(tmp_path):
    """More epochs for a finished run: refused before anything is written (summary.json, .hydra/ and config.yaml as
    they were), with the command that trains the longer run in its own directory; it used to train nothing and
    record the change."""
    run = tmp_path / "mine"
    args = [*TINY, "dataset.test_subset=200", "trainer.eval_batch_size=200", "trainer.epochs=1"]
    train(tmp_path, *args, f"hydra.run.dir={run}")
    before = fingerprint(run)
    proc = train(tmp_path, *args, "trainer.epochs=2", "trainer.resume=force", f"hydra.run.dir={run}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    [line] = [line for line in out.splitlines() if "error:" in line]
    assert f"error: {run} has finished with another configuration (trainer.epochs: 1 in {run}, 2 now)" in line
    longer = " ".join([*args, "trainer.epochs=2"])
    assert line.endswith(f"Train the new configuration in its own directory: sam-train {longer}")
    assert fingerprint(run) == before
