"""The real trainer on the local SLURM cluster: `train.sbatch` trains what torchrun trains, the submitit launcher
preset runs a sweep, and a job that is preempted -- SIGUSR1 to the batch shell, or `scontrol requeue` -- comes back
and ends with the metrics and weights of the same job never interrupted.

Every run is 2 gloo ranks on this machine running the same code, so the comparisons are exact (after a mid-epoch
stop, to float32 rounding in the BatchNorm statistics: see `assert_same_run`). Needs the local test cluster
(`bash scripts/slurm/local_cluster.sh up`) and CIFAR-10 (`sam-data cifar10`); skipped with the reason otherwise.
20-50 s per test on a 2-core machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.slurm import cluster_problem, job_env, scontrol_job
from helpers.training import TINY, comparable, read_metrics
from sam_repro.engine.checkpoint import load_checkpoint
from sam_repro.engine.rundir import run_dir

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
VENV = Path(sys.prefix)  # the virtual environment running the tests: train.sbatch activates it

_problem = cluster_problem()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_problem is not None, reason=_problem or ""),
    pytest.mark.data,
]

# Logging, display and placement: left out of the run directory's name (engine/rundir.py), so every launcher below
# derives the same directory. A log line per step: the preemption tests wait for a given step before signalling.
HANG_GUARD_S = 1800  # only against a hung job or cluster: every wait here ends on the job's log or state
QUIET = ["trainer.device=cpu", "trainer.progress=log", "trainer.log_every=1"]
# debug=tiny (ResNet-8, 500 test images, one thread, no W&B) on twice its training images in batches of 32: long
# enough (3 epochs x 16 SAM steps, about 5 s of training on 2 ranks here) for a signal sent after the first logged
# step to land well before the end.
RUN = [*TINY, "dataset.train_subset=512", "trainer.batch_size=32", "trainer.epochs=3", "optimizer=sam", *QUIET]
STEPS_PER_EPOCH, EPOCHS = 512 // 32, 3
SWEEP = [*TINY, "trainer.epochs=2", *QUIET]
SBATCH = ["--parsable", "--ntasks=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem-per-cpu=1G", "--time=10"]
TEST_KEYS = ("test_loss", "test_error", "test_error_top5")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """`RUN` on 2 ranks under torchrun, never interrupted: the run directory every SLURM run is compared with."""
    runs = tmp_path_factory.mktemp("torchrun") / "runs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sam_repro.train",
        *RUN,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=job_env(SAM_RUNS_DIR=str(runs)), capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir(RUN, root=runs)


class Job:
    """A `train.sbatch` job of `RUN`, its log, and its run directory."""

    def __init__(self, tmp_path: Path) -> None:
        runs = tmp_path / "runs"
        submitted = subprocess.run(
            ["sbatch", *SBATCH, f"--output={tmp_path}/slurm-%j.out", str(TRAIN_SBATCH), *RUN],
            env=job_env(SAM_RUNS_DIR=str(runs), SAM_VENV=str(VENV)), cwd=REPO,
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.id = submitted.stdout.strip().split(";")[0]
        self.log_path = tmp_path / f"slurm-{self.id}.out"
        self.dir = run_dir(RUN, root=runs)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for_line(self, text: str) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while text not in self.log():
            state = scontrol_job(self.id)["JobState"]
            if state in DONE or time.monotonic() > deadline:
                subprocess.run(["scancel", self.id], check=False)
                pytest.fail(f"job {self.id} ({state}) never logged {text!r}:\n{self.log()}")
            time.sleep(0.05)

    def wait(self) -> dict[str, str]:
        """Poll until the job has ended (`sbatch --wait` backs off to 30 s between polls: too slow here)."""
        deadline = time.monotonic() + HANG_GUARD_S
        while (job := scontrol_job(self.id))["JobState"] not in DONE:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", self.id], check=False)
                pytest.fail(f"job {self.id} still {job['JobState']} after {HANG_GUARD_S} s:\n{self.log()}")
            time.sleep(0.5)
        return job

    def resumed_steps(self) -> list[int]:
        return [int(line.rsplit("step", 1)[1]) for line in self.log().splitlines() if "resumed from" in line]

    def task_exits(self, run: int) -> dict[int, str]:
        """How srun saw each task of the step end in the job's `run`-th run: {0: "Exited with exit code 138", ...}."""
        text = self.log().split("[train.sbatch] job ")[run]
        exits: dict[int, str] = {}
        for tasks, how in re.findall(r"srun: error: \S+: tasks? ([\d,-]+): (.+)", text):
            for part in tasks.split(","):
                low, _, high = part.partition("-")
                exits.update({t: how.strip() for t in range(int(low), int(high or low) + 1)})
        return exits


def assert_same_run(run: Path, reference: Path, interrupted: bool = False) -> None:
    """Same metrics per epoch (timing aside), same summary, bit-identical final parameters.

    A mid-epoch checkpoint averages the BatchNorm running statistics over ranks, which an uninterrupted run does
    only at the end of the epoch. The average is the same (running statistics are linear in the batch statistics),
    rounded differently, and running statistics reach only the evaluation. So after an interruption they and the
    test metrics agree to float32 rounding, while everything training computes stays exact.
    """
    rows, expected_rows = comparable(read_metrics(run)), comparable(read_metrics(reference))
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    weights, expected_weights = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (run, reference))
    assert (summary["status"], summary["epochs"]) == ("finished", expected["epochs"])
    if not interrupted:
        assert rows == expected_rows
        for key in ("test_error", "test_error_top5", "best_test_error"):
            assert summary[key] == expected[key], key
        for name, tensor in expected_weights.items():
            assert torch.equal(weights[name], tensor), name
        return

    def trained(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in TEST_KEYS}

    one_example = 100 / 500 + 1e-9  # a near-tie may flip one prediction of the 500
    for row, expected_row in zip(rows, expected_rows, strict=True):
        assert row.keys() == expected_row.keys() and trained(row) == trained(expected_row)
        assert row["test_loss"] == pytest.approx(expected_row["test_loss"], rel=1e-5)
        for key in ("test_error", "test_error_top5"):
            assert row[key] == pytest.approx(expected_row[key], abs=one_example), key
    for key in ("test_error", "test_error_top5", "best_test_error"):
        assert summary[key] == pytest.approx(expected[key], abs=one_example), key
    for name, tensor in expected_weights.items():
        if "running_" in name:
            torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(weights[name], tensor), name


def test_train_sbatch_trains_what_torchrun_trains(tmp_path, reference):
    """`sbatch --ntasks=2 train.sbatch ...`: two srun ranks write the metrics and weights that torchrun's two write."""
    job = Job(tmp_path)
    state = job.wait()
    log = job.log()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "0", "0:0"), log
    assert "distributed: slurm, 2 rank(s), device cpu, backend gloo" in log  # srun's ranks, not one process
    assert log.count("2 rank(s) on cpu") == 1  # the set-up line: rank 1 logs warnings only (train.py's _rank)
    assert [r["epoch"] for r in read_metrics(job.dir)] == [1, 2, 3]
    assert_same_run(job.dir, reference)


def test_submitit_launcher_runs_the_sweep_in_the_derived_run_dirs(tmp_path):
    """`sam-train -m hydra/launcher=slurm_local optimizer=sgd,sam ...`: one SLURM job per point, each finished in the
    run directory that the same point run by hand derives."""
    runs = tmp_path / "runs"
    env = job_env(SAM_RUNS_DIR=str(runs))
    sweep = subprocess.run(
        [str(VENV / "bin" / "sam-train"), "-m", "hydra/launcher=slurm_local", "optimizer=sgd,sam", *SWEEP],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    submissions = list((runs / ".submitit").glob("*/*_submitted.pkl"))
    assert len(submissions) == 2, sweep.stdout + sweep.stderr  # two SLURM jobs (an array of two)

    for optimizer in ("sgd", "sam"):
        job_dir = run_dir([*SWEEP, f"optimizer={optimizer}"], root=runs)
        summary = json.loads((job_dir / "summary.json").read_text())
        assert (summary["status"], summary["epochs"]) == ("finished", 2), job_dir
        assert f"name: {optimizer}" in (job_dir / "config.yaml").read_text()
        assert "distributed: slurm, 1 rank(s)" in (job_dir / "train.log").read_text()  # it ran in an srun step
        last = read_metrics(job_dir)[-1]
        assert summary["test_error"] == last["test_error"]
        if optimizer == "sam":
            assert last["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)  # ||eps|| = rho: SAM really ran
        else:
            assert "perturbation_norm" not in last

    # The same point run by hand finds the sweep job's directory: nothing to train again.
    single = subprocess.run(
        [str(VENV / "bin" / "sam-train"), "optimizer=sgd", *SWEEP],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert single.returncode == 0 and "already finished" in single.stdout + single.stderr, single.stderr


def test_usr1_requeue_resumes_to_the_uninterrupted_result(tmp_path, reference):
    """The time-limit rehearsal with the real trainer: SIGUSR1 to the batch shell in epoch 2, train.sbatch forwards
    it, both ranks checkpoint mid-epoch and exit 138, the script requeues, and the second run finishes the job as if
    nothing had happened."""
    job = Job(tmp_path)
    job.wait_for_line(f"epoch 2/{EPOCHS} step 1/{STEPS_PER_EPOCH}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    state = job.wait()
    log = job.log()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
    assert job.task_exits(run=1) == {0: "Exited with exit code 138", 1: "Exited with exit code 138"}, log
    assert "stopped with status 138 before the run finished: requeueing job" in log
    (step,) = job.resumed_steps()
    assert STEPS_PER_EPOCH < step < EPOCHS * STEPS_PER_EPOCH, log  # mid-run, at the step the signal stopped
    assert [r["epoch"] for r in read_metrics(job.dir)] == [1, 2, 3]  # epoch 1 kept, nothing logged twice
    assert_same_run(job.dir, reference, interrupted=True)


def test_scontrol_requeue_of_a_running_job_resumes_to_the_uninterrupted_result(tmp_path, reference):
    """`scontrol requeue` (what an admin or a preempting partition does): SLURM sends SIGTERM to everything, the
    trainer checkpoints at the step it stopped on, and the job starts again by itself and finishes."""
    job = Job(tmp_path)
    job.wait_for_line(f"epoch 1/{EPOCHS} step 2/{STEPS_PER_EPOCH}")
    subprocess.run(["scontrol", "requeue", job.id], check=True)
    state = job.wait()
    log = job.log()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
    assert "got SIGTERM" in log
    (step,) = job.resumed_steps()
    assert 0 < step < EPOCHS * STEPS_PER_EPOCH, log  # the checkpoint written on SIGTERM, not a fresh start
    assert_same_run(job.dir, reference, interrupted=True)
