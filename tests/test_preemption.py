"""sam_repro.engine.preemption.StopSignal: the flag, agreement between ranks, exit codes, requeue and chaining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.environ import clean_environ, drop_launch_vars
from helpers.processes import wait_for_file
from helpers.training import read_jsonl
from sam_repro.engine import preemption
from sam_repro.engine.distributed import free_port, torchrun_command
from sam_repro.engine.preemption import HANDLED_SIGNALS, StopSignal, exit_code
from sam_repro.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DDP_CHECK = REPO / "scripts" / "slurm" / "ddp_check.py"
HANG_GUARD_S = 900  # only against a hung rank: every wait here ends on what the ranks do


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM job, no launcher: the defaults a laptop has. Records scontrol calls instead of making them."""
    drop_launch_vars(monkeypatch)
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(preemption.subprocess, "run", fake_run)
    return calls


@pytest.fixture
def saved_handlers():
    """Every test starts from the default handlers (the suite may itself run under `nohup`, which ignores SIGHUP, or
    under a shell that ignores SIGINT), and the handlers found are put back afterwards."""
    before = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    start = {sig: signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL for sig in HANDLED_SIGNALS}
    for sig, handler in start.items():
        signal.signal(sig, handler)
    yield start  # the handlers the test starts from
    for sig, handler in before.items():
        signal.signal(sig, handler)


def raise_signal(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary of the main thread


# ---- one process -----------------------------------------------------------------------------------------------


def test_exit_codes_follow_the_shell_convention():
    codes = {signal.Signals(s).name: exit_code(s) for s in HANDLED_SIGNALS}
    assert codes == {"SIGTERM": 143, "SIGINT": 130, "SIGHUP": 129, "SIGQUIT": 131, "SIGUSR1": 138, "SIGUSR2": 140}


@pytest.mark.parametrize("sig", HANDLED_SIGNALS, ids=lambda s: s.name)
def test_signal_sets_the_flag(sig, clean_env, saved_handlers):
    with StopSignal() as stop:
        assert not stop.should_stop() and stop.signal_name is None
        raise_signal(sig)
        assert stop.should_stop() and stop.should_stop()  # and stays stopped
        assert stop.signal_name == sig.name


def test_first_signal_is_the_one_reported(clean_env, saved_handlers):
    with StopSignal() as stop:
        raise_signal(signal.SIGUSR1)
        raise_signal(signal.SIGTERM)  # the time limit arriving while the checkpoint is written
        assert stop.should_stop() and stop.signal_name == "SIGUSR1"


def test_restore_puts_back_the_previous_handlers(clean_env, saved_handlers):
    def mine(signum, frame):
        pass

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, mine)
    stop = StopSignal()
    assert all(signal.getsignal(sig) == stop._on_signal for sig in HANDLED_SIGNALS)
    stop.restore()
    stop.restore()  # idempotent
    assert all(signal.getsignal(sig) is mine for sig in HANDLED_SIGNALS)


def test_ignored_signals_stay_ignored(clean_env, saved_handlers):
    """`nohup` ignores SIGHUP: the run must not stop when the terminal goes away."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with StopSignal() as stop:
        assert stop.ignored == (signal.SIGHUP,)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        raise_signal(signal.SIGHUP)
        assert not stop.should_stop()


def test_second_ctrl_c_stops_at_once(clean_env, saved_handlers):
    with StopSignal():
        raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            raise_signal(signal.SIGINT)


@pytest.mark.parametrize("sig", HANDLED_SIGNALS, ids=lambda s: s.name)
def test_finish_outside_slurm_exits_with_128_plus_signum(sig, clean_env, saved_handlers):
    stop = StopSignal()
    raise_signal(sig)
    assert stop.should_stop()
    with pytest.raises(SystemExit) as exit_info:
        stop.finish()
    assert exit_info.value.code == 128 + sig.value
    assert clean_env == []  # no SLURM job: nothing to requeue
    assert {signal.getsignal(s) for s in HANDLED_SIGNALS} == set(saved_handlers.values())


def test_finish_before_a_signal_is_an_error(clean_env, saved_handlers):
    with StopSignal() as stop, pytest.raises(RuntimeError, match="before should_stop"):
        stop.finish()


@pytest.mark.parametrize(
    "sig, mode, requeued",
    [
        (signal.SIGUSR1, None, True),  # --signal=USR1@120 straight to the tasks
        (signal.SIGUSR2, "auto", True),
        (signal.SIGUSR1, "batch", False),  # train.sbatch requeues after the step
        (signal.SIGUSR1, "off", False),
        (signal.SIGTERM, None, False),  # scancel, preemption, time limit: do not come back by ourselves
        (signal.SIGINT, None, False),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_finish_inside_slurm_requeues_on_usr_signals(sig, mode, requeued, clean_env, saved_handlers, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if mode is not None:
        monkeypatch.setenv("SAM_REQUEUE", mode)
    stop = StopSignal()
    raise_signal(sig)
    assert stop.should_stop()
    with pytest.raises(SystemExit) as exit_info:
        stop.finish()
    assert exit_info.value.code == 128 + sig.value
    assert clean_env == ([["scontrol", "requeue", "4242"]] if requeued else [])


def test_finish_chains_to_the_handler_installed_before(clean_env, saved_handlers, monkeypatch):
    """submitit's SIGUSR2 handler checkpoints its own state and requeues: it runs after our checkpoint, and
    scontrol is then not called a second time."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    received = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    stop = StopSignal()
    raise_signal(signal.SIGUSR2)
    assert received == []  # our handler, not the old one, caught the signal
    assert stop.should_stop()
    with pytest.raises(SystemExit) as exit_info:
        stop.finish()
    assert received == [signal.SIGUSR2]
    assert exit_info.value.code == 140
    assert clean_env == []


def test_python_default_sigint_handler_is_not_chained(clean_env, saved_handlers):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopSignal()
    raise_signal(signal.SIGINT)
    assert stop.should_stop()
    with pytest.raises(SystemExit) as exit_info:  # not a KeyboardInterrupt traceback
        stop.finish()
    assert exit_info.value.code == 130


def test_unknown_requeue_mode(clean_env, saved_handlers, monkeypatch):
    monkeypatch.setenv("SAM_REQUEUE", "sometimes")
    with pytest.raises(ConfigError, match="SAM_REQUEUE"):
        StopSignal()


# ---- two ranks over gloo, in child processes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, target_rank",
    [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)],
    ids=["SIGTERM-to-rank1", "SIGUSR1-to-rank0"],
)
def test_two_ranks_stop_after_the_same_step(sig, target_rank, tmp_path):
    """The signal reaches one rank only; both stop after the same step, both report it, and both exit with
    128 + signum. Inside a SLURM job, a USR signal makes rank 0, and only rank 0, requeue the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol_log = tmp_path / "scontrol.log"
    fake_scontrol = bin_dir / "scontrol"
    fake_scontrol.write_text(f'#!/bin/sh\necho "$* rank=$RANK" >> {scontrol_log}\n')
    fake_scontrol.chmod(0o755)

    out = tmp_path / "out"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = clean_environ() | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "777", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }  # fmt: skip
        argv = [sys.executable, str(DDP_CHECK), str(out), "--device", "cpu", "--steps", "100000"]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    wait_for_file(out / "progress.json", procs, HANG_GUARD_S)  # both ranks have their handlers and are stepping
    signalled_at = json.loads((out / "progress.json").read_text())["step"]
    procs[target_rank].send_signal(sig)
    logs = [p.communicate(timeout=HANG_GUARD_S)[0] for p in procs]

    assert [p.returncode for p in procs] == [128 + sig.value] * 2, logs
    stops = [[e for e in read_jsonl(out / f"events-rank{r}.jsonl") if e["event"] == "stop"] for r in (0, 1)]
    assert len(stops[0]) == len(stops[1]) == 1, logs
    assert stops[0][0]["step"] == stops[1][0]["step"] >= signalled_at
    assert stops[0][0]["signal"] == stops[1][0]["signal"] == sig.name  # the rank that got nothing knows too
    assert json.loads((out / "state.json").read_text())["step"] == stops[0][0]["step"]
    requeues = scontrol_log.read_text().splitlines() if scontrol_log.exists() else []
    assert requeues == (["requeue 777 rank=0"] if sig == signal.SIGUSR1 else [])


def test_torchrun_agent_forwards_usr1_to_its_workers(tmp_path):
    """`torchrun --signals-to-handle=...,SIGUSR1`: the agent passes the signal on to every worker, which stop after
    the same step (the recipe docs/cluster.md gives for torchrun under SLURM)."""
    out = tmp_path / "out"
    argv = torchrun_command(
        2, "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
        str(DDP_CHECK), str(out), "--device", "cpu", "--steps", "100000",
    )  # fmt: skip
    env = clean_environ() | {"OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_file(out / "progress.json", [agent], HANG_GUARD_S)
    agent.send_signal(signal.SIGUSR1)
    log = agent.communicate(timeout=HANG_GUARD_S)[0]
    assert agent.returncode != 0, log  # the agent re-raises the signal after its workers are gone
    stops = [[e for e in read_jsonl(out / f"events-rank{r}.jsonl") if e["event"] == "stop"] for r in (0, 1)]
    assert len(stops[0]) == len(stops[1]) == 1, log
    assert stops[0][0]["step"] == stops[1][0]["step"]
    assert stops[0][0]["signal"] == stops[1][0]["signal"] == "SIGUSR1"


# ---- a job that lost a rank ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "waited_for", "requeue", "restarts", "launcher", "requeued"),
    [
        (0, (1,), "auto", "0", "slurm", True),  # the lowest surviving rank requeues
        (1, (0,), "auto", "0", "slurm", True),  # rank 0 died (with the store): rank 1 is the lowest survivor
        (1, (2,), "auto", "0", "slurm", False),  # rank 0 survived too: it requeues, not rank 1
        (0, (1,), "batch", "0", "slurm", False),  # train.sbatch requeues from the step's exit status
        (0, (1,), "off", "0", "slurm", False),
        (0, (1,), "auto", "20", "slurm", False),  # came back SAM_MAX_REQUEUES times already
        (0, (1,), "auto", "0", "torchrun", False),  # torchrun --max-restarts restarts in place
    ],
)
def test_requeue_after_lost_rank(monkeypatch, rank, waited_for, requeue, restarts, launcher, requeued):
    import torch

    from sam_repro.engine.distributed import DistEnv
    from sam_repro.errors import RankLost

    calls = []
    monkeypatch.setattr(preemption, "_requeue_slurm_job", calls.append)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    monkeypatch.delenv(preemption.MAX_REQUEUES_ENV, raising=False)
    env = DistEnv(rank, 3, rank, torch.device("cpu"), "gloo", launcher)
    lost = RankLost("rank lost", waited_for)
    assert preemption.requeue_after_lost_rank(env, lost, requeue=requeue) is requeued
    assert calls == (["77"] if requeued else [])


def test_holding_keeps_sigterm_back_while_a_lost_rank_is_named(caplog):
    before = signal.getsignal(signal.SIGTERM)
    with preemption.holding():
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would end the test run here
        reached = True
    assert reached
    assert signal.getsignal(signal.SIGTERM) == before
    assert "SIGTERM arrived while the lost rank was named" in caplog.text
