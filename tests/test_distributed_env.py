"""sam_repro.engine.distributed: launcher detection, SLURM node lists, device choice, and real 2-rank collectives."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers.environ import clean_environ, drop_launch_vars
from sam_repro.engine import distributed
from sam_repro.engine.distributed import (
    all_reduce_mean_,
    all_reduce_sum,
    barrier,
    broadcast_object,
    expand_nodelist,
    free_port,
    init_distributed,
    read_launch_env,
    resolve_device,
    torchrun_command,
)
from sam_repro.errors import ConfigError, RankLost

REPO = Path(__file__).resolve().parents[1]
DDP_CHECK = REPO / "scripts" / "slurm" / "ddp_check.py"


@pytest.fixture
def no_launcher(monkeypatch):
    drop_launch_vars(monkeypatch)
    return monkeypatch


# ---- node lists ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu5", ["gpu5"]),
        ("gpu[3-4,9]", ["gpu3", "gpu4", "gpu9"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        # zero padding follows the lower bound, as in SLURM
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("x[7]", ["x7"]),
        # dashes and dots in names, a bracket in the middle, two bracket groups (the first varies slowest)
        ("gpu-a100-[001-002].cluster,cpu[1,3]", ["gpu-a100-001.cluster", "gpu-a100-002.cluster", "cpu1", "cpu3"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a,b[2-3],c", ["a", "b2", "b3", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_size_of_a_large_range():
    hosts = expand_nodelist("node[0001-1024]")
    assert len(hosts) == 1024 and hosts[0] == "node0001" and hosts[-1] == "node1024"


@pytest.mark.parametrize("nodelist", ["node[1-", "node]1[", "node[3-1]", "node[a-b]", "", "a,,b", "n[1-2-3]"])
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError):
        expand_nodelist(nodelist)


# ---- reading the launcher's environment ------------------------------------------------------------------------


def test_single_process_without_a_launcher(no_launcher):
    launch = read_launch_env()
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("single", 0, 1, 0)


def test_slurm_multi_node_step(no_launcher):
    for name, value in {
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[3-4,9]",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "12",
        "SLURM_LOCALID": "1",
    }.items():
        no_launcher.setenv(name, value)
    launch = read_launch_env()
    assert launch.launcher == "slurm"
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 12, 1)
    assert launch.master_addr == "gpu3"
    # closed form of the derivation: 10000 + 123456 mod 20000
    assert launch.master_port == 10_000 + 3_456


def test_slurm_step_values_win_over_the_job(no_launcher):
    """A step on part of the allocation: its own task count and node list decide world size and rendezvous."""
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "3",
        "SLURM_JOB_NODELIST": "gpu[3-4,9,11]",
        "SLURM_STEP_NODELIST": "gpu[9,11]",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_PROCID": "7",
        "SLURM_LOCALID": "3",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr) == (7, 8, 3, "gpu9")
    assert launch.master_port == 10_077


def test_slurm_master_overrides(no_launcher):
    env = {
        "SLURM_JOB_ID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[3-4]",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "MASTER_ADDR": "login-node",
        "MASTER_PORT": "29777",
    }
    launch = read_launch_env(env)
    assert (launch.master_addr, launch.master_port, launch.local_rank) == ("login-node", 29777, 0)


def test_slurm_batch_script_is_a_single_process():
    """The batch step carries SLURM_PROCID=0 and SLURM_NTASKS=N but is one process: waiting for N ranks would hang."""
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert read_launch_env(env).launcher == "single"


def test_slurm_single_task_step_has_no_rendezvous():
    env = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    launch = read_launch_env(env)
    assert (launch.launcher, launch.world_size, launch.master_addr, launch.master_port) == ("slurm", 1, None, None)


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    launch = read_launch_env(env)
    assert launch == distributed.LaunchEnv("torchrun", 3, 8, 3, "node7", 29500)


def test_torchrun_wins_inside_a_slurm_job():
    """`srun torchrun ...`: one SLURM task per node, the ranks are torchrun's."""
    env = {
        "SLURM_JOB_ID": "11", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_LOCALID": "0",
        "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "gpu1", "MASTER_PORT": "29500",
    }  # fmt: skip
    launch = read_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 13, 16, 5)


@pytest.mark.parametrize(
    "env, key",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 4"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-"}, "node list"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"}, "MASTER_PORT"),
    ],
)
def test_inconsistent_environment_is_a_config_error(env, key):
    with pytest.raises(ConfigError, match=key):
        read_launch_env(env)


# ---- device ----------------------------------------------------------------------------------------------------


def test_device_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='cuda'.*no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_device_gpu_choice_per_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:3", local_rank=0) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match=r"local rank 5 but only 4 GPU\(s\)"):
        resolve_device("cuda", local_rank=5)
    with pytest.raises(ConfigError, match="4 visible GPUs"):
        resolve_device("cuda:4")
    # SLURM's per-task GPU binding: every rank of an srun step sees exactly one device, its own
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda", local_rank=6, launcher="slurm") == torch.device("cuda", 0)


@pytest.mark.parametrize("launcher", ["torchrun", "single"])
def test_two_local_ranks_on_one_visible_gpu_are_refused_outside_slurm(monkeypatch, launcher):
    # torchrun --nproc_per_node=2 on a one-GPU machine: both ranks would take cuda:0, which NCCL refuses.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", local_rank=0, launcher=launcher) == torch.device("cuda", 0)
    for spec in ("auto", "cuda"):
        with pytest.raises(ConfigError, match=rf"device={spec}: local rank 1 but only 1 GPU\(s\).*NCCL") as error:
            resolve_device(spec, local_rank=1, launcher=launcher)
        assert "trainer.device=cpu" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", ""])
def test_device_unknown_spec(spec):
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device(spec)


# ---- a single process ------------------------------------------------------------------------------------------


def test_init_single_process_makes_no_group(no_launcher):
    env = init_distributed("cpu")
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("single", 0, 1, 0)
    assert (env.device, env.backend, env.is_main, env.distributed) == (torch.device("cpu"), "gloo", True, False)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_init_asking_for_a_missing_gpu(no_launcher):
    with pytest.raises(ConfigError, match="device='cuda'"):
        init_distributed("cuda")


def test_collectives_are_identities_in_a_single_process():
    summed = all_reduce_sum([1.5, 2, 3])
    assert summed.dtype == torch.float64 and summed.tolist() == [1.5, 2.0, 3.0]
    source = torch.tensor([1.0, 2.0])
    copy = all_reduce_sum(source)
    copy += 1  # out of place: the input is left alone
    assert source.tolist() == [1.0, 2.0]
    stats = torch.tensor([4.0])
    assert all_reduce_mean_(stats) is stats and stats.item() == 4.0
    assert broadcast_object({"a": 1}) == {"a": 1}
    barrier()


# ---- two real ranks over gloo ----------------------------------------------------------------------------------


def slurm_derivable_port() -> int:
    """A free port that a SLURM job id can derive (PORT_BASE to PORT_BASE + PORT_SPAN), apart per test process."""
    start = distributed.PORT_BASE + os.getpid() % 1000
    return free_port(range(start, distributed.PORT_BASE + distributed.PORT_SPAN, 997))


def test_free_port_is_free_and_skips_a_taken_candidate():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        port = free_port([busy, *range(20_000, 20_100)])
        assert port != busy and 20_000 <= port < 20_100
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))  # free: it binds
    with pytest.raises(RuntimeError, match="candidate"):
        free_port([])


def test_torchrun_command_runs_ranks_at_a_free_local_port():
    cmd = torchrun_command(3, "--max-restarts=1", "-m", "sam_repro.train", "seed=1")
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3"]
    assert cmd[4] == "--master_addr=127.0.0.1" and re.fullmatch(r"--master_port=\d+", cmd[5])
    assert cmd[6:] == ["--max-restarts=1", "-m", "sam_repro.train", "seed=1"]


def run_two_ranks(out: Path, rank_env: dict[int, dict[str, str]]) -> list[dict]:
    procs = []
    for extra in rank_env.values():
        env = clean_environ() | extra | {"OMP_NUM_THREADS": "1"}
        argv = [sys.executable, str(DDP_CHECK), str(out), "--device", "cpu"]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], logs
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in rank_env]


def check_two_rank_results(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert (result["rank"], result["world_size"], result["local_rank"]) == (rank, 2, rank)
        assert result["backend"] == "gloo" and result["device"] == "cpu"
        assert result["rank_sum"] == 1 + 2  # sum of rank + 1 over 2 ranks: W(W+1)/2
        assert result["rank_count"] == 2
        assert result["rank_mean"] == 0.5  # mean of ranks 0, 1: (W-1)/2
        assert result["broadcast"]["from_rank"] == 0  # rank 0's object on both ranks


def test_two_ranks_from_torchrun_variables(tmp_path):
    port = str(free_port())
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    results = run_two_ranks(tmp_path, {r: common | {"RANK": str(r), "LOCAL_RANK": str(r)} for r in (0, 1)})
    check_two_rank_results(results)
    assert {r["launcher"] for r in results} == {"torchrun"}


def test_two_ranks_from_slurm_variables(tmp_path):
    """The rendezvous comes only from SLURM's variables: host from the node list, port from the job id."""
    port = slurm_derivable_port()
    job_id = str(port - distributed.PORT_BASE + 3 * distributed.PORT_SPAN)  # derives back to `port`
    common = {
        "SLURM_JOB_ID": job_id,
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost,otherhost[1-4]",
    }
    results = run_two_ranks(tmp_path, {r: common | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)})
    check_two_rank_results(results)
    assert {(r["launcher"], r["master_addr"], r["master_port"]) for r in results} == {("slurm", "localhost", port)}


# ---- a rank that never comes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("agent_store", [False, True])
def test_a_rank_that_never_joins_is_named_after_the_time_out(no_launcher, monkeypatch, agent_store):
    """Rank 0 of 2 alone: after trainer.dist_timeout_s it stops with one line naming rank 1, instead of waiting in
    the process group's creation (PyTorch's default: 30 minutes). Under torchrun the store is the agent's."""
    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False) if agent_store else None
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "1"} if agent_store else {}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RankLost) as caught:
        init_distributed("cpu", timeout_s=1)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 75
    assert message.startswith("rank 0 waited 1 s for rank 1 to join the process group"), message
    assert not dist.is_initialized()
    if agent is not None:  # this attempt's check-in, under its own prefix; nothing left for a later attempt
        assert agent.check(["sam_repro/attempt1/joined/0"]) and not agent.check(["sam_repro/attempt2/joined/0"])
