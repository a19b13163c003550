"""Against a real SLURM: ranks from srun, the requeue cycle of train.sbatch (with a payload and with the real
trainer), and the submitit launcher preset.

Needs the local test cluster (`bash scripts/slurm/local_cluster.sh up`, a few seconds once installed); every test
here is skipped, with the reason, where `sinfo` is missing or the cluster is down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.processes import wait_for_file
from helpers.slurm import cluster_problem, job_env, scontrol_job
from helpers.training import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DDP_CHECK = REPO / "scripts" / "slurm" / "ddp_check.py"
TRAIN_SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
CONFIGS = REPO / "sam_repro" / "configs"
VENV = Path(sys.prefix)  # the virtual environment running the tests: train.sbatch activates it
PORT_BASE, PORT_SPAN = 10_000, 20_000  # sam_repro.engine.distributed.slurm_master_port, restated
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
HANG_GUARD_S = 1800  # only against a hung job or cluster: every wait here is on a job's progress or state


_problem = cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_problem is not None, reason=_problem or "")]


def job_report(job: dict[str, str], log: str) -> str:
    """What a failed job says: its state, exit code and reason, then its log (the trainer's one-line error)."""
    fields = ", ".join(f"{key}={job.get(key)}" for key in ("JobState", "ExitCode", "Restarts", "Reason"))
    return f"job {job.get('JobId')}: {fields}\n{log}"


def wait_for_job(job_id: str, log_path: Path, until: Callable[[str], bool] | None = None) -> dict[str, str]:
    """Wait until `until(log text)` holds while the job runs (failing with the job's report if it ends first), or,
    without `until`, until the job has ended. Returns the job's `scontrol` fields."""
    give_up = time.monotonic() + HANG_GUARD_S
    while True:
        job = scontrol_job(job_id)
        log = log_path.read_text() if log_path.exists() else ""
        if until is not None and until(log):
            return job
        if job["JobState"] in ENDED:
            if until is None:
                return job
            pytest.fail("the job ended before the awaited progress: " + job_report(job, log))
        if time.monotonic() > give_up:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"hung: no progress in {HANG_GUARD_S} s; " + job_report(job, log))
        time.sleep(0.5)


def test_srun_ranks_come_from_slurm(tmp_path):
    """sbatch --ntasks=2: each task's rank, world size, local rank and rendezvous come from SLURM's variables,
    and the two ranks really meet (the all-reduced sum is 1 + 2)."""
    out = tmp_path / "out"
    command = f"srun {sys.executable} {DDP_CHECK} {out} --device cpu"
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=1G", "--time=5",
         f"--output={tmp_path}/slurm-%j.out", f"--chdir={tmp_path}", "--wrap", command],
        env=job_env(), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    log = next(tmp_path.glob("slurm-*.out"), None)
    assert result.returncode == 0, (result.stderr, log.read_text() if log else "")
    job_id = result.stdout.strip().split(";")[0]
    first_node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()

    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, info in enumerate(ranks):
        assert info["launcher"] == "slurm"
        assert info["slurm_job_id"] == job_id and info["slurm_procid"] == str(rank)
        assert (info["rank"], info["world_size"], info["local_rank"]) == (rank, 2, rank)
        assert info["master_addr"] == first_node
        assert info["master_port"] == PORT_BASE + int(job_id) % PORT_SPAN
        assert (info["rank_sum"], info["rank_count"], info["rank_mean"]) == (3.0, 2.0, 0.5)
        assert info["broadcast"]["from_rank"] == 0


@pytest.mark.slow
def test_train_sbatch_requeues_after_usr1_and_resumes(tmp_path):
    """The time-limit rehearsal: SIGUSR1 to the batch shell only (what --signal=B:USR1@120 sends). train.sbatch
    forwards it to both ranks, they stop after the same step and save it, the script requeues the job, and the
    second run resumes from that step and completes. `sbatch --wait` returns once, after the second run."""
    out = tmp_path / "out"
    entry = f"python {DDP_CHECK} {out} --device cpu --steps 150 --step-seconds 0.05"
    proc = subprocess.Popen(
        ["sbatch", "--wait", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
         "--mem-per-cpu=1G", "--time=10", f"--output={tmp_path}/slurm-%j.out", str(TRAIN_SBATCH), "seed=1"],
        env=job_env(SAM_TRAIN_ENTRY=entry, SAM_VENV=str(VENV)), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_file(out / "progress.json", [proc], HANG_GUARD_S)
    job_id = json.loads((out / "rank0.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    sbatch_output = proc.communicate(timeout=HANG_GUARD_S)[0]
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert proc.returncode == 0, (sbatch_output, log)

    first, second = [], []
    for rank in (0, 1):
        events = read_jsonl(out / f"events-rank{rank}.jsonl")
        assert [(e["event"], e["restart"]) for e in events] == [("start", 0), ("stop", 0), ("start", 1), ("done", 1)]
        assert events[1]["signal"] == "SIGUSR1"
        first.append(events[1]["step"])
        second.append(events[2]["step"])
    assert first[0] == first[1] < 150  # both ranks stopped after the same step, well before the end
    assert second == first  # the second run started where the first one saved
    assert "requeueing job" in log
    job = scontrol_job(job_id)
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0")


@pytest.mark.slow
def test_submitit_launcher_preset_requeues_on_usr2(tmp_path):
    """hydra/launcher=slurm_local end to end: a Hydra multirun submits through submitit; SIGUSR2 (submitit's
    preemption signal) stops the payload, StopSignal hands it to submitit's handler, which requeues; the
    requeued job resumes and the multirun returns the job's result."""
    (tmp_path / "app.yaml").write_text(
        textwrap.dedent(
            f"""\
            x: 0
            steps: 300
            out: {tmp_path}/out
            hydra:
              searchpath: [file://{CONFIGS}]
              sweep:
                dir: {tmp_path}/multirun
            """
        )
    )
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            f"""\
            import sys
            import hydra

            @hydra.main(version_base=None, config_path=".", config_name="app")
            def main(cfg):
                sys.path.insert(0, {str(DDP_CHECK.parent)!r})
                import ddp_check
                out = f"{{cfg.out}}/x{{cfg.x}}"
                ddp_check.main([out, "--device", "cpu", "--steps", str(cfg.steps), "--step-seconds", "0.02"])

            main()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "app.py", "-m", "hydra/launcher=slurm_local", "x=7"],
        cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = tmp_path / "out" / "x7"
    wait_for_file(out / "progress.json", [proc], HANG_GUARD_S)
    job_id = json.loads((out / "rank0.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what submitit's job._interrupt() sends
    output = proc.communicate(timeout=HANG_GUARD_S)[0]
    assert proc.returncode == 0, output

    events = read_jsonl(out / "events-rank0.jsonl")
    assert [(e["event"], e["restart"]) for e in events] == [("start", 0), ("stop", 0), ("start", 1), ("done", 1)]
    assert events[1]["signal"] == "SIGUSR2" and events[2]["step"] == events[1]["step"]
    submission = (tmp_path / "multirun" / ".submitit" / job_id / f"{job_id}_submission.sh").read_text()
    for flag in ("--partition=debug", "--cpus-per-task=1", "--requeue", "--signal=USR2@30", "--mem=2GB"):
        assert flag in submission
    assert scontrol_job(job_id)["Restarts"] == "1"


@pytest.mark.slow
def test_trainer_under_train_sbatch_resumes_after_usr1(tmp_path):
    """The real trainer, 2 CPU ranks on generated data: SIGUSR1 mid-run stops both ranks, the checkpoint is
    written, the job is requeued, and the second run resumes at the stop step and finishes the run."""
    overrides = [
        "dataset=synthetic", "debug=tiny", "dataset.train_subset=512", "logger=none", "trainer.device=cpu",
        "trainer.threads=1", "trainer.epochs=2", "trainer.progress=log", "trainer.log_every=1",
    ]  # fmt: skip  # 512 images in batches of 64: 8 steps per epoch, 16 in all
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
         "--mem-per-cpu=2G", "--time=20", f"--output={tmp_path}/slurm-%j.out", str(TRAIN_SBATCH), *overrides],
        env=job_env(SAM_RUNS_DIR=str(tmp_path / "runs"), SAM_VENV=str(VENV)), cwd=REPO,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    log_path = tmp_path / f"slurm-{job_id}.out"

    # Progress, not a deadline: signal once the first step is logged, failing with the job's own log if it ends
    # first (a refused config ends it in seconds with its one-line error).
    wait_for_job(job_id, log_path, until=lambda log: "step 1/8" in log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    job = wait_for_job(job_id, log_path)

    log = log_path.read_text()
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), job_report(job, log)
    assert "Exited with exit code 138" in log and "requeueing job" in log
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log
    resume_step = int(resumed[0].rsplit("step", 1)[1])
    assert 0 < resume_step < 16  # a mid-run checkpoint, written because of the signal
    (run_dir,) = {p.parent for p in (tmp_path / "runs").rglob("summary.json")}
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 8), (2, 16)]


LOSES_A_RANK = """#!/usr/bin/env bash
# The first run of the job loses rank 1 to SIGKILL; rank 0 exits 75, as a rank that named the rank it lost does.
echo "$SLURM_PROCID ${SLURM_RESTART_COUNT:-0}" >> "$1"
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    [[ $SLURM_PROCID == 1 ]] && kill -9 $$
    exit 75
fi
"""


@pytest.mark.parametrize("max_requeues", [None, "0"])
def test_train_sbatch_requeues_a_job_that_lost_a_rank(tmp_path, max_requeues):
    """A rank killed by SIGKILL (srun reports 137) or the rank that lost it (75): train.sbatch requeues and the second
    run completes; with SAM_MAX_REQUEUES=0 it does not, and the job fails with the step's status."""
    entry = tmp_path / "loses_a_rank.sh"
    entry.write_text(LOSES_A_RANK)
    entry.chmod(0o755)
    events = tmp_path / "events"
    extra = {"SAM_TRAIN_ENTRY": f"{entry} {events}", "SAM_VENV": str(VENV)}
    if max_requeues is not None:
        extra["SAM_MAX_REQUEUES"] = max_requeues
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
         "--mem-per-cpu=256M", "--time=5", f"--output={tmp_path}/slurm-%j.out", str(TRAIN_SBATCH)],
        env=job_env(**extra), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    job_id = proc.stdout.strip().splitlines()[0]
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    runs = sorted(events.read_text().split("\n")[:-1])
    job = scontrol_job(job_id)
    if max_requeues is None:
        assert proc.returncode == 0, log
        assert runs == ["0 0", "0 1", "1 0", "1 1"], log  # both ranks ran twice
        assert "lost a rank with status" in log and "requeueing job" in log
        assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0")
    else:
        assert proc.returncode != 0 and runs == ["0 0", "1 0"], log
        assert "came back 0 times already" in log and "requeueing job" not in log
        assert job["JobState"] == "FAILED" and job["Restarts"] == "0"
