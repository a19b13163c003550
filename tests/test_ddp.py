"""Data-parallel training with gloo on the CPU: N processes must train exactly what one process trains.

The loader deals each global batch over the ranks, so with the same global batch the only differences between 1
and N processes are where the sums happen. Groups of m examples (`trainer.m`) make one process behave like N
devices: per-group BatchNorm statistics and, for SAM, a per-group perturbation (m-sharpness).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers.training import BIN, TIMING_KEYS, TINY, comparable, process_environ, worker_pids
from sam_repro.engine.distributed import torchrun_command

# debug=tiny (ResNet-8, batch 64), on fewer images: 3 steps per epoch, and a test error that may differ by one
# near-tie example of 300 between summation orders. gloo on the CPU, also on a GPU machine.
BASE = [
    *TINY,
    "dataset.train_subset=192",
    "dataset.test_subset=300",
    "trainer.epochs=2",
    "trainer.device=cpu",
    "hydra.run.dir=.",
]

pytestmark = [pytest.mark.data, pytest.mark.multiprocess]


def command(ranks: int, *torchrun_options: str) -> list[str]:
    if ranks == 1:
        return [str(BIN / "sam-train")]
    return torchrun_command(ranks, *torchrun_options, "-m", "sam_repro.train")


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(run_dir: Path, ranks: int, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    run_dir.mkdir(parents=True)
    cmd = [*command(ranks), *BASE, *overrides]
    return subprocess.run(cmd, cwd=run_dir, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)


def run(run_dir: Path, ranks: int, *overrides: str) -> tuple[list[dict], dict]:
    proc = launch(run_dir, ranks, *overrides)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    return metrics, state


def assert_same_training(a, b, rtol=1e-4, atol=1e-5):
    (metrics_a, state_a), (metrics_b, state_b) = a, b
    for ra, rb in zip(metrics_a, metrics_b, strict=True):
        for key in ("train_loss", "train_error", "test_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol, abs=atol), key
        # Weights agree to float rounding; a near-tie example may flip its prediction, so allow one of 300.
        assert ra["test_error"] == pytest.approx(rb["test_error"], abs=100 / 300 + 1e-9)
    for name in state_a:
        torch.testing.assert_close(state_a[name].float(), state_b[name].float(), rtol=rtol, atol=atol, msg=name)


def test_two_ranks_equal_one_rank_without_batchnorm(tmp_path):
    args = ["model.norm=none", "optimizer=sgd", "optimizer.lr=0.05"]
    assert_same_training(run(tmp_path / "one", 1, *args), run(tmp_path / "two", 2, *args))


def test_sam_m32_one_rank_batch64_equals_two_ranks_of_32(tmp_path):
    # The same update (one step, BatchNorm model): per-device perturbations and BatchNorm statistics, averaged.
    # (Over many steps the float rounding of the two summation orders is amplified by SAM's training dynamics at
    # this early, high-curvature stage; the BatchNorm-free test above checks whole runs.)
    args = ["trainer.m=32", "optimizer=sam", "optimizer.lr=0.05", "trainer.epochs=1", "trainer.max_steps=1"]
    one = run(tmp_path / "one", 1, *args)
    two = run(tmp_path / "two", 2, *args)
    assert_same_training(one, two, rtol=1e-5, atol=1e-6)
    # and m matters: one perturbation for all 64 examples is a different algorithm
    whole = run(tmp_path / "whole", 1, *[a for a in args if not a.startswith("trainer.m=")])
    diff = max((whole[1][k].float() - one[1][k].float()).abs().max().item() for k in one[1])
    assert diff > 1e-4


def test_stochastic_model_m32_one_rank_batch64_equals_two_ranks_of_32(tmp_path):
    # Shake-Shake draws its coefficients per virtual device, keyed by (seed, step, global group index): the second
    # group of one process draws what rank 1 draws (before that key, every rank drew rank 0's coefficients).
    args = [
        "model=shake_shake_26_2x32d",
        "model.depth=8",
        "model.width=8",
        "trainer.batch_size=64",
        "trainer.m=32",
        "optimizer=sam",
        "optimizer.lr=0.05",
        "trainer.epochs=1",
        "trainer.max_steps=1",
    ]
    assert_same_training(run(tmp_path / "one", 1, *args), run(tmp_path / "two", 2, *args), rtol=1e-5, atol=1e-6)


def test_sam_whole_runs_match_without_batchnorm(tmp_path):
    args = ["model.norm=none", "trainer.m=32", "optimizer=sam", "optimizer.lr=0.05"]
    assert_same_training(run(tmp_path / "one", 1, *args), run(tmp_path / "two", 2, *args))


def test_three_ranks_with_batchnorm_groups_match_one_rank(tmp_path):
    # 300 test examples over 3 ranks: exact evaluation without padding; BatchNorm statistics per device (m = 16)
    # averaged across ranks equal the one-process average of three groups.
    # One update: a third of the gradient sum rounds differently from three thirds, and over several steps that
    # rounding grows; one step checks the algorithm itself.
    args = [
        "trainer.batch_size=48",
        "trainer.m=16",
        "optimizer=sgd",
        "optimizer.lr=0.05",
        "trainer.epochs=1",
        "trainer.max_steps=1",
    ]
    assert_same_training(run(tmp_path / "one", 1, *args), run(tmp_path / "three", 3, *args), rtol=1e-5, atol=1e-6)


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # 3 steps per epoch; rank 1 alone sees a NaN loss at step 4. The check at the next log point (every 2 steps)
    # sums the loss over ranks, so both ranks stop at step 4 instead of rank 0 waiting in the next all-reduce.
    run_dir = tmp_path / "run"
    fault = {"SAM_REPRO_FAULT": "nonfinite_at_step=4,nonfinite_rank=1"}  # the test hook (engine/faults.py)
    proc = launch(
        run_dir, 2, "model=resnet8", "trainer.batch_size=64", "optimizer=sgd", "trainer.log_every=2", env=fault
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert output.count("error: training loss became non-finite by step 4") == 2, output  # once per rank
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "by step 4" in summary["reason"]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 3  # the last good one


PAYLOAD = """
import json, sys, torch
from omegaconf import OmegaConf
from hydra.utils import instantiate
from sam_repro.data import build_data
from sam_repro.engine.distributed import init_distributed, cleanup_distributed
from sam_repro.engine.evaluation import evaluate
import contextlib
ckpt = torch.load(sys.argv[1], weights_only=True)
cfg = OmegaConf.create(ckpt["config"])
env = init_distributed("cpu")
model = instantiate(cfg.model)
model.load_state_dict(ckpt["model"])
data = build_data(cfg, env.device, env.rank, env.world_size)
result = evaluate(model, data.test, env, contextlib.nullcontext)
if env.is_main:
    json.dump(result, open(sys.argv[2], "w"))
cleanup_distributed()
"""


def test_exact_evaluation_with_one_two_and_three_ranks(tmp_path):
    run(tmp_path / "train", 1, "trainer.epochs=1", "dataset.test_subset=301", "trainer.eval_batch_size=50")
    payload = tmp_path / "payload.py"
    payload.write_text(PAYLOAD)
    results = []
    for ranks in (1, 2, 3):
        out = tmp_path / f"eval{ranks}.json"
        cmd = torchrun_command(ranks, str(payload), str(tmp_path / "train/checkpoints/last.pt"), str(out))
        proc = subprocess.run(
            cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(out.read_text()))
    reference = json.loads((tmp_path / "train/metrics.jsonl").read_text().splitlines()[-1])
    for r in results:  # 301 examples: shards of 100/101 and 150/151, no padding, nothing counted twice
        assert r["error"] == pytest.approx(reference["test_error"], abs=1e-9)
        assert r["error_top5"] == pytest.approx(reference["test_error_top5"], abs=1e-9)
        assert r["loss"] == pytest.approx(reference["test_loss"], rel=1e-5)


HANG_GUARD_S = 1800  # only against a hung torchrun: every wait below ends on what the ranks do


def wait_until(ready, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Poll `ready()` while torchrun runs; the deadline is only against a hang."""
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_a_killed_rank_restarts_under_torchrun_and_ends_with_the_uninterrupted_metrics(tmp_path):
    # Rank 1 gets SIGKILL once the first epoch's checkpoint is on disk (in epoch 2, 3 steps an epoch); torchrun
    # --max-restarts=1 starts both ranks again. The new rank 0 is held (SIGSTOP) until the new rank 1 has checked
    # in on the agent's store, or died: that order made a restarted rank 1 read the killed group's leftovers there
    # and connect to a dead rank 0. Both resume from the checkpoint, and every epoch's metrics and the final
    # weights equal those of a run that was never interrupted.
    args = ["optimizer=sam", "trainer.m=16", "optimizer.lr=0.05", "trainer.epochs=3"]
    reference, reference_state = run(tmp_path / "reference", 2, *args)

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    log = run_dir.parent / "killed.log"
    marker = str(run_dir)
    cmd = [*command(2, "--max-restarts=1"), *BASE, *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir, env={**ENV, "SAM_TEST_LAUNCH": marker}, stdout=out, stderr=out)
    held: list[int] = []
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        wait_until(lambda: (run_dir / "checkpoints" / "last.pt").exists(), proc, log, deadline)
        victims = worker_pids(marker, rank=1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)

        wait_until(lambda: worker_pids(marker, 0, attempt=1), proc, log, deadline)
        held = worker_pids(marker, 0, attempt=1)
        os.kill(held[0], signal.SIGSTOP)
        wait_until(lambda: worker_pids(marker, 1, attempt=1), proc, log, deadline)
        rank1 = worker_pids(marker, 1, attempt=1)[0]
        environ = process_environ(rank1)
        store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False)
        wait_until(
            lambda: store.check(["sam_repro/attempt1/joined/1"]) or not process_environ(rank1), proc, log, deadline
        )
        os.kill(held[0], signal.SIGCONT)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:  # whatever happened, nothing of this launch is left running or stopped
        proc.kill()
        for pid in held + [p for a in (0, 1) for r in (0, 1) for p in worker_pids(marker, r, a)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == 0, output
    # the surviving rank said which rank it lost, and the restart resumed from a checkpoint
    assert re.search(r"error: rank 0 lost the process group at step \d+: waited for rank 1\b", output), output
    assert re.search(r"resumed from \S+ at epoch [12], step [36]\n", output), output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert comparable(rows) == comparable(reference), "metrics differ from the uninterrupted run"
    assert TIMING_KEYS <= set(rows[0])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, tensor in reference_state.items():
        assert torch.equal(state[name], tensor), name
