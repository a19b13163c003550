"""Fault soak: inject the failures a training run meets on shared machines and check that nothing is lost.

    python scripts/soak.py [--kills 20] [--seed 0] [--workdir DIR] [--out FILE] [--only dead-rank]

Every training run here is a small SAM run with m-groups (ResNet-8, 256 CIFAR-10 images, batch 64, m = 16,
4 epochs, one thread), started through `sam-train` exactly as a user would, so its outputs are compared with one
uninterrupted reference run of the same command. The faults, and what "recovered" means for each:
  * kill -9 at random moments (`--kills`, at least 20): a fixed share lands while a checkpoint is being written
    (the child holds the write half-way, so the kill finds the temporary file on disk), the rest after a
    random number of optimizer steps. Re-running the same command resumes, and the run ends with the reference
    run's metrics (epoch by epoch) and weights (bit for bit);
  * SIGTERM and SIGUSR1 delivered while a checkpoint is being written: the run stops at the next step with exit
    status 128 + signal, its checkpoint loads, and a re-run ends with the reference result;
  * a full disk (ENOSPC) while a checkpoint is written: one `error:` line naming the checkpoint, exit status 2,
    the previous checkpoint still loads, and a re-run ends with the reference result;
  * a damaged prepared data cache (rebuilt from the verified source with a warning) and a damaged source file
    (one error naming it and the `sam-data` fix), in the soak's own SAM_DATA_DIR with Fashion-MNIST from the
    Debian package `dataset-fashion-mnist` (skipped, and said so, where it is not installed);
  * W&B failing in the middle of a run: a warning, and the run ends with the reference metrics;
  * a non-finite loss at a chosen step (`SAM_REPRO_FAULT=nonfinite_at_step=N`, sam_repro/engine/faults.py): status
    failed, exit status 2, the last good checkpoint kept;
  * a dead rank: the same run on 2 ranks under `torchrun --max-restarts=1`, rank 1 killed by SIGKILL after a
    random number of steps, and again while rank 0 is half-way through writing a checkpoint. The surviving rank
    stops with one line naming rank 1, torchrun starts both ranks again, they resume from the last checkpoint and
    the run ends with the metrics and weights of an uninterrupted 2-rank run.
Load-independent: kills are placed by training progress (log lines) and by the checkpoint's temporary file, not by
the clock. The last line is `soak: N faults injected, N recovered, 0 lost`; the exit status is 1 if anything was
lost. `--out` writes the same figures as JSON with provenance.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sam_repro.engine.rundir import RunFiles

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "model=resnet8",
    "dataset.train_subset=256",
    "dataset.test_subset=200",
    "trainer.batch_size=64",
    "trainer.eval_batch_size=200",
    "trainer.m=16",
    "optimizer=sam",
    "trainer.epochs=4",
    "trainer.threads=1",
    "trainer.device=cpu",
    "logger.mode=disabled",
    "trainer.progress=log",
    "trainer.log_every=1",
]
TIMING = {"images_per_second", "epoch_time_s"}
MID_WRITE = f".{RunFiles.CHECKPOINT}.*.tmp"  # a checkpoint's temporary file while it is written (sam_repro.files)
STEP_LINE = " step "  # Progress' log line for every optimizer step (trainer.log_every=1)


# ---------------------------------------------------------------------------------------------------------------
# The child: `sam-train` with a fault planted in the checkpoint writer or in W&B


def _child(argv: list[str]) -> None:
    """`soak.py --child FAULT ARG -- OVERRIDES...`: run sam-train in this process with FAULT planted:
    hold-write PATH (every checkpoint write stops half-written until PATH exists: a kill then lands mid-write
    whatever the load), signal-in-write SIGNAL, enospc-at N (the Nth checkpoint write), wandb-fail-after N."""
    fault, arg, overrides = argv[0], argv[1], argv[3:]
    import torch

    real_save, calls = torch.save, [0]

    def half_written(obj, f, *args, **kwargs) -> None:
        """torch.save through a buffer: half the bytes, then the fault, then the rest. Only for files: pickling
        through memory (the object collectives, a tensor's storage) passes straight through."""
        if isinstance(f, io.BytesIO):
            return real_save(obj, f, *args, **kwargs)
        calls[0] += 1
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        if fault == "hold-write":  # wait, half-written, until the parent kills us (or PATH appears)
            while not Path(arg).exists():
                time.sleep(0.01)
        elif fault == "signal-in-write" and calls[0] == 1:
            os.kill(os.getpid(), signal.Signals[arg])
        elif fault == "enospc-at" and calls[0] == int(arg):
            raise OSError(28, "No space left on device")
        f.write(data[len(data) // 2 :])

    if fault in ("hold-write", "signal-in-write", "enospc-at"):
        torch.save = half_written
    elif fault == "wandb-fail-after":
        import wandb.sdk.wandb_run as wandb_run

        real_log = wandb_run.Run.log

        def failing_log(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > int(arg):
                raise ConnectionError("W&B unreachable (injected by the soak)")
            return real_log(self, *args, **kwargs)

        wandb_run.Run.log = failing_log
    from sam_repro.train import main

    sys.argv = ["sam-train", *overrides]
    main()


# ---------------------------------------------------------------------------------------------------------------
# The parent


@dataclass
class Fault:
    kind: str
    detail: str
    recovered: bool = False
    note: str = ""


@dataclass
class Soak:
    work: Path
    data_dir: Path
    rng: random.Random
    faults: list[Fault] = field(default_factory=list)
    reference: tuple[list[dict], dict] | None = None
    n: int = 0

    # ---- running ----------------------------------------------------------------------------------------------
    def launch(
        self,
        runs: Path,
        extra: list[str] = (),
        fault: tuple[str, str] | None = None,
        env: dict | None = None,
        launcher: list[str] = (),
    ) -> tuple[subprocess.Popen, Path]:
        """The soak's sam-train run in `runs`, as one process, or under `launcher` (torchrun and its options)."""
        self.n += 1
        log = self.work / "logs" / f"{self.n:03d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        child = [str(Path(__file__).resolve()), "--child", *(fault or ("none", "-")), "--", *RUN, *extra]
        cmd = [sys.executable, *launcher, *child]
        child_env = {
            **os.environ,
            "SAM_RUNS_DIR": str(runs),
            "SAM_SOAK_LAUNCH": str(self.n),  # finds this launch's ranks in /proc
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with open(log, "w") as out:
            return subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=out, stderr=subprocess.STDOUT), log

    def run(self, runs: Path, extra: list[str] = (), fault=None, env=None, launcher=()) -> tuple[int, str]:
        proc, log = self.launch(runs, extra, fault, env, launcher)
        proc.wait()
        return proc.returncode, log.read_text()

    @staticmethod
    def run_dir(runs: Path) -> Path:
        found = [p.parent for p in runs.rglob(RunFiles.CONFIG) if p.parent.name == "seed0"]
        if len(found) != 1:
            raise RuntimeError(f"expected one run directory under {runs}, found {found}")
        return found[0]

    def outcome(self, run_dir: Path) -> tuple[list[dict], dict]:
        from sam_repro.engine.checkpoint import load_checkpoint

        rows = [
            {k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in RunFiles(run_dir).metrics.read_text().splitlines()
            if line.strip()
        ]
        return rows, load_checkpoint(RunFiles(run_dir).checkpoint)["model"]

    def equals_reference(self, run_dir: Path, reference: tuple[list[dict], dict] | None = None) -> tuple[bool, str]:
        import torch

        summary = json.loads(RunFiles(run_dir).summary.read_text())
        if summary.get("status") != "finished":
            return False, f"status {summary.get('status')}"
        rows, weights = self.outcome(run_dir)
        ref_rows, ref_weights = reference or self.reference
        if rows != ref_rows:
            return False, "metrics differ from the uninterrupted run"
        if any(not torch.equal(weights[k], v) for k, v in ref_weights.items()):
            return False, "weights differ from the uninterrupted run"
        return True, ""

    def finish_and_compare(self, runs: Path) -> tuple[bool, str]:
        """Re-run the same command until it finishes (a clean re-run must resume, never fail)."""
        rc, out = self.run(runs)
        if rc != 0 or "Traceback" in out:
            return False, f"the re-run exited {rc}: {out.strip().splitlines()[-1] if out.strip() else ''}"
        return self.equals_reference(self.run_dir(runs))

    def record(self, fault: Fault) -> None:
        self.faults.append(fault)
        state = "recovered" if fault.recovered else f"LOST ({fault.note})"
        print(f"soak: {fault.kind:<22} {fault.detail:<40} {state}", flush=True)

    # ---- the faults -------------------------------------------------------------------------------------------
    def kills(self, count: int) -> None:
        """kill -9 at random moments; every life of a run absorbs kills until it finishes, then is compared."""
        life, pending = 0, []
        while sum(f.kind.startswith("kill -9") for f in self.faults) + len(pending) < count:
            life += 1
            runs = self.work / f"kills{life}"
            while True:
                mid_write = self.rng.random() < 0.4
                fault = ("hold-write", str(self.work / "never")) if mid_write else None
                stale = set(runs.rglob(MID_WRITE))
                proc, log = self.launch(runs, fault=fault)
                landed = (
                    self._kill_in_write(proc, runs, stale)
                    if mid_write
                    else self._kill_after_steps(proc, log, self.rng.randint(1, 12))
                )
                proc.wait()
                if not landed:  # finished (or failed) before the kill came
                    break
                pending.append(
                    Fault(
                        "kill -9 " + ("mid-write" if mid_write else "in training"),
                        f"life {life}, attempt {len(pending) + 1}",
                    )
                )
                broken = self._checkpoint_broken(runs)
                if broken:
                    pending[-1].note = broken
                if len(pending) + sum(f.kind.startswith("kill -9") for f in self.faults) >= count:
                    break
            ok, note = self.finish_and_compare(runs)
            for fault in pending:
                fault.recovered = ok and not fault.note
                fault.note = fault.note or note
                self.record(fault)
            pending = []

    def _kill_in_write(self, proc: subprocess.Popen, runs: Path, before: set[Path]) -> bool:
        """SIGKILL while a checkpoint is half-written: once a new temporary file appears (one left by an
        earlier kill is not it; the child removes those at start)."""
        while proc.poll() is None:
            if set(runs.rglob(MID_WRITE)) - before:
                proc.kill()  # the writer is held half-way: the kill lands mid-write whatever the load
                return True
            time.sleep(0.005)
        return False

    @staticmethod
    def _kill_after_steps(proc: subprocess.Popen, log: Path, steps: int) -> bool:
        while proc.poll() is None:
            if log.read_text().count(STEP_LINE) >= steps:
                proc.kill()
                return True
            time.sleep(0.01)
        return False

    @staticmethod
    def _checkpoint_broken(runs: Path) -> str:
        from sam_repro.engine.checkpoint import load_checkpoint
        from sam_repro.errors import CheckpointError

        for ckpt in runs.rglob(RunFiles.CHECKPOINT):
            try:
                load_checkpoint(ckpt)
            except CheckpointError as exc:
                return str(exc)
        return ""

    def signal_in_write(self, name: str) -> None:
        runs = self.work / f"signal-{name}"
        rc, out = self.run(runs, fault=("signal-in-write", name))
        fault = Fault(f"{name} mid-write", "first checkpoint write")
        expected = 128 + signal.Signals[name]
        if rc != expected:
            fault.note = f"exit {rc}, expected {expected}"
        elif self._checkpoint_broken(runs):
            fault.note = self._checkpoint_broken(runs)
        else:
            fault.recovered, fault.note = self.finish_and_compare(runs)
        self.record(fault)

    def full_disk(self) -> None:
        from sam_repro.engine.checkpoint import load_checkpoint

        runs = self.work / "enospc"
        rc, out = self.run(runs, fault=("enospc-at", "2"))  # the second checkpoint: the first one must survive
        fault = Fault("full disk mid-write", "second checkpoint write")
        errors = [line for line in out.splitlines() if "error:" in line]
        if rc != 2 or "Traceback" in out or len(errors) != 1 or "could not write checkpoint" not in errors[0]:
            fault.note = f"exit {rc}, error lines {errors}"
        else:
            state = load_checkpoint(RunFiles(self.run_dir(runs)).checkpoint)
            if state["epoch"] != 1:
                fault.note = f"the previous checkpoint is at epoch {state['epoch']}, expected 1"
            else:
                fault.recovered, fault.note = self.finish_and_compare(runs)
        self.record(fault)

    def wandb_failure(self) -> None:
        runs = self.work / "wandb"
        rc, out = self.run(
            runs,
            ["logger.mode=offline"],
            fault=("wandb-fail-after", "2"),
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        )
        fault = Fault("W&B fails mid-run", "after 2 logged epochs")
        if rc != 0 or "W&B log failed" not in out:
            fault.note = f"exit {rc}; warning {'present' if 'W&B log failed' in out else 'missing'}"
        else:
            fault.recovered, fault.note = self.equals_reference(self.run_dir(runs))
        self.record(fault)

    def nonfinite_loss(self) -> None:
        from sam_repro.engine.checkpoint import load_checkpoint

        runs = self.work / "nonfinite"
        step = 6  # in the second epoch (4 steps an epoch): the checkpoint of epoch 1 is the last good one
        rc, out = self.run(runs, env={"SAM_REPRO_FAULT": f"nonfinite_at_step={step}"})
        fault = Fault("non-finite loss", f"step {step}")
        run_dir = self.run_dir(runs)
        summary = json.loads(RunFiles(run_dir).summary.read_text())
        state = load_checkpoint(RunFiles(run_dir).checkpoint)
        if rc != 2 or summary.get("status") != "failed" or "Traceback" in out:
            fault.note = f"exit {rc}, status {summary.get('status')}"
        elif state["epoch"] != 1:
            fault.note = f"the checkpoint kept is at epoch {state['epoch']}, expected 1 (the last good one)"
        else:
            fault.recovered = True
        self.record(fault)

    def dead_rank(self) -> None:
        """Rank 1 of 2 killed under `torchrun --max-restarts=1`: in training, and while rank 0 writes a checkpoint
        (held half-way until rank 1 is dead, then let go)."""
        rc, _ = self.run(self.work / "rank-reference", launcher=_torchrun())
        if rc != 0:
            self.record(Fault("rank killed", "the 2-rank reference run", note=f"exit {rc}"))
            return
        reference = self.outcome(self.run_dir(self.work / "rank-reference"))
        self._kill_rank(reference, mid_write=False)
        self._kill_rank(reference, mid_write=True)

    def _kill_rank(self, reference: tuple[list[dict], dict], mid_write: bool) -> None:
        where = "mid-write" if mid_write else "in training"
        runs, release = self.work / f"rank-killed-{where.replace(' ', '-')}", self.work / f"release-{where}"
        steps = self.rng.randint(1, 11)
        fault = ("hold-write", str(release)) if mid_write else None
        proc, log = self.launch(runs, fault=fault, launcher=_torchrun("--max-restarts=1"))
        detail = "rank 1 of 2, " + ("rank 0 half-way through a checkpoint" if mid_write else f"after {steps} steps")
        outcome, victims = Fault(f"rank killed {where}", detail), []
        try:
            if mid_write:
                landed = self._wait_for(proc, lambda: any(runs.rglob(MID_WRITE)))
            else:
                landed = self._wait_for(proc, lambda: log.read_text().count(STEP_LINE) >= steps)
            victims = _rank_pids(str(self.n), rank=1) if landed else []
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            release.touch()  # rank 0 finishes its write, then finds rank 1 gone
            proc.wait(timeout=1800)
        finally:
            proc.kill()
            release.touch()
        out = log.read_text()
        if len(victims) != 1:
            outcome.note = f"found {len(victims)} rank-1 processes to kill (the run ended first?)"
        elif proc.returncode != 0:
            outcome.note = f"torchrun exited {proc.returncode}"
        elif "waited for rank 1" not in out:
            outcome.note = "the surviving rank did not name rank 1"
        else:
            outcome.recovered, outcome.note = self.equals_reference(self.run_dir(runs), reference)
        self.record(outcome)

    @staticmethod
    def _wait_for(proc: subprocess.Popen, ready) -> bool:
        while proc.poll() is None:
            if ready():
                return True
            time.sleep(0.01)
        return False

    def damaged_data(self) -> None:
        from sam_repro.data import sources
        from sam_repro.errors import DataError

        if not sources.fashion_mnist.DEBIAN_DIR.is_dir():
            print("soak: data faults skipped: the Debian package dataset-fashion-mnist is not installed", flush=True)
            return
        env = {**os.environ, "SAM_DATA_DIR": str(self.data_dir)}
        sam_data = [sys.executable, "-m", "sam_repro.cli.data", "fashion_mnist", "--root", str(self.data_dir)]
        subprocess.run(sam_data, env=env, capture_output=True, text=True, check=True)
        cache = self.data_dir / "fashion_mnist" / sources.CACHE_NAME
        raw = bytearray(cache.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
        cache.write_bytes(bytes(raw))
        fault = Fault("damaged data cache", str(cache.relative_to(self.work)))
        proc = subprocess.run(sam_data, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "damaged" not in out:
            fault.note = f"exit {proc.returncode}, no rebuild warning"
        else:
            sources.verify("fashion_mnist", self.data_dir)  # the rebuilt cache verifies
            fault.recovered = True
        self.record(fault)

        bad = self.data_dir / sources.DATASETS["fashion_mnist"].raw_dir / "train-images-idx3-ubyte.gz"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"\x1f\x8b damaged")
        cache.unlink()
        fault = Fault("damaged source file", str(bad.relative_to(self.work)))
        proc = subprocess.run(sam_data, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        if proc.returncode != 2 or len(errors) != 1 or str(bad) not in errors[0] or "sam-data" not in errors[0]:
            fault.note = f"exit {proc.returncode}, error lines {errors}"
        else:
            try:
                sources.verify("fashion_mnist", self.data_dir)
                fault.note = "a cache was built from the damaged file"
            except DataError:
                fault.recovered = True  # refused, and nothing was built from it
        self.record(fault)


def _torchrun(*options: str) -> list[str]:
    """`python -m torch.distributed.run` on 2 CPU ranks of this machine, with `options`."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *options]


def _rank_pids(launch: str, rank: int) -> list[int]:
    """The processes of soak launch `launch` (SAM_SOAK_LAUNCH) that are rank `rank` of torchrun's first attempt."""
    want = {f"SAM_SOAK_LAUNCH={launch}".encode(), f"RANK={rank}".encode(), b"TORCHELASTIC_RESTART_COUNT=0"}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if want <= set((proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9 faults to inject (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs live (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON with provenance")
    ap.add_argument("--only", choices=["dead-rank"], default=None, help="inject only these faults")
    args = ap.parse_args()
    if args.kills < 1:
        ap.error("--kills must be >= 1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sam-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(work=work, data_dir=work / "data", rng=random.Random(args.seed))
    start = time.time()
    rc, out = soak.run(work / "reference")
    if rc != 0:
        print(f"soak: the reference run failed (exit {rc}):\n{out}", file=sys.stderr)
        return 1
    soak.reference = soak.outcome(soak.run_dir(work / "reference"))
    if args.only is None:
        soak.kills(args.kills)
        for name in ("SIGTERM", "SIGUSR1"):
            soak.signal_in_write(name)
        soak.full_disk()
        soak.damaged_data()
        soak.wandb_failure()
        soak.nonfinite_loss()
    soak.dead_rank()

    injected = len(soak.faults)
    recovered = sum(f.recovered for f in soak.faults)
    if args.out:
        from sam_repro.engine.provenance import provenance
        from sam_repro.files import atomic_write_json

        atomic_write_json(
            args.out,
            {
                "injected": injected,
                "recovered": recovered,
                "lost": injected - recovered,
                "seconds": time.time() - start,
                "faults": [asdict(f) for f in soak.faults],
                "run": RUN,
                "provenance": provenance(),
            },
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"soak: {injected} faults injected, {recovered} recovered, {injected - recovered} lost", flush=True)
    return 0 if recovered == injected else 1


if __name__ == "__main__":
    sys.exit(main())
