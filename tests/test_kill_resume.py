"""kill -9 at random moments: every re-run of the same `sam-train` command starts from a loadable checkpoint (or
from scratch when none was written yet), and the run ends with exactly the metrics and weights of a run that was
never interrupted.

The moments are placed by what the run has done, never by the clock, so the test means the same on a loaded
machine as on a quiet one: during start-up (as soon as the first log line appears: imports, data, resume and the
rewrite of metrics.jsonl still to come), after a random number of optimizer steps (each step logs a line), and while
a checkpoint is being written. For the last one the run is started through the fault harness of
`scripts/soak.py` (`--child hold-write`), which holds every checkpoint write half-way through: the temporary file
`checkpoints/.last.pt.*.tmp` is on disk, half-written, when the kill comes. The checkpoint is written atomically
(engine/checkpoint.py: temp file, fsync, os.replace), so those kills must leave the previous checkpoint intact. One
SIGTERM, after a random number of steps, stops the run gracefully mid-epoch, so the kills after it also hit a run
resumed from a mid-epoch checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers.training import BIN, TINY, comparable, env_for, read_metrics
from sam_repro.engine import rundir
from sam_repro.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.data

EPOCHS = 5
STEPS = 4 * EPOCHS  # debug=tiny: 256 examples in batches of 64
ARGS = [
    *TINY,
    "trainer.device=cpu",
    f"trainer.epochs={EPOCHS}",
    "optimizer=sam",
    "trainer.progress=log",
    "trainer.log_every=1",
]
SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
# In order: kill -9 in start-up ("startup"), after a random number of steps ("steps") or while the first or second
# checkpoint of the attempt is half-written ("write"); SIGTERM after a random number of steps ("term"). The exit
# status each one ends the run with.
MOMENTS = ("steps", "write", "term", "startup", "write", "steps", "write")
EXIT_STATUS = {
    "startup": -signal.SIGKILL,
    "steps": -signal.SIGKILL,
    "write": -signal.SIGKILL,
    "term": 128 + signal.SIGTERM,
}
TRAINING = "rank(s) on cpu"  # the set-up line logged after the resume, just before the first step
STEP_LINE = re.compile(r"epoch \d+/\d+ step \d+/\d+ ")  # one per optimizer step (trainer.log_every=1)
HANG_GUARD_S = 1800  # only against a hung child: every wait below ends on what the run does
RESUMED = re.compile(r"resumed from .*last\.pt at epoch (\d+), step (\d+)")


@dataclass
class Attempt:
    moment: str
    started_from: tuple[int, int] | None  # (epoch, step) of the checkpoint on disk at launch; None: no checkpoint
    returncode: int
    left_temp_file: bool
    output: str


def sam_train(runs: Path, log: Path, hold_writes: bool = False) -> subprocess.Popen:
    """The same command each time; with `hold_writes`, through the soak's fault harness, which holds every
    checkpoint write half-way until the test kills the run (the file it waits for never appears)."""
    cmd = [str(BIN / "sam-train"), *ARGS]
    if hold_writes:
        cmd = [sys.executable, str(SOAK), "--child", "hold-write", str(runs / "never"), "--", *ARGS]
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, env={**env_for(runs), "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT
        )


def temp_files(ckpt_dir: Path) -> set[str]:
    try:
        return {n for n in os.listdir(ckpt_dir) if n.startswith(".last.pt.") and n.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def checkpoint_on_disk(ckpt: Path) -> tuple[int, int] | None:
    """The (epoch, step) a re-run must resume from. Raises CheckpointError, failing the test, if a kill left
    last.pt unloadable."""
    if not ckpt.exists():
        return None
    state = load_checkpoint(ckpt)
    return state["epoch"], state["step"]


def wait_for(proc: subprocess.Popen, ready) -> bool:
    """Poll until `ready()` (True) or the run ended (False)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.002)
    return False


def steps_logged_text(text: str) -> int:
    return len(STEP_LINE.findall(text))


def steps_logged(log: Path) -> int:
    return steps_logged_text(log.read_text())


def kill_in_write(proc: subprocess.Popen, ckpt_dir: Path) -> None:
    """SIGKILL once this attempt's first checkpoint write is on disk, held half-written by the harness."""
    seen = temp_files(ckpt_dir)
    wait_for(proc, lambda: temp_files(ckpt_dir) - seen)
    proc.kill()


def signal_after_steps(proc: subprocess.Popen, log: Path, steps: int, sig: int) -> None:
    """`sig` once this attempt has logged `steps` optimizer steps (StopSignal's handler is installed by then)."""
    if wait_for(proc, lambda: steps_logged(log) >= steps):
        proc.send_signal(sig)


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_result(tmp_path):
    reference = subprocess.run(
        [str(BIN / "sam-train"), *ARGS],
        env={**env_for(tmp_path / "a"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert steps_logged_text(reference.stdout + reference.stderr) == STEPS
    ref_dir = rundir.run_dir(ARGS, root=tmp_path / "a")

    runs = tmp_path / "b"
    run_dir = rundir.run_dir(ARGS, root=runs)
    ckpt = run_dir / "checkpoints" / "last.pt"
    rng = random.Random(0)
    attempts: list[Attempt] = []
    for i, moment in enumerate(MOMENTS):
        started_from = checkpoint_on_disk(ckpt)
        before = temp_files(ckpt.parent)
        log = tmp_path / f"attempt{i}.log"
        proc = sam_train(runs, log, hold_writes=moment == "write")
        if moment == "write":
            kill_in_write(proc, ckpt.parent)
        elif moment == "startup":
            if wait_for(proc, lambda log=log: log.read_text().strip()):  # the first log line: set-up has begun
                proc.kill()
        else:  # a few steps into this attempt (of the 4 an epoch), so the kills spread over the whole run
            sig = signal.SIGTERM if moment == "term" else signal.SIGKILL
            signal_after_steps(proc, log, rng.randint(1, 6), sig)
        proc.wait()
        attempts.append(
            Attempt(moment, started_from, proc.returncode, bool(temp_files(ckpt.parent) - before), log.read_text())
        )
        if proc.returncode == 0:  # finished before the kill came: nothing left to interrupt
            break

    history = []
    for a in attempts:
        context = f"{a.moment}, started from {a.started_from}, exit {a.returncode}:\n{a.output}"
        assert a.returncode in (EXIT_STATUS[a.moment], 0), context
        assert "Traceback" not in a.output and "damaged" not in a.output, context
        resumed = [tuple(map(int, m)) for m in RESUMED.findall(a.output)]
        if a.started_from is None:
            assert resumed == [], context  # nothing to resume from: a fresh start
        elif TRAINING in a.output:  # got past the resume point before it was killed
            assert resumed == [a.started_from], context
        history.append(a.started_from or (0, 0))
    assert history == sorted(history), f"a kill lost a checkpoint that was already on disk: {history}"
    killed = [a for a in attempts if a.returncode == -signal.SIGKILL]
    assert len(killed) >= 4, [(a.moment, a.returncode) for a in attempts]
    assert any(a.left_temp_file for a in killed if a.moment == "write"), "no kill landed while last.pt was written"

    # The same command once more, left alone, resumes from the last complete checkpoint and finishes (or, when the
    # last kill came after the final summary was written, reports the finished run).
    started_from = checkpoint_on_disk(ckpt)
    finished = json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    final = subprocess.run(
        [str(BIN / "sam-train"), *ARGS],
        env={**env_for(runs), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    output = final.stdout + final.stderr
    assert final.returncode == 0, output
    if finished:
        assert "already finished" in output, output
    else:
        assert [tuple(map(int, m)) for m in RESUMED.findall(output)] == ([started_from] if started_from else [])

    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(1, EPOCHS + 1))  # each epoch once
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(ref_dir))
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    assert summary["status"] == "finished"
    assert (summary["test_error"], summary["best_test_error"]) == (expected["test_error"], expected["best_test_error"])
    weights, expected_weights = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (run_dir, ref_dir))
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name
