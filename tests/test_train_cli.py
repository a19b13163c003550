"""`sam-train` end to end on a real CIFAR-10 subset: outputs, resume, multirun, bad input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from helpers.training import BIN, TINY, comparable, env_for, only_run_dir, read_config, read_metrics, train

pytestmark = pytest.mark.data

# The options of sam_repro/configs/optimizer/: what Hydra must list for an unknown one.
OPTIMIZER_CONFIGS = Path(__file__).resolve().parents[1] / "sam_repro" / "configs" / "optimizer"
OPTIMIZERS = {path.stem for path in OPTIMIZER_CONFIGS.glob("*.yaml")}


def test_train_writes_the_run_directory(tmp_path):
    train(tmp_path, *TINY, "trainer.epochs=2", "optimizer=sam")
    run = only_run_dir(tmp_path)
    assert run.relative_to(tmp_path).parts[0] == "default"
    assert "optimizer=sam" in run.parent.name and "logger" not in run.parent.name
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "train_loss",
        "train_error",
        "test_loss",
        "test_error",
        "test_error_top5",
        "lr",
        "images_per_second",
        "sharpness",
        "grad_norm",
        "perturbation_norm",
    ):
        assert key in rows[-1], key
    assert rows[-1]["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)  # ||eps|| = rho
    assert 0 <= rows[-1]["test_error_top5"] <= rows[-1]["test_error"] <= 100
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    assert summary["test_error"] == rows[-1]["test_error"]
    assert summary["best_test_error"] == min(r["test_error"] for r in rows)
    assert summary["provenance"]["packages"]["torch"] == version("torch")  # the installed one, whichever it is
    assert "sam-train" in summary["provenance"]["command"]
    config = read_config(run)
    assert (
        config["optimizer"]["name"],
        config["model"]["name"],
        config["dataset"]["name"],
        config["augment"]["name"],
    ) == ("sam", "resnet8", "cifar10", "basic")
    # debug=tiny as composed: its subsets, batch and thread, and no W&B.
    assert (config["dataset"]["train_subset"], config["dataset"]["test_subset"]) == (256, 500)
    trainer = config["trainer"]
    assert (trainer["batch_size"], trainer["threads"], config["logger"]["mode"]) == (64, 1, "disabled")
    assert (run / "checkpoints" / "last.pt").exists()
    # The same command again finds the finished run and only reports it.
    again = train(tmp_path, *TINY, "trainer.epochs=2", "optimizer=sam")
    assert "already finished" in again.stdout + again.stderr
    assert read_metrics(run) == rows


def test_kill_and_rerun_resumes_to_the_same_result(tmp_path):
    args = [*TINY, "trainer.epochs=3", "optimizer=sam"]
    train(tmp_path / "a", *args)
    reference = read_metrics(only_run_dir(tmp_path / "a"))

    runs = tmp_path / "b"
    proc = subprocess.Popen(
        [str(BIN / "sam-train"), *args], env=env_for(runs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    metrics = None
    while time.time() < deadline and proc.poll() is None:
        found = list(runs.rglob("metrics.jsonl"))
        if found and found[0].read_text().count("\n") >= 1 and (found[0].parent / "checkpoints/last.pt").exists():
            metrics = found[0]
            break
        time.sleep(0.05)
    assert proc.poll() is None and metrics is not None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_metrics(metrics.parent)[-1]["epoch"] < 3
    out = train(runs, *args)
    assert "resumed from" in out.stdout + out.stderr
    assert comparable(read_metrics(metrics.parent)) == comparable(reference)
    assert json.loads((metrics.parent / "summary.json").read_text())["status"] == "finished"


def test_multirun_sgd_and_sam(tmp_path):
    train(tmp_path, "-m", *TINY, "trainer.epochs=1", "optimizer=sgd,sam")
    summaries = {p.parent.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")}
    assert sorted(summaries) == sorted(n for n in summaries if "optimizer=" in n) and len(summaries) == 2
    assert {s["status"] for s in summaries.values()} == {"finished"}
    # A multirun job lands in the directory the equivalent single run uses.
    single = train(tmp_path, *TINY, "trainer.epochs=1", "optimizer=sgd")
    assert "already finished" in single.stdout + single.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=0", "trainer.epochs must be >= 1"),
        ("trainer.batch_size=-8", "trainer.batch_size must be positive"),
        ("optimizer.rho=-1", "optimizer.rho must be >= 0"),
        ("dataset.train_subset=60000", "dataset.train_subset must be in [1, 50000]"),
        ("trainer.m=5", "trainer.m (5) must divide"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(tmp_path, override, message):
    proc = train(tmp_path, *TINY, "optimizer=sam", override, check=False)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert f"error: {message}" in output
    assert "Traceback" not in output


def test_unknown_group_option_lists_the_choices(tmp_path):
    proc = train(tmp_path, *TINY, "optimizer=adamm", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()  # one line, no traceback, no config search path
    assert line.startswith("error: optimizer has no option 'adamm' (did you mean optimizer=asam?")
    assert set(line.split("options: ", 1)[1].rstrip(")").split(", ")) == OPTIMIZERS and "sam" in OPTIMIZERS
    assert not any(tmp_path.iterdir())


def test_a_sweep_ends_with_a_tally_and_fails_when_a_job_fails(tmp_path):
    """Each run ends with one line (status, final and best test error, epochs, directory); a sweep with a job that
    fails (m = 5 does not divide the batch of 64) ends with a tally naming it, and exits 1."""
    args = ["-m", *TINY, "trainer.epochs=1", "trainer.m=32,5"]  # 1 epoch of 4 steps: its whole schedule
    proc = train(tmp_path, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    run = only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    ends = [line for line in out.splitlines() if re.search(r"\] finished: ", line)]
    final, best = summary["test_error"], summary["best_test_error"]
    assert [line.split("] ", 1)[1] for line in ends] == [
        f"finished: test error {final:.2f}% (best {best:.2f}%), 1/1 epochs, {run}"
    ]
    failed = run.parent.parent / "debug=tiny,trainer.epochs=1,trainer.m=5" / "seed0"
    tally = out[out.index("sweep: ") :].splitlines()
    assert tally == [
        "sweep: 2 job(s): 1 finished, 1 failed",
        f"  failed: {failed}: trainer.m (5) must divide the per-rank micro-batch "
        "(batch_size / ranks / accumulate = 64)",
    ]
    again = train(tmp_path, *args, check=False)
    assert again.returncode == 1 and "sweep: 2 job(s): 1 already finished, 1 failed" in again.stdout


def test_a_run_stopped_by_max_steps_is_stopped_not_finished(tmp_path):
    """trainer.max_steps short of the schedule: status "stopped" (never "finished"), an end line that says so and
    gives the command that trains the whole schedule; the same command again trains nothing and says "already
    stopped"; a sweep counts it as stopped (not failed: exit 0)."""
    args = [*TINY, "trainer.epochs=2", "trainer.max_steps=1"]
    proc = train(tmp_path, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out
    run = only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_early"]) == ("stopped", True)
    assert summary["reason"] == "stopped at trainer.max_steps=1: step 1 of the schedule's 8"
    assert re.search(rf"\] stopped: test error [0-9.]+% \(best [0-9.]+%\), 1/2 epochs, {re.escape(str(run))}\n", out)
    hint = "To train the whole schedule: sam-train debug=tiny trainer.epochs=2"
    assert hint in out and "] finished:" not in out
    metrics = (run / "metrics.jsonl").read_text()

    again = train(tmp_path, *args, check=False)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "] already stopped: test error" in out and "already finished" not in out
    assert hint in out and "run already stopped" in out
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained

    sweep = train(tmp_path, "-m", *args, check=False)
    assert sweep.returncode == 0 and "sweep: 1 job(s): 1 already stopped" in sweep.stdout


def test_corrupt_checkpoint_is_named_or_restarted(tmp_path):
    args = [*TINY, "trainer.epochs=1", "optimizer=sgd"]
    train(tmp_path, *args)
    run = only_run_dir(tmp_path)
    (run / "summary.json").unlink()  # pretend the run was interrupted
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    proc = train(tmp_path, *args, check=False)
    assert proc.returncode == 2
    assert f"checkpoint {run / 'checkpoints' / 'last.pt'} is damaged" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = train(tmp_path, *args, "trainer.on_corrupt_checkpoint=restart")
    assert "starting from scratch" in proc.stdout + proc.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "switches, groups",
    [
        (["optimizer=asam"], 64),
        (["optimizer=looksam", "optimizer.k=2"], 64),
        (["optimizer=gsam", "trainer.m=32", "trainer.precision=fp16", "trainer.grad_clip=5"], 32),
        (["optimizer=msam", "trainer.m=32", "trainer.precision=bf16"], 32),
        (["optimizer=sam", "trainer.precision=bf16"], 64),
        (["optimizer=sam", "trainer.precision=fp16"], 64),
        (["optimizer=sam", "trainer.accumulate=2"], 32),
        (["optimizer=sam", "trainer.accumulate=2", "trainer.m=16"], 16),
        (["optimizer=sam", "optimizer.weight_decay_mode=base_optimizer", "optimizer.p=inf", "trainer.grad_clip=5"], 64),
        (["optimizer=sam", "optimizer.sam_every=2"], 64),  # SAM at steps 0 and 2, a plain step between
    ],
)
def test_optimizer_switches_train_from_the_cli(tmp_path, switches, groups):
    proc = train(tmp_path, *TINY, "trainer.epochs=1", "trainer.max_steps=3", *switches)
    assert f"groups of {groups})" in proc.stdout + proc.stderr
    run = only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    row = read_metrics(run)[-1]
    assert summary["status"] == "stopped" and row["step"] == 3  # trainer.max_steps=3 of the schedule's 4
    assert 0 < row["train_loss"] < 10 and 0 <= row["test_error"] <= 100
    if "sharpness" in row:  # SAM family: the perturbation has the requested size
        assert row["perturbation_norm"] > 0
