"""W&B as the place runs are compared: an offline run read back with W&B's own record schema (per-step and
per-epoch history, summary with last/best test error and the paper's value, nested config), the paper's value of a
preset's cell, the report spec of `sam-wandb report --dry-run`, and `sam-wandb sync` skipping synced runs."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers.training import TINY, compose_config, only_run_dir, read_metrics, train
from helpers.wandb_records import offline_run_files, read_offline_run
from sam_repro.cli import wandb_cli
from sam_repro.engine.config import validate_config
from sam_repro.errors import ConfigError
from sam_repro.paper import paper_value_of_preset, run_group
from sam_repro.run_keys import NEUTRAL_KEYS, matches


def resolved(*overrides: str) -> dict:
    """A composed config as sam-train hands it to the trainer (with `experiment` set from the overrides)."""
    config = OmegaConf.to_container(compose_config(*overrides), resolve=True)
    config["experiment"] = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    return config


# ---- the offline run, read back -------------------------------------------------------------------------------
@pytest.mark.data
def test_offline_run_carries_step_and_epoch_rows_summary_and_paper_value(tmp_path):
    # 256 images in batches of 64: 4 steps an epoch; 3 epochs, a step row every 3 steps: rows at 3, 6, 9, 12, two of
    # them spanning an epoch's end.
    train(
        tmp_path,
        *TINY,
        "experiment=table1/wrn28_10_200ep",
        "model=resnet8",
        "optimizer=sam",
        "trainer.m=16",
        "trainer.epochs=3",
        "logger.mode=offline",
        "logger.log_every_steps=3",
    )
    run_dir = only_run_dir(tmp_path)
    epochs = read_metrics(run_dir)
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]  # metrics.jsonl: one row per epoch, nothing else
    assert [r["step"] for r in steps] == [3, 6, 9, 12]
    # The intervals cover every step once: their sums are the epochs' sums (192 examples each, 256 an epoch).
    assert math.isclose(sum(r["train_loss"] * 192 for r in steps), sum(r["train_loss"] * 256 for r in epochs))
    assert math.isclose(sum(r["train_error"] for r in steps) * 192, sum(r["train_error"] for r in epochs) * 256)
    assert math.isclose(sum(r["sharpness"] for r in steps) * 192, sum(r["sharpness"] for r in epochs) * 256)
    assert all(r["perturbation_norm"] == pytest.approx(0.05) for r in steps)  # ||eps|| = rho

    (path,) = offline_run_files(run_dir)
    run = read_offline_run(path)
    assert run.run.run_group == "table1/wrn28_10_200ep/cifar10/resnet8/basic/subset256/3ep"
    assert run.run.job_type == "sam" and "optimizer:sam" in run.run.tags
    assert run.config["optimizer"]["rho"] == 0.05 and run.config["logger"]["log_every_steps"] == 3  # nested
    step_rows = [h for h in run.history if "steps/train_loss" in h]
    epoch_rows = [h for h in run.history if "test_error" in h]
    assert len(step_rows) == 4 and len(epoch_rows) == 3 and len(run.history) == 7
    assert [h["step"] for h in step_rows] == [3, 6, 9, 12]
    assert [h["steps/train_loss"] for h in step_rows] == pytest.approx([r["train_loss"] for r in steps])
    assert {k for k in epoch_rows[0] if not k.startswith("_")} == set(epochs[0])  # epoch keys as in metrics.jsonl
    test_errors = [r["test_error"] for r in epochs]
    summary = run.summary
    assert summary["test_error"] == test_errors[-1] and summary["best_test_error"] == min(test_errors)
    assert summary["status"] == "finished" and run.exit_code == 0
    assert (summary["paper/test_error"], summary["paper/ci95"], summary["paper/same_setting"]) == (2.7, 0.1, False)
    local = json.loads((run_dir / "summary.json").read_text())
    assert {k: local[k] for k in local if k.startswith("paper/")} == {k: summary[k] for k in summary if "paper/" in k}
    defined = {m.name or m.glob_name: m for m in run.metrics}
    assert defined["test_error"].summary.last and defined["test_error"].summary.min
    assert defined["steps/*"].step_metric == "step" and defined["train_loss"].step_metric == "epoch"


# ---- the paper's value of a preset's cell ---------------------------------------------------------------------
def test_paper_value_of_a_preset_cell_also_when_the_run_deviates():
    exact = paper_value_of_preset(resolved("experiment=table1/wrn28_10_200ep", "optimizer=sam"))
    assert (exact.preset, exact.error, exact.value.half_width, exact.same_setting) == (
        "table1/wrn28_10_200ep/cifar10/basic/sam",
        2.7,
        0.1,
        True,
    )
    short = paper_value_of_preset(
        resolved("experiment=table1/wrn28_10_200ep", "dataset=cifar100", "augment=cutout", "debug=preset")
    )
    assert (short.preset, short.error, short.same_setting) == ("table1/wrn28_10_200ep/cifar100/cutout/sgd", 16.9, False)
    lr = paper_value_of_preset(resolved("experiment=table1/wrn28_10_200ep", "optimizer.lr=0.2"))
    assert lr.same_setting is False
    noisy = paper_value_of_preset(
        resolved("experiment=table4/resnet32_noise", "dataset.label_noise=0.4", "optimizer=sam")
    )
    assert noisy.error == pytest.approx(100 - 93.4) and noisy.value.half_width is None  # Table 4 prints accuracy
    resnet = paper_value_of_preset(resolved("experiment=table2/resnet50", "trainer.epochs=200", "optimizer=sam"))
    assert (resnet.preset, resnet.error) == ("table2/resnet50/200ep/sam", 21.4)
    assert paper_value_of_preset(resolved("experiment=demo")) is None
    assert paper_value_of_preset(resolved("optimizer=sam")) is None


def test_group_is_the_cell():
    config = resolved("experiment=table4/resnet32_noise", "dataset.label_noise=0.4", "optimizer=sam")
    assert run_group(config) == "table4/resnet32_noise/cifar10/resnet32/basic/noise0.4/200ep"
    assert run_group({**config, "optimizer": {"name": "sgd"}}) == run_group(config)  # SGD beside SAM
    assert run_group({**config, "logger": {"group": "mine"}}) == "mine"


def test_log_every_steps_is_checked_and_changes_no_run_identity():
    validate_config(compose_config("logger.log_every_steps=1"))
    validate_config(compose_config("logger=none", "logger.log_every_steps=7"))
    with pytest.raises(ConfigError, match=r"logger.log_every_steps must be >= 1 \(got 0\)"):
        validate_config(compose_config("logger.log_every_steps=0"))
    assert matches("logger.log_every_steps", NEUTRAL_KEYS)


# ---- sam-wandb report -----------------------------------------------------------------------------------------
def write_run(root: Path, name: str, overrides: list[str], test_error: float) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(resolved(*overrides)))
    summary = {"status": "finished", "test_error": test_error, "best_test_error": test_error - 0.1}
    (directory / "summary.json").write_text(json.dumps(summary))


def test_report_spec_has_one_section_per_cell_of_the_runs_found(tmp_path, capsys):
    runs = tmp_path / "runs"
    for optimizer in ("sgd", "sam"):
        for seed in (0, 1):
            base = ["experiment=table1/wrn28_10_200ep", f"optimizer={optimizer}", f"seed={seed}"]
            write_run(runs, f"basic-{optimizer}-{seed}", base, 3.0)
        write_run(
            runs,
            f"c100-{optimizer}",
            ["experiment=table1/wrn28_10_200ep", "dataset=cifar100", f"optimizer={optimizer}", "debug=preset"],
            17.0,
        )
    write_run(runs, "demo", ["experiment=demo"], 10.0)  # in no cell of Table 1 (ResNet-20)
    out = tmp_path / "report.json"
    assert wandb_cli.main(["report", "--table", "1", "--runs", str(runs), "--dry-run", "--out", str(out)]) == 0
    assert "2 sections" in capsys.readouterr().err
    spec = json.loads(out.read_text())
    cells = [(s["cell"]["dataset"], s["cell"]["augment"], s["cell"]["epochs"]) for s in spec["sections"]]
    # The one-step smoke runs are no run of the paper's cifar100 cell: a row of their own, as in sam-tables.
    assert cells == [("cifar10", "basic", 200), ("cifar100", "basic", 1)]
    basic, c100 = spec["sections"]
    assert basic["filter"]["group"] == ["table1/wrn28_10_200ep/cifar10/wrn28_10/basic/200ep"]
    assert sorted((r["optimizer"], r["seed"]) for r in basic["runs"]) == [
        ("sam", 0),
        ("sam", 1),
        ("sgd", 0),
        ("sgd", 1),
    ]
    assert basic["paper"]["sam"]["test_error"] == 2.7 and basic["paper"]["sgd"]["ci95"] == 0.1
    assert c100["filter"]["group"] == ["table1/wrn28_10_200ep/cifar100/wrn28_10/basic/subset32/1ep"]  # shortened
    assert c100["cell"]["train_subset"] == 32 and c100["paper"] == {}  # the paper has no value for it
    assert spec["other_runs"] == [(runs / "demo").as_posix()]
    assert basic["color_by"] == "job_type" and "summary:paper/test_error" in basic["runs_table"]
    pytest.importorskip("wandb_workspaces")
    from sam_repro.analysis.wandb_report import build_report

    report = build_report({**spec, "entity": "team"})  # the library accepts the spec (no network until save)
    assert len(report.blocks) == 1 + 3 * len(spec["sections"])


def test_report_of_every_cell_without_runs(capsys):
    assert wandb_cli.main(["report", "--table", "4", "--dry-run", "--entity", "team"]) == 0
    spec = json.loads(capsys.readouterr().out)
    noise = [s["cell"]["label_noise"] for s in spec["sections"]]
    assert noise == [0.2, 0.4, 0.6, 0.8] and spec["entity"] == "team"
    assert spec["sections"][1]["filter"]["group"] == ["table4/resnet32_noise/cifar10/resnet32/basic/noise0.4/200ep"]


def test_report_online_without_a_key_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb_workspaces")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert wandb_cli.main(["report", "--table", "1", "--entity", "team"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sam-wandb report needs a W&B API key") and "\n" not in err


def test_report_without_runs_of_the_table_names_the_folder(tmp_path, capsys):
    write_run(tmp_path, "demo", ["experiment=demo"], 10.0)
    assert wandb_cli.main(["report", "--table", "1", "--runs", str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no runs of a cell of Table 1 found"


# ---- sam-wandb sync -------------------------------------------------------------------------------------------
def offline_run(root: Path, run: str, synced: bool) -> Path:
    folder = root / run / "seed0" / "wandb" / f"offline-run-20260101_000000-{run}"
    folder.mkdir(parents=True)
    (folder / f"run-{run}.wandb").write_bytes(b":W&B")
    if synced:
        (folder / f"run-{run}.wandb.synced").write_text("")
    return folder


def test_sync_uploads_only_runs_not_synced(tmp_path, monkeypatch, capsys):
    runs, calls = tmp_path / "runs", tmp_path / "calls.txt"
    new, done = offline_run(runs, "aaaa", synced=False), offline_run(runs, "bbbb", synced=True)
    recorder = f"import sys; open({str(calls)!r}, 'a').write(sys.argv[1] + '\\n')"
    monkeypatch.setenv(wandb_cli.SYNC_COMMAND_ENV, f"{sys.executable} -c {shlex.quote(recorder)}")
    assert wandb_cli.main(["sync", str(runs)]) == 0
    assert calls.read_text().splitlines() == [str(new)]
    out = capsys.readouterr().out
    assert f"synced {new}" in out and f"skipped {done} (already synced)" in out
    assert out.strip().splitlines()[-1] == "1 synced, 1 already synced, 0 failed"

    refuse = "import sys; print('401 unauthorized', file=sys.stderr); sys.exit(1)"
    failing = f"{sys.executable} -c {shlex.quote(refuse)}"
    monkeypatch.setenv(wandb_cli.SYNC_COMMAND_ENV, failing)
    assert wandb_cli.main(["sync", str(runs)]) == 1
    assert f"failed {new} (exit 1: 401 unauthorized)" in capsys.readouterr().out


def test_sync_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert wandb_cli.main(["sync", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope'}: no such directory (pass the folder that holds the run directories)"


# ---- the per-step rows, without training ----------------------------------------------------------------------
class CountingTotals:
    """The trainer's epoch totals, counting how often their device sums are read."""

    reads = 0

    def __init__(self):
        import torch

        from sam_repro.engine.metrics import EpochTotals

        self.inner = EpochTotals(torch.device("cpu"))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sums(self):
        CountingTotals.reads += 1
        return self.inner.sums()


def test_step_rows_read_the_sums_only_at_log_points_and_span_epochs(tmp_path):
    import types

    import torch

    from sam_repro.engine.distributed import DistEnv
    from sam_repro.engine.loggers import MetricsLogger, StepCurves

    cfg = OmegaConf.create({"logger": {"name": "none", "mode": "disabled", "log_every_steps": 3}})
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")
    metrics = MetricsLogger(cfg, tmp_path, env)
    curves = StepCurves(cfg, env, metrics, steps_per_epoch=4)
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 0.1}])
    step, reads = 0, []
    for _ in range(2):  # 2 epochs of 4 steps; step s has loss sum s over 10 examples, s correct, SAM sharpness 0.5
        totals = CountingTotals()
        curves.start_epoch(totals)
        for _ in range(4):
            step += 1
            value = torch.tensor(float(step), dtype=torch.float64)
            stats = types.SimpleNamespace(
                loss_sum=value,
                correct=value,
                count=10,
                perturbed_loss_sum=value + 5.0,
                grad_norm=torch.tensor(2.0),
                perturbation_norm=torch.tensor(0.05),
            )
            totals.add(stats)
            before = CountingTotals.reads
            curves.update(step, totals, optimizer)
            reads.append(CountingTotals.reads - before)
        curves.end_epoch(totals)
    assert reads == [0, 0, 1, 0, 0, 1, 0, 0]  # at steps 3 and 6 only
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and [r["epoch"] for r in rows] == [0.75, 1.5]
    # Step 6's interval holds steps 4 (epoch 1) and 5, 6 (epoch 2): loss (4 + 5 + 6) / 30 examples.
    assert rows[1]["train_loss"] == pytest.approx(15 / 30) and rows[1]["train_error"] == pytest.approx(50.0)
    assert rows[0]["train_loss"] == pytest.approx(6 / 30) and rows[0]["sharpness"] == pytest.approx(15 / 30)
    assert rows[1]["grad_norm"] == pytest.approx(2.0) and rows[1]["lr"] == 0.1
    assert not (tmp_path / "metrics.jsonl").exists()  # step rows never go to metrics.jsonl


def test_a_requeued_offline_run_replays_step_and_epoch_rows_in_order(tmp_path):
    import torch

    from sam_repro.engine.distributed import DistEnv
    from sam_repro.engine.loggers import MetricsLogger

    cfg = OmegaConf.create(
        {
            "experiment": None,
            "seed": 0,
            "dataset": {"name": "cifar10"},
            "model": {"name": "resnet8"},
            "augment": {"name": "basic"},
            "optimizer": {"name": "sgd"},
            "logger": {"name": "wandb", "mode": "offline", "project": "p", "tags": [], "log_every_steps": 2},
        }
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")
    first = MetricsLogger(cfg, tmp_path, env)
    for step in (2, 4, 6):  # the checkpoint is at step 4 (epoch 1); the row of step 6 comes after it
        first.log_step({"step": step, "train_loss": 1.0 / step})
        if step == 4:
            first.log_epoch({"epoch": 1, "step": 4, "train_loss": 0.3, "train_error": 9.0, "images_per_second": 1.0})
    first.finish({"status": "interrupted"})
    (first_file,) = offline_run_files(tmp_path)
    MetricsLogger(cfg, tmp_path, env, resume_epoch=1, resume_step=4).finish({"status": "interrupted"})
    assert [json.loads(line)["step"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()] == [2, 4]
    # the requeued run's file is the new one (not the newer mtime: both can fall in the same clock tick)
    (second_file,) = set(offline_run_files(tmp_path)) - {first_file}
    replayed = read_offline_run(second_file).history
    assert [(h.get("step"), "epoch" in h) for h in replayed] == [(2, False), (4, False), (4, True)]
    assert replayed[0]["steps/train_loss"] == 0.5
