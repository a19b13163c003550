"""Stopping on a signal: every rank stops after the same step, the trainer checkpoints, and SLURM brings the job back.

The trainer's side of the protocol::

    stop = StopSignal(env)                 # every rank, in the main thread, before the first step
    for step in ...:
        train_step(...)
        if stop.should_stop():             # every rank, every step: all ranks get the same answer
            save_checkpoint(...)           # rank 0
            stop.finish()                  # every rank: requeue if SLURM asked for it, then exit

Which signals arrive, and from whom (docs/cluster.md has the full story):

- SIGUSR1 / SIGUSR2: "your time is nearly up" from SLURM (``--signal=USR1@120`` reaches the tasks,
  ``--signal=B:USR1@120`` only the batch shell, which ``scripts/slurm/train.sbatch`` traps and forwards to the
  ranks; submitit sends SIGUSR2 to the tasks) or by hand with ``scancel --signal=USR1``. The job should come back.
- SIGTERM: ``scancel``, preemption, the time limit itself, or torchrun's agent passing on its own signal.
  SIGINT: Ctrl-C. SIGHUP: the terminal went away. SIGQUIT: Ctrl-\\. The run should stop, not come back: a
  preempted job that its partition requeues is requeued by SLURM itself.

A signal only sets a flag; the step in flight finishes. `should_stop` all-reduces the flag (the signal number, MAX
over ranks) so that a signal that reached one rank stops all of them after the same step: a rank that left the loop
alone would leave the others blocked in the next gradient all-reduce. A second Ctrl-C stops at once
(KeyboardInterrupt), for a user who does not want to wait for the checkpoint. Signals that were ignored when the
handlers were installed (``nohup`` ignores SIGHUP) stay ignored.

`finish` makes the job come back when the signal asked for it, in this order:

1. a handler that was installed before ours (submitit's SIGUSR2 handler) is called: it requeues by itself;
2. else, with ``SAM_REQUEUE=auto`` (the default), SIGUSR1/SIGUSR2 inside a SLURM job: rank 0 runs
   ``scontrol requeue $SLURM_JOB_ID`` (this needs a requeueable job: ``sbatch --requeue`` or ``JobRequeue=1``);
3. ``SAM_REQUEUE=batch`` (set by train.sbatch): nothing here, the batch script requeues after the step ended;
   ``SAM_REQUEUE=off``: never.

and then exits with code 128 + signal number, the shell's code for "ended by that signal":

    SIGHUP 129, SIGINT 130, SIGQUIT 131, SIGUSR1 138, SIGUSR2 140, SIGTERM 143

A finished run exits 0, so a batch script can tell "stopped, resume me" from "done".
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, Literal, NoReturn, get_args

import torch
import torch.distributed as dist

from sam_repro.engine.distributed import DistEnv
from sam_repro.errors import ConfigError, RankLost

log = logging.getLogger(__name__)

HANDLED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# The signals that mean "time is nearly up, come back later" rather than "stop".
REQUEUE_SIGNALS: frozenset[int] = frozenset({signal.SIGUSR1, signal.SIGUSR2})

RequeueMode = Literal["auto", "batch", "off"]
REQUEUE_ENV = "SAM_REQUEUE"
MAX_REQUEUES_ENV = "SAM_MAX_REQUEUES"  # how often a job may come back after losing a rank (SLURM_RESTART_COUNT)
DEFAULT_MAX_REQUEUES = 20  # as the launcher presets' max_num_timeout

Handler = Callable[[int, FrameType | None], Any] | int | None


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by `signum`: 128 + signum, as a shell reports a process the signal killed."""
    return 128 + int(signum)


def _requeue_mode(requeue: str | None) -> RequeueMode:
    mode = requeue if requeue is not None else os.environ.get(REQUEUE_ENV, "auto")
    if mode not in get_args(RequeueMode):
        raise ConfigError(f"{REQUEUE_ENV} must be one of {', '.join(get_args(RequeueMode))} (got {mode!r})")
    return mode  # type: ignore[return-value]


def _chains(handler: Handler) -> bool:
    """A previous handler worth calling: Python code someone installed, not a default disposition. Python's own
    SIGINT handler is left out: it would turn a clean exit into a KeyboardInterrupt traceback."""
    return callable(handler) and handler is not signal.default_int_handler


class StopSignal:
    """Turns SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 into a stop that every rank agrees on.

    Construct it on every rank (with NCCL it creates a small gloo group, a collective call) in the main thread.
    Usable as a context manager that restores the previous handlers on exit.
    """

    def __init__(
        self,
        env: DistEnv | None = None,
        *,
        requeue: RequeueMode | None = None,
        signals: Iterable[signal.Signals] = HANDLED_SIGNALS,
    ) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal must be created in the main thread (Python only delivers signals there)")
        self.env = env
        self.requeue: RequeueMode = _requeue_mode(requeue)
        self._received: int | None = None  # the first signal this rank got
        self._agreed: int | None = None  # the signal all ranks stop for, once should_stop() said so
        self._previous: dict[signal.Signals, Handler] = {}
        self._distributed = env is not None and env.distributed
        self._group = None
        if self._distributed:
            if not dist.is_initialized():
                raise RuntimeError("StopSignal: env.distributed but no process group; call init_distributed first")
            if dist.get_backend() != "gloo":
                # The per-step flag goes through a gloo group on the CPU: an all-reduce on the GPU would make every
                # step wait for the device (a host sync), which costs throughput on small models.
                self._group = dist.new_group(backend="gloo")

        ignored = []
        for sig in signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                ignored.append(sig)
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._on_signal)
        self.ignored: tuple[signal.Signals, ...] = tuple(ignored)

    # ---- the signal handler: runs in the main thread, between two bytecodes of whatever it interrupted --------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        if self._received is None:
            self._received = signum
            name = signal.Signals(signum).name
            hint = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
            # os.write, not print or logging: a handler that writes to a buffered stream the interrupted code was
            # writing to raises "reentrant call".
            with contextlib.suppress(OSError):  # a closed stderr must not turn a signal into a crash
                os.write(2, f"sam-repro: got {name}, stopping after this step{hint}\n".encode())

    # ---- what the trainer calls -------------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """True once any rank got a signal; every rank gets the same answer at the same call.

        One all-reduce of a single int over gloo per call when distributed; no communication in a single process.
        """
        if self._agreed is not None:
            return True
        local = self._received or 0
        if self._distributed:
            flag = torch.tensor([local], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            agreed = int(flag.item())
        else:
            agreed = local
        if not agreed:
            return False
        self._agreed = agreed
        if self.env is None or self.env.is_main:
            log.warning("%s: stopping every rank after this step", signal.Signals(agreed).name)
        return True

    @property
    def signal_name(self) -> str | None:
        """The signal the run stops for ("SIGUSR1"), once should_stop() agreed on it; before that, the one this
        rank received; None when there was none."""
        signum = self._agreed or self._received
        return signal.Signals(signum).name if signum else None

    def finish(self) -> NoReturn:
        """Call on every rank after the checkpoint is written: requeue the job if the signal asked for it, then
        exit with 128 + signum (raises SystemExit, so `finally` blocks and atexit hooks still run)."""
        if self._agreed is None:
            raise RuntimeError("StopSignal.finish() called before should_stop() returned True")
        signum = self._agreed
        try:
            if self._distributed:
                # Leave together, once rank 0's checkpoint is on disk: torchrun (and srun --kill-on-bad-exit) kill
                # the remaining ranks as soon as one of them exits.
                dist.barrier(group=self._group)
            previous = self._previous.get(signal.Signals(signum))
            if _chains(previous):
                log.info("passing %s on to the handler installed before ours", signal.Signals(signum).name)
                previous(signum, None)  # type: ignore[misc, operator]
            elif self._requeues(signum):
                self._requeue_slurm_job(os.environ["SLURM_JOB_ID"])
        finally:
            self.restore()
        raise SystemExit(exit_code(signum))

    def restore(self) -> None:
        """Put back the handlers that were installed before this object (idempotent)."""
        for sig, previous in self._previous.items():
            # getsignal() returns None for a handler not installed from Python; SIG_DFL is the closest we can set.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    # ---- requeue ----------------------------------------------------------------------------------------------

    def _requeues(self, signum: int) -> bool:
        return (
            self.requeue == "auto"
            and signum in REQUEUE_SIGNALS
            and "SLURM_JOB_ID" in os.environ
            and (self.env is None or self.env.is_main)
        )

    @staticmethod
    def _requeue_slurm_job(job_id: str) -> None:
        _requeue_slurm_job(job_id)


def requeue_after_lost_rank(env: DistEnv, lost: RankLost, requeue: RequeueMode | None = None) -> bool:
    """Bring an srun-started job back after it lost a rank (a dead or hung peer): the lowest surviving rank runs
    `scontrol requeue`, with `SAM_REQUEUE=auto` (the default, and what submitit's jobs run with), inside a SLURM job
    whose ranks srun started, while the job has come back fewer than `SAM_MAX_REQUEUES` (20) times in all. The
    requeued job resumes from the checkpoint. Under train.sbatch (`SAM_REQUEUE=batch`) the batch script does it,
    from the step's exit status; under torchrun, `--max-restarts` restarts the ranks in place."""
    if _requeue_mode(requeue) != "auto" or env.launcher != "slurm" or "SLURM_JOB_ID" not in os.environ:
        return False
    survivors = [r for r in range(env.world_size) if r not in lost.waited_for]
    if not survivors or env.rank != min(survivors):
        return False
    limit = int(os.environ.get(MAX_REQUEUES_ENV, DEFAULT_MAX_REQUEUES))
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= limit:
        log.error(
            "SLURM job %s has come back %d times (%s): not requeued",
            os.environ["SLURM_JOB_ID"],
            limit,
            MAX_REQUEUES_ENV,
        )
        return False
    _requeue_slurm_job(os.environ["SLURM_JOB_ID"])
    return True


@contextlib.contextmanager
def holding(signals: Iterable[signal.Signals] = (signal.SIGTERM,)):
    """Hold `signals` back while the body runs: a few seconds in which a rank that lost another names it and
    requeues. torchrun's agent SIGTERMs the surviving ranks as soon as one dies, and would otherwise cut that line
    off. The body's exception still ends the process; a signal that came meanwhile is only logged. A no-op outside
    the main thread (Python delivers signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if received:
            log.warning("%s arrived while the lost rank was named; leaving now", signal.Signals(received[0]).name)


def _requeue_slurm_job(job_id: str) -> None:
    """`scontrol requeue`: SLURM puts the job back in the queue and ends this run of it (SIGTERM to its
    processes); the next run starts the batch script again, whose trainer resumes from the checkpoint."""
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("could not requeue SLURM job %s: %s", job_id, error)
        return
    if result.returncode != 0:
        # e.g. "Requested operation is presently disabled": the job was submitted with --no-requeue.
        log.error("could not requeue SLURM job %s: %s", job_id, (result.stderr or result.stdout).strip())
    else:
        log.warning("requeued SLURM job %s; it resumes from the checkpoint when it starts again", job_id)
