"""Where this process sits in a run: rank, world size, device, and the process group that ties the ranks together.

One entry point, `init_distributed`, reads how the process was started and returns a `DistEnv`:

- torchrun (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``):
  those variables, read first because torchrun may itself run inside a SLURM job;
- SLURM, one task per rank started by ``srun`` (``scripts/slurm/train.sbatch``, submitit): ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``; the rendezvous host is the first node of the step's node list (parsed here,
  no ``scontrol`` call) and the port is derived from ``SLURM_JOB_ID`` so that every rank computes the same one;
- otherwise a single process.

A SLURM batch script itself (no ``srun``) also carries ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``, but it is one
process: only a process inside a job *step* (``SLURM_STEP_ID`` set) counts as a SLURM rank, so that running the
trainer directly in a batch script does not hang waiting for N-1 ranks that were never started.

The collective helpers below (`all_reduce_sum`, `all_reduce_mean_`, `broadcast_object`, `barrier`) are no-ops in a
single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from sam_repro.errors import ConfigError, RankLost

log = logging.getLogger(__name__)

Launcher = Literal["torchrun", "slurm", "single"]

# The rendezvous port of a SLURM job when MASTER_PORT is not set: PORT_BASE + SLURM_JOB_ID % PORT_SPAN. The range
# stays above the well-known ports and below Linux's ephemeral range (32768-60999), where the kernel hands out
# outgoing connection ports that could collide with our listener.
PORT_BASE = 10_000
PORT_SPAN = 20_000

# Seconds a rank waits for the others to join, and a collective for every rank to reach it, before it stops with
# one line naming the rank it waited for (`trainer.dist_timeout_s`). PyTorch's own defaults (30 min for gloo,
# 10 for NCCL) leave a restarted job idle for that long; a checkpoint written by rank 0 while the others wait at
# the next collective must still fit, and does at this size with a wide margin.
DEFAULT_TIMEOUT_S = 600.0
HEARTBEAT_S = 1.0  # how often each rank says it is alive on the rendezvous store


@dataclass(frozen=True)
class LaunchEnv:
    """How the process was started, read from the environment alone (no torch, no side effects)."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run. `device` is where its model and batches live."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Literal["nccl", "gloo"]
    launcher: Launcher
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ---- SLURM node lists ------------------------------------------------------------------------------------------

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(ranges: str, nodelist: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"]. Zero padding follows the lower bound, as in SLURM: [8-10] gives
    8, 9, 10 and [08-10] gives 08, 09, 10."""
    out = []
    for item in ranges.split(","):
        item = item.strip()
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in node list {nodelist!r}")
        if not sep:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in node list {nodelist!r}")
        out.extend(str(i).zfill(len(low)) for i in range(int(low), int(high) + 1))
    return out


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    """ "rack[1-2]-n[01-02]" -> rack1-n01, rack1-n02, rack2-n01, rack2-n02 (the first bracket varies slowest)."""
    match = _BRACKET.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        head + value + rest
        for value in _expand_range_set(match.group(1), nodelist)
        for rest in _expand_host(tail, nodelist)
    ]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list, in SLURM's order: "node[01-03,07],gpu5" -> node01, node02, node03, node07, gpu5.

    Pure Python, so it works where `scontrol show hostnames` is not installed (containers, login-less nodes).
    """
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        part = part.strip()
        if not part:
            raise ValueError(f"empty host name in node list {nodelist!r}")
        hosts.extend(_expand_host(part, nodelist))
    return hosts


def slurm_master_port(job_id: str) -> int:
    """The port every rank of a SLURM job agrees on without talking: derived from the job id."""
    return PORT_BASE + int(job_id) % PORT_SPAN


# ---- ranks on this machine (tests, benchmarks, the GPU check) --------------------------------------------------

LOCALHOST = "127.0.0.1"


def free_port(candidates: Iterable[int] | None = None) -> int:
    """A TCP port on this machine that nobody listens on: one the kernel picks, or the first of `candidates` that
    binds (e.g. ports a SLURM job id can derive). Free when asked: the caller's rendezvous binds it soon after."""
    for port in [0] if candidates is None else candidates:
        with socket.socket() as sock:
            try:
                sock.bind((LOCALHOST, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("none of the candidate ports is free")


def torchrun_command(ranks: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run` with `ranks` processes on this machine, meeting at a free port of
    127.0.0.1, then `args`: torchrun's own options, then what each rank runs (`-m sam_repro.train ...`, a script)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_addr={LOCALHOST}",
        f"--master_port={free_port()}",
        *args,
    ]


# ---- reading the launcher's environment ------------------------------------------------------------------------


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer (got {value!r})") from None


def _checked(launch: LaunchEnv, source: str) -> LaunchEnv:
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ConfigError(
            f"inconsistent {source} environment: rank {launch.rank}, world size {launch.world_size}, "
            f"local rank {launch.local_rank}; start the ranks with {source}"
        )
    return launch


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and the rendezvous address from torchrun's or SLURM's variables.

    torchrun's variables win: `srun torchrun ...` (one agent per node) sets both, and the ranks are torchrun's.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int_var(env, "WORLD_SIZE")
        launch = LaunchEnv(
            launcher="torchrun",
            rank=_int_var(env, "RANK"),
            world_size=world_size,
            local_rank=_int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
        )
        if world_size > 1 and (launch.master_addr is None or launch.master_port is None):
            raise ConfigError("RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is not; start with torchrun")
        return _checked(launch, "torchrun")

    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        # Inside an srun step. SLURM_STEP_NUM_TASKS is the step's size, which may be smaller than the job's.
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world_size = _int_var(env, tasks_var) if tasks_var in env else 1
        master_addr, master_port = None, None
        if world_size > 1:
            # Rank 0 runs on the first node of the step (SLURM's block and cyclic distributions both put it there).
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if "MASTER_ADDR" in env:
                master_addr = env["MASTER_ADDR"]
            elif nodelist:
                try:
                    master_addr = expand_nodelist(nodelist)[0]
                except ValueError as error:
                    raise ConfigError(f"SLURM node list: {error}; set MASTER_ADDR to the first node") from None
            else:
                raise ConfigError("SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are unset: set MASTER_ADDR")
            if "MASTER_PORT" in env:
                master_port = _int_var(env, "MASTER_PORT")
            elif "SLURM_JOB_ID" in env:
                master_port = slurm_master_port(str(_int_var(env, "SLURM_JOB_ID")))
            else:
                raise ConfigError("SLURM_JOB_ID is unset, so no rendezvous port can be derived: set MASTER_PORT")
        launch = LaunchEnv(
            launcher="slurm",
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=master_addr,
            master_port=master_port,
        )
        return _checked(launch, "srun")

    return LaunchEnv(launcher="single", rank=0, world_size=1, local_rank=0)


# ---- device ----------------------------------------------------------------------------------------------------


DEVICE_SPECS = "auto, cpu, cuda or cuda:N"


def _device_spec(spec: object) -> re.Match | None:
    """(kind, index) of a `device` value written as one of DEVICE_SPECS, else None."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", spec.strip().lower()) if isinstance(spec, str) else None
    return None if match is None or (match.group(2) is not None and match.group(1) != "cuda") else match


def is_device_spec(spec: object) -> bool:
    return _device_spec(spec) is not None


def resolve_device(
    spec: str, local_rank: int = 0, launcher: Launcher = "single", *, option: str = "device"
) -> torch.device:
    """A device value (DEVICE_SPECS) -> torch.device: the one resolution, used by the trainer (`trainer.device`), the
    analysis commands and the GPU check (`--device`, named by `option` in the errors). auto: this rank's GPU if CUDA
    is available, else the CPU.

    A rank's GPU is cuda:<local rank>. When SLURM binds one GPU per task (`--gpus-per-task=1`: each srun task sees
    one device), every rank of an srun step uses its cuda:0. Any other launch with more local ranks than visible
    GPUs (`torchrun --nproc_per_node=2` on a one-GPU machine) is an error: NCCL refuses two ranks on one GPU.
    """
    match = _device_spec(spec)
    if match is None:
        raise ConfigError(f"{option} must be {DEVICE_SPECS} (got {spec!r})")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{option}={spec!r} but no CUDA GPU is visible (torch.cuda.is_available() is False): "
            f"use {option}=cpu or {option}=auto"
        )
    count = torch.cuda.device_count()
    if index is not None:
        if int(index) >= count:
            raise ConfigError(f"{option}={spec!r}: this node has {count} visible GPUs (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", int(index))
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1 and launcher == "slurm":
        return torch.device("cuda", 0)
    raise ConfigError(
        f"{option}={spec}: local rank {local_rank} but only {count} GPU(s) visible on this node, and NCCL refuses "
        "two ranks on one GPU; start at most one rank per GPU (torchrun --nproc_per_node, srun --ntasks-per-node), "
        "or pass trainer.device=cpu for CPU ranks"
    )


# ---- process group ---------------------------------------------------------------------------------------------


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Read the launcher's environment, pick the device and join the process group when there is one.

    A process group is created under torchrun (always: torchrun is an explicit request for one) and under srun when
    the step has more than one task. NCCL on GPUs, gloo on the CPU. Calling it again while a group exists returns
    the same environment without re-initialising.

    Joining never hangs silently: every rank checks in on the rendezvous store (`_join`) and, when a rank has not
    come within `timeout_s`, stops with a `RankLost` naming it. The same time-out bounds every collective of the
    group (PyTorch's `timeout=`); `explain_lost_rank` turns such a failure into one line naming the rank.
    """
    launch = read_launch_env()
    torch_device = resolve_device(device, launch.local_rank, launch.launcher)
    backend: Literal["nccl", "gloo"] = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        # Before any CUDA work: otherwise every rank of the node allocates a context on cuda:0.
        torch.cuda.set_device(torch_device)
    env = DistEnv(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        device=torch_device,
        backend=backend,
        launcher=launch.launcher,
        master_addr=launch.master_addr,
        master_port=launch.master_port,
    )

    wants_group = launch.launcher == "torchrun" or launch.world_size > 1
    if wants_group and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(timeout_s))
        store = _join(launch, timeout)
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            # Binds the group to this GPU and connects eagerly, so a wrong device shows up here, not at step 1.
            kwargs["device_id"] = torch_device
        dist.init_process_group(
            backend=backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **kwargs
        )
    elif wants_group and (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
        raise ConfigError(
            f"a process group already exists as rank {dist.get_rank()}/{dist.get_world_size()}, "
            f"but the environment says rank {launch.rank}/{launch.world_size}"
        )
    if env.is_main:
        where = f", rendezvous {env.master_addr}:{env.master_port}" if env.distributed else ""
        log.info(
            "distributed: %s, %d rank(s), device %s, backend %s%s",
            env.launcher,
            env.world_size,
            env.device,
            env.backend,
            where,
        )
    return env


# ---- joining, and who is missing -------------------------------------------------------------------------------


@dataclass
class _Membership:
    """This rank's view of the group beyond the process group itself: the rendezvous store it joined through, the
    other ranks' heartbeats on it, and the optimizer step this rank is at (`note_step`)."""

    rank: int
    world_size: int
    address: tuple[str, int]
    prefix: str
    agent_store: bool
    step: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def client(self, timeout: datetime.timedelta) -> dist.Store:
        host, port = self.address
        base = dist.TCPStore(host, port, self.world_size, is_master=False, timeout=timeout, wait_for_workers=False)
        return dist.PrefixStore(self.prefix, base)


_membership: _Membership | None = None


def _join(launch: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The store the process group is built on, once every rank has checked in on it (else `RankLost`).

    Under torchrun the agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`) and it outlives the workers: a
    restarted group meets the keys its killed predecessor left there. PyTorch's env:// rendezvous does not separate
    attempts on that store, so a restarted rank could read a dead rank's address and connect to it (or wait on
    it). Every key goes under `sam_repro/attempt<TORCHELASTIC_RESTART_COUNT>/` instead. Elsewhere (srun, or a
    launcher without an agent store) rank 0 hosts the store, which dies with it.
    """
    global _membership
    environ = os.environ
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0") if launch.launcher == "torchrun" else "0"
    host, port = str(launch.master_addr or "127.0.0.1"), int(launch.master_port or 0)
    base = dist.TCPStore(
        host,
        port,
        launch.world_size,
        is_master=launch.rank == 0 and not agent_store,
        timeout=timeout,
        wait_for_workers=False,  # the check-in below waits, and names who is missing
    )
    prefix = f"sam_repro/attempt{attempt}"
    store = dist.PrefixStore(prefix, base)
    store.set(f"joined/{launch.rank}", f"{socket.gethostname()} pid {os.getpid()}")
    keys = [f"joined/{r}" for r in range(launch.world_size)]
    try:
        store.wait(keys, timeout)
    except (RuntimeError, dist.DistError):
        missing = [r for r in range(launch.world_size) if not store.check([f"joined/{r}"])]
        if not missing:
            raise
        raise RankLost(
            f"rank {launch.rank} waited {timeout.total_seconds():.0f} s for {_ranks(missing)} to join the process "
            f"group at {host}:{port} (trainer.dist_timeout_s); "
            "it never started, or died before joining: see its log",
            tuple(missing),
        ) from None
    _membership = _Membership(launch.rank, launch.world_size, (host, port), prefix, agent_store)
    if launch.world_size > 1:
        _membership.thread = threading.Thread(target=_heartbeat, args=(_membership,), daemon=True)
        _membership.thread.start()
    return store


def _heartbeat(member: _Membership) -> None:
    """Count up `beat/<rank>` and publish the step this rank is at, every HEARTBEAT_S, on a connection of its own
    (the process group holds the store, and with it rank 0's store server under srun, for as long as it lives)."""
    try:
        store = member.client(datetime.timedelta(seconds=10 * HEARTBEAT_S))
        while not member.stop.wait(HEARTBEAT_S):
            store.add(f"beat/{member.rank}", 1)
            store.set(f"step/{member.rank}", str(member.step))
    except (RuntimeError, dist.DistError):
        return  # the store went away (its host died): explain_lost_rank says so


def note_step(step: int) -> None:
    """Record the optimizer step this rank has reached, for `explain_lost_rank` (no communication)."""
    if _membership is not None:
        _membership.step = step


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def explain_lost_rank(error: BaseException) -> RankLost | None:
    """A failed collective as one line naming the rank this one waited for, or None when it is not a failure of
    the group (an ordinary bug, in a single process, or with every other rank alive and at this rank's step).

    A rank is taken for dead when its heartbeat stops (checked over three heartbeats); one that is alive but at an
    earlier step is the one that did not reach the collective. Under srun the store lives in rank 0: when it is
    gone, so is rank 0.
    """
    member = _membership
    if member is None or member.world_size == 1:
        return None
    what = f"rank {member.rank} lost the process group at step {member.step}"
    # gloo's message, without its source location: "Connection closed by peer [127.0.0.1]:22453"
    cause = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().split("\n")[0]).split(". ")[0][:160]
    cause = cause or type(error).__name__
    try:
        store = member.client(datetime.timedelta(seconds=5 * HEARTBEAT_S))
        others = [r for r in range(member.world_size) if r != member.rank]
        before = {r: store.add(f"beat/{r}", 0) for r in others}
        time.sleep(3 * HEARTBEAT_S)
        dead = [r for r in others if store.add(f"beat/{r}", 0) == before[r]]
        steps = {r: int(store.get(f"step/{r}")) if store.check([f"step/{r}"]) else 0 for r in others}
    except (RuntimeError, dist.DistError):
        if member.agent_store or member.rank == 0:
            return RankLost(f"{what}: the rendezvous store stopped answering ({cause})")
        return RankLost(f"{what}: waited for rank 0, which is gone with the rendezvous store it held ({cause})", (0,))
    if dead:
        return RankLost(
            f"{what}: waited for {_ranks(dead)}, which stopped (no heartbeat for 3 s) ({cause})", tuple(dead)
        )
    behind = [r for r in others if steps[r] < member.step]
    if behind:
        at = ", ".join(f"rank {r} at step {steps[r]}" for r in behind)
        return RankLost(f"{what}: waited for {_ranks(behind)}, alive but behind ({at}) ({cause})", tuple(behind))
    return None


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when there is none)."""
    global _membership
    if _membership is not None:
        _membership.stop.set()
        if _membership.thread is not None:
            _membership.thread.join()
        _membership = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    """Where the default group reduces: NCCL only reduces tensors on this rank's GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- collectives -----------------------------------------------------------------------------------------------


def all_reduce_sum(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The sum over all ranks, as a new tensor on the input's device (the input is left alone).

    Plain numbers become float64, so summed counts (examples, correct predictions) stay exact up to 2**53:
    ``loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count]).tolist()``.
    """
    if isinstance(values, torch.Tensor):
        tensor, home = values.detach().clone(), values.device
    else:
        tensor, home = torch.tensor(list(values), dtype=torch.float64), torch.device("cpu")
    if not _in_group():
        return tensor
    reduced = tensor.to(_collective_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(home)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace `tensor` with its mean over ranks, in place, and return it.

    Used for BatchNorm running statistics before evaluation: each device keeps its own during training (the
    paper's per-device BatchNorm) and the official code averages them over devices at eval. Integer tensors
    (``num_batches_tracked``) get the floor of the mean.
    """
    if not _in_group() or dist.get_world_size() == 1:
        return tensor
    device = _collective_device()
    reduced = tensor.detach().to(device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    if reduced.is_floating_point() or reduced.is_complex():
        reduced.div_(dist.get_world_size())
    else:
        reduced = torch.div(reduced, dist.get_world_size(), rounding_mode="floor")
    with torch.no_grad():
        tensor.copy_(reduced)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (any picklable object: a run directory, a resume step, a config)."""
    if not _in_group():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    if not _in_group():
        return
    if dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the device and warns about it.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
