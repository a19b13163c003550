"""The sweep tally counts the jobs hydra-submitit-launcher ran in other processes (SLURM, or submitit's local
executor): their JobReturns, as its launch returns them, are the tally's records; a failed one makes the sweep
exit 1 after every job has run. No cluster needed: the JobReturns are built the way Hydra's `run_job` builds them
in the job's process and pickled there and back, as submitit does."""

from __future__ import annotations

import math
import pickle

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from sam_repro import train as train_cli
from sam_repro.errors import ConfigError


def job_return(run_dir: str, status: JobStatus, value) -> JobReturn:
    """What `hydra.core.utils.run_job` returns in the job's process, after the trip back through submitit."""
    ret = JobReturn()
    ret.overrides = ["trainer.m=5"]
    ret.cfg = OmegaConf.create({"seed": 0})
    ret.hydra_cfg = OmegaConf.create({"runtime": {"output_dir": run_dir}})
    ret.working_dir = "/elsewhere"
    ret.task_name = "train"
    ret.status = status
    ret.return_value = value
    return pickle.loads(pickle.dumps(ret))


def returns() -> list[JobReturn]:
    ok = train_cli.JobResult(12.5, {"status": "finished", "run_dir": "runs/a/seed0"})
    again = train_cli.JobResult(11.0, {"status": "already finished", "run_dir": "runs/b/seed0"})
    stopped = train_cli.JobResult(None, {"status": "stopped", "run_dir": "runs/c/seed0"})
    refused = train_cli.SweepJobFailed("runs/d/seed0", "trainer.m (5) must divide the per-rank micro-batch (...)")
    return [
        job_return("runs/a/seed0", JobStatus.COMPLETED, ok),
        job_return("runs/b/seed0", JobStatus.COMPLETED, again),
        job_return("runs/c/seed0", JobStatus.COMPLETED, stopped),
        job_return("runs/d/seed0", JobStatus.FAILED, refused),
        job_return("runs/e/seed0", JobStatus.FAILED, RuntimeError("CUDA out of memory\nmore")),  # outside the app
        job_return("runs/f/seed0", JobStatus.FAILED, ConfigError("bad value")),
    ]


def test_job_returns_are_tallied_and_a_failed_one_fails_the_sweep():
    rets = returns()
    assert float(rets[0].return_value) == 12.5 and math.isnan(rets[2].return_value)  # still the test error
    jobs = [train_cli.job_from_return(ret) for ret in rets]
    lines, failed = train_cli.tally(jobs)
    assert failed
    assert lines.splitlines() == [
        "sweep: 6 job(s): 1 finished, 1 already finished, 1 stopped, 3 failed",
        "  failed: runs/d/seed0: trainer.m (5) must divide the per-rank micro-batch (...)",
        "  failed: runs/e/seed0: RuntimeError: CUDA out of memory",
        "  failed: runs/f/seed0: bad value",
    ]
    lines, failed = train_cli.tally([train_cli.job_from_return(ret) for ret in rets[:3]])
    assert not failed and lines == "sweep: 3 job(s): 1 finished, 1 already finished, 1 stopped"


def test_the_submitit_launcher_s_returns_reach_the_tally(monkeypatch):
    """`main` wraps hydra-submitit-launcher's launch: every JobReturn it gives back is recorded for the tally, and
    a failed one reaches the sweeper as completed, so the sweep ends with the tally instead of the sweeper
    re-raising the first failure (Hydra's BasicSweeper reads every `return_value`)."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    rets = returns()
    monkeypatch.setattr(BaseSubmititLauncher, "launch", lambda self, job_overrides, initial_job_idx: rets)
    monkeypatch.setattr(train_cli, "_JOBS", [])
    train_cli._tally_launches()
    results = BaseSubmititLauncher.launch(object.__new__(BaseSubmititLauncher), [["trainer.m=5"]] * 6, 0)
    for result in results:
        _ = result.return_value  # what BasicSweeper does: raises for a FAILED JobReturn
    assert [job["status"] for job in train_cli._JOBS] == [
        "finished",
        "already finished",
        "stopped",
        "failed",
        "failed",
        "failed",
    ]
    assert all(job["multirun"] for job in train_cli._JOBS)
    assert train_cli.tally(train_cli._JOBS)[1]


@pytest.mark.parametrize("failed", [False, True])
def test_a_job_in_its_own_process_reports_through_its_return(failed):
    """In the job's process (not the one `main` started) the app's outcome travels in the JobReturn: a JobResult
    carrying its record, or SweepJobFailed, which Hydra's run_job records as FAILED."""
    value = (
        train_cli.SweepJobFailed("runs/x/seed0", "error line")
        if failed
        else train_cli.JobResult(3.0, {"status": "finished", "run_dir": "runs/x/seed0"})
    )
    ret = job_return("runs/x/seed0", JobStatus.FAILED if failed else JobStatus.COMPLETED, value)
    expected = {"status": "failed", "error": "error line"} if failed else {"status": "finished"}
    assert train_cli.job_from_return(ret) == {**expected, "run_dir": "runs/x/seed0", "multirun": True}
