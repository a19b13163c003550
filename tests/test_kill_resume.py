"""kill -9 at random moments: every re-run of the same `sam-train` command starts from a loadable checkpoint (or
from scratch when none was written yet), and the run ends with exactly the metrics and weights of a run that was
never interrupted.

The checkpoint is written atomically (engine/checkpoint.py: temp file, fsync, os.replace), so the kills that matter
most land while `checkpoints/.last.pt.*.tmp` exists: the test polls for that file and kills as soon as it appears.
A temp file still on disk after the kill proves the kill landed mid-write. The other kills come after seeded random
delays, which land in start-up (imports, data, resume, rewriting metrics.jsonl) or in an epoch. One SIGTERM among
them stops the run gracefully mid-epoch, so the kills after it also hit a run resumed from a mid-epoch checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers.training import BIN, TINY, comparable, env_for, read_metrics
from sam_repro.engine.checkpoint import load_checkpoint
from sam_repro.engine.rundir import run_name

pytestmark = pytest.mark.data

EPOCHS = 5
ARGS = [*TINY, "trainer.device=cpu", f"trainer.epochs={EPOCHS}", "optimizer=sam"]
# In order: kill -9 after a random delay ("delay") or during the first or second checkpoint the run writes
# ("write"); SIGTERM at a random moment of training ("term"). The exit status each one ends the run with.
MOMENTS = ("delay", "write", "term", "delay", "write", "delay", "write")
EXIT_STATUS = {"delay": -signal.SIGKILL, "write": -signal.SIGKILL, "term": 128 + signal.SIGTERM}
TRAINING = "rank(s) on cpu"  # the set-up line logged after the resume, just before the first step
RESUMED = re.compile(r"resumed from .*last\.pt at epoch (\d+), step (\d+)")


@dataclass
class Attempt:
    moment: str
    started_from: tuple[int, int] | None  # (epoch, step) of the checkpoint on disk at launch; None: no checkpoint
    returncode: int
    left_temp_file: bool
    output: str


def run_dir_of(runs: Path) -> Path:
    return runs / run_name(None, ARGS) / "seed0"


def sam_train(runs: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([str(BIN / "sam-train"), *ARGS], env={**env_for(runs), "OMP_NUM_THREADS": "1"},
                                stdout=out, stderr=subprocess.STDOUT)


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


def kill_at_write(proc: subprocess.Popen, ckpt_dir: Path, nth: int, after: float, timeout: float = 120) -> None:
    """SIGKILL `after` seconds once the nth new `.last.pt.*.tmp` of this run appears. The file lives about 12 ms
    here (torch.save, fsync, os.replace), so a kill after 0 s finds it empty and one after a few ms written."""
    seen, count, deadline = temp_files(ckpt_dir), 0, time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        new = temp_files(ckpt_dir) - seen
        if new:
            count, seen = count + 1, seen | new
            if count == nth:
                time.sleep(after)
                proc.kill()
                return
        time.sleep(0.0005)
    proc.kill()


def term_in_training(proc: subprocess.Popen, log: Path, after: float, timeout: float = 120) -> None:
    """SIGTERM `after` seconds into training (StopSignal's handler is installed by then)."""
    deadline = time.monotonic() + timeout
    while TRAINING not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            return
        time.sleep(0.01)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_result(tmp_path):
    t0 = time.monotonic()
    reference = subprocess.run([str(BIN / "sam-train"), *ARGS], env={**env_for(tmp_path / "a"), "OMP_NUM_THREADS": "1"},
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    # Delays up to 60% of a whole run reach at most an epoch or two past start-up (about 40% of a run here), so
    # the checkpoints advance a little per attempt and the kills spread over the run instead of the first one
    # running nearly to the end.
    longest_delay = 0.6 * (time.monotonic() - t0)
    ref_dir = run_dir_of(tmp_path / "a")

    runs = tmp_path / "b"
    run_dir = run_dir_of(runs)
    ckpt = run_dir / "checkpoints" / "last.pt"
    rng = random.Random(0)
    attempts: list[Attempt] = []
    for i, moment in enumerate(MOMENTS):
        started_from = checkpoint_on_disk(ckpt)
        done = started_from[0] if started_from else 0  # complete epochs
        before = temp_files(ckpt.parent)
        log = tmp_path / f"attempt{i}.log"
        proc = sam_train(runs, log)
        if moment == "write" and done < EPOCHS:
            # at once the first time (certain to land mid-write), a few ms into the write afterwards
            after = rng.uniform(0, 0.005) if any(a.moment == "write" for a in attempts) else 0.0
            kill_at_write(proc, ckpt.parent, nth=rng.randint(1, min(2, EPOCHS - done)), after=after)
        elif moment == "term":
            term_in_training(proc, log, after=rng.uniform(0, 1.0))
        else:
            try:
                proc.wait(timeout=rng.uniform(0.2, longest_delay))
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        attempts.append(Attempt(moment, started_from, proc.returncode, bool(temp_files(ckpt.parent) - before),
                                log.read_text()))
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
    final = subprocess.run([str(BIN / "sam-train"), *ARGS], env={**env_for(runs), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
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
