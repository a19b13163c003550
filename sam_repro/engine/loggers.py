"""Where metrics go: `metrics.jsonl` in the run directory (always, one row per epoch, the source of truth for tables
and resume), `steps.jsonl` (a row every `logger.log_every_steps` optimizer steps: the per-step training curves),
Weights & Biases (optional; offline by default; a failure to start is a warning, never fatal), and the console (a
tqdm bar on a terminal, plain log lines otherwise). Rank 0 only.

What a W&B run carries for the dashboard: group = the table cell (SGD and SAM runs of one cell side by side),
job_type = the optimizer, tags, the resolved config; history rows per epoch (keys as in metrics.jsonl, against
`epoch`) and per step (`steps/...` keys, against `step`); a summary with status, the last and the best test error,
and, for a run from a paper preset, the paper's value for its cell (`paper/test_error`, `paper/ci95`,
`paper/same_setting`, `paper/cell`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sam_repro.engine.checkpoint import atomic_write_bytes
from sam_repro.engine.metrics import EpochTotals, reduce_sums, training_metrics
from sam_repro.engine.provenance import redact
from sam_repro.engine.rundir import RunFiles
from sam_repro.paper import paper_value_of_preset, run_group

log = logging.getLogger("sam_repro")


def _group(cfg: DictConfig) -> str:
    """The table cell a run belongs to: what SGD and SAM runs that should be compared have in common."""
    return run_group(OmegaConf.to_container(cfg, resolve=True))


def paper_summary(cfg: DictConfig) -> dict:
    """The paper's published test error and 95% interval for the cell of the preset the run started from, flat
    keys for the W&B summary and summary.json; {} for a run from no paper preset. `paper/same_setting` is false
    when the run deviates from the preset (fewer epochs, a subset, another model or lr): then the number is the
    target, not a like-for-like comparison."""
    found = paper_value_of_preset(OmegaConf.to_container(cfg, resolve=True))
    if found is None:
        return {}
    out = {"paper/test_error": found.error, "paper/same_setting": found.same_setting, "paper/cell": found.preset}
    if found.value.half_width is not None:
        out["paper/ci95"] = found.value.half_width
    return out


STEP_PREFIX = "steps/"  # W&B keys of the per-step rows (steps.jsonl has them bare), plotted against `step`
SUMMARY_KEYS = (
    "status",
    "stopped_early",
    "test_error",
    "best_test_error",
    "test_error_top5",
    "epochs",
    "wall_time_s",
    "memorized",
    "flipped_true",
    "clean_train_error",
    "stall_warning",
    "passes",
    "passes_per_step",
)


def _read_rows(path: Path, keep) -> list[dict]:
    """The rows of a JSON-lines file that `keep` accepts; the file is rewritten with those only."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if keep(r)]
    if len(kept) != len(rows):
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        atomic_write_bytes(path, lambda f: f.write(text))
    return kept


@contextlib.contextmanager
def _redacted_argv():
    saved = sys.argv
    sys.argv = redact(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


class MetricsLogger:
    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        env,
        resume_epoch: int = 0,
        wandb_id: str | None = None,
        resume_step: int = 0,
    ):
        self.cfg, self.run_dir, self.enabled = cfg, run_dir, env.is_main
        self.path, self.steps_path = RunFiles(run_dir).metrics, RunFiles(run_dir).steps
        self.rows: list[dict] = []
        self.step_rows: list[dict] = []
        self.wandb_run = None
        self.wandb_id = wandb_id
        self._defined: set[str] = set()
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Keep what the checkpoint covers; a line written after the last checkpoint is redone.
        if self.path.exists():
            self.rows = _read_rows(self.path, lambda r: r.get("epoch", 0) <= resume_epoch)
        if self.steps_path.exists():
            self.step_rows = _read_rows(self.steps_path, lambda r: r.get("step", 0) <= resume_step)
        self._start_wandb()

    # ---- W&B ------------------------------------------------------------------------------------------------
    def _start_wandb(self) -> None:
        lcfg = self.cfg.logger
        if lcfg.get("name") != "wandb" or lcfg.get("mode", "disabled") == "disabled":
            return
        try:
            import wandb

            online = lcfg.mode == "online"
            # Online runs resume under the same id across requeues; offline runs cannot be resumed by W&B, so a
            # requeued offline job starts a new run in the same group.
            run_id = self.wandb_id if (online and self.wandb_id) else uuid.uuid4().hex[:8]
            with _redacted_argv():  # W&B records the command line in the run's metadata
                self.wandb_run = self._init_wandb(wandb, lcfg, online, run_id)
            self.wandb_id = run_id
            self._define_metrics()
            self.wandb_run.summary.update(paper_summary(self.cfg))
            if not online:  # a new offline run after a requeue: replay the history it would miss, in step order
                history = [(r["step"], 0, self._step_row(r)) for r in self.step_rows]
                history += [(r.get("step", 0), 1, r) for r in self.rows]
                for _, _, row in sorted(history, key=lambda h: h[:2]):
                    self._log_epoch_keys(row)
                    self.wandb_run.log(row)
        except Exception as exc:  # noqa: BLE001 -- W&B must never stop training
            log.warning(
                "W&B could not start (%s: %s); training goes on, metrics are in %s",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                self.path,
            )
            self.wandb_run = None

    def _define_metrics(self) -> None:
        """The x-axes and summaries: epoch rows against `epoch`, step rows against `step`; the runs table's test
        error as the last and the lowest (finish() then writes both as plain numbers)."""
        run = self.wandb_run
        run.define_metric("epoch")
        run.define_metric("step")
        run.define_metric(STEP_PREFIX + "*", step_metric="step")
        run.define_metric("test_error", step_metric="epoch", summary="last,min")
        self._defined |= {"epoch", "step", "test_error"}

    def _log_epoch_keys(self, row: dict) -> None:
        """Each epoch key plotted against `epoch` (named one by one: a `*` glob would also catch the step keys)."""
        for key in row:
            if key not in self._defined and not key.startswith(STEP_PREFIX):
                self.wandb_run.define_metric(key, step_metric="epoch")
                self._defined.add(key)

    @staticmethod
    def _step_row(row: dict) -> dict:
        return {"step": row["step"], **{STEP_PREFIX + k: v for k, v in row.items() if k != "step"}}

    def _init_wandb(self, wandb, lcfg, online: bool, run_id: str):
        return wandb.init(
            project=lcfg.project,
            entity=lcfg.get("entity"),
            group=_group(self.cfg),
            job_type=str(self.cfg.optimizer.name),
            tags=self._tags(),
            name=self._name(),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow" if online else None,
            mode=lcfg.mode,
            config=redact(OmegaConf.to_container(self.cfg, resolve=True)),
            settings=wandb.Settings(init_timeout=float(lcfg.get("init_timeout", 30)), silent=True),
        )

    def _tags(self) -> list[str]:
        c = self.cfg
        tags = [
            f"dataset:{c.dataset.name}",
            f"model:{c.model.name}",
            f"augment:{c.augment.name}",
            f"optimizer:{c.optimizer.name}",
        ]
        return tags + [str(t) for t in (c.logger.get("tags") or [])]

    def _name(self) -> str:
        opt = self.cfg.optimizer
        schedule = "".join(  # the SAM schedule where it is not the paper's every step (optim/sam_schedule.py)
            f"-{tag}{value:g}"
            for tag, key, default in (("start", "sam_start", 0), ("every", "sam_every", 1), ("p", "sam_probability", 1))
            if (value := opt.get(key, default)) != default
        )
        return f"{opt.name}{schedule}-{self.cfg.model.name}-{self.cfg.dataset.name}-seed{self.cfg.seed}"

    # ---- per epoch / end ---------------------------------------------------------------------------------------
    def log_epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}", f"train err {row['train_error']:.2f}%"]
        if "test_error" in row:
            parts.append(f"test err {row['test_error']:.2f}%")
        if "val_error" in row:
            parts.append(f"val err {row['val_error']:.2f}%")
        if "memorized" in row:
            parts.append(f"memorized {row['memorized']:.1f}%")
        if "sharpness" in row:
            parts.append(f"sharpness {row['sharpness']:.4f}")
        parts.append(f"{row['images_per_second']:.0f} img/s")
        log.info(" | ".join(parts))
        self._log_wandb(row, epoch_row=True)

    def log_step(self, row: dict) -> None:
        """One per-step row (`step`, training loss and error over the interval, lr, SAM's norms and sharpness,
        images/s): to steps.jsonl and W&B, never to metrics.jsonl."""
        if not self.enabled:
            return
        self.step_rows.append(row)
        with open(self.steps_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._log_wandb(self._step_row(row), epoch_row=False)

    def _log_wandb(self, row: dict, epoch_row: bool) -> None:
        if self.wandb_run is None:
            return
        try:
            if epoch_row:
                self._log_epoch_keys(row)
            self.wandb_run.log(row)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B log failed (%s); continuing with local metrics only", exc)
            self.wandb_run = None

    def warn(self, message: str) -> None:
        """One warning line in the log, and in the W&B run's summary (`warning`) where W&B is on."""
        if not self.enabled:
            return
        log.warning(message)
        if self.wandb_run is not None:
            with contextlib.suppress(Exception):
                self.wandb_run.summary["warning"] = message

    def last_evaluated(self) -> dict | None:
        """The last epoch's metrics that include a test evaluation."""
        return next((r for r in reversed(self.rows) if "test_error" in r), None)

    def mean_images_per_second(self) -> float | None:
        values = [r["images_per_second"] for r in self.rows if "images_per_second" in r]
        return sum(values) / len(values) if values else None

    def finish(self, summary: dict) -> None:
        """Always called (also on failure), so one failed job of a multirun never poisons the next."""
        if self.wandb_run is None:
            return
        try:
            for key in (*SUMMARY_KEYS, *(k for k in summary if k.startswith("paper/"))):
                if key not in summary:
                    continue
                self.wandb_run.summary[key] = summary.get(key)
            self.wandb_run.finish(exit_code=0 if summary.get("status") in ("finished", "stopped") else 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed (%s)", exc)
        self.wandb_run = None


class StallWatch:
    """Says once when SAM trains at the chance plateau: the training loss within `tolerance` (relative) of ln(C),
    a uniform prediction's loss over C classes, for `epochs` epochs in a row in which SAM steps were taken.

    Near such a plateau (or a saddle) SAM's perturbed gradient can vanish while the plain one does not, and the run
    may never leave it (Kim et al., arXiv 2301.06308; Park et al., arXiv 2509.21818). The default of 10 epochs is
    longer than any run that recovered in results/cpu_scale_table4 (at most 9 epochs within 2% of ln 10, at 60%
    label noise, where the reachable loss is itself close to chance) and as long as the shortest stall there
    (10 epochs, the demo setting's seed 2). It only warns: training goes on unchanged."""

    def __init__(self, num_classes: int, epochs: int, tolerance: float = 0.02) -> None:
        self.chance = math.log(num_classes) if num_classes > 1 else 0.0
        self.epochs, self.tolerance = int(epochs), tolerance
        self.streak = 0
        self.said = False

    def update(self, epoch: int, train_loss: float, sam_active: bool) -> str | None:
        """The warning, the first time the streak reaches `epochs`; None otherwise."""
        if self.said or not self.epochs or not self.chance:
            return None
        at_chance = sam_active and abs(train_loss - self.chance) <= self.tolerance * self.chance
        self.streak = self.streak + 1 if at_chance else 0
        if self.streak < self.epochs:
            return None
        self.said = True
        return (
            f"SAM stall: the training loss has stayed within {100 * self.tolerance:g}% of chance (ln C = "
            f"{self.chance:.3f}) for {self.streak} epochs (to epoch {epoch}); the run may not leave this plateau. "
            "Start SAM after a few plain epochs (optimizer.sam_start) or warm up the learning rate "
            "(schedule.warmup_epochs); docs/sam.md, 'SAM's start'."
        )


class StepCurves:
    """The per-step rows: every `logger.log_every_steps` optimizer steps, the training loss and error over the
    steps since the last row, the learning rate, SAM's ||g||, ||eps|| and sharpness, and images/s.

    The interval's sums are differences of the epoch's device-side running sums (`totals.sums()`), so nothing is
    read from the device between log points; at one, every rank sums them over ranks (one all-reduce, one copy to
    the host). An interval that spans an epoch's end carries the old epoch's remainder, still on the device."""

    def __init__(self, cfg: DictConfig, env, metrics: MetricsLogger, steps_per_epoch: int) -> None:
        self.every = int(cfg.logger.get("log_every_steps", 50))
        self.env, self.metrics, self.steps_per_epoch = env, metrics, steps_per_epoch
        self.carry = None  # (device sums, host [count, steps, seconds]) of the epochs before, since the last row
        self.mark = None  # the same, of this epoch's totals at the interval's start

    @staticmethod
    def _read(totals: EpochTotals) -> tuple:
        return totals.sums(), [totals.count, totals.steps, totals.seconds()]

    def start_epoch(self, totals: EpochTotals) -> None:
        self.mark = self._read(totals)  # (a resumed epoch's totals start from the checkpoint's sums)

    def end_epoch(self, totals: EpochTotals) -> None:
        self.carry = self._since_mark(self._read(totals))

    def _since_mark(self, now: tuple) -> tuple:
        """The sums from the interval's start to `now` (device sums, host [count, steps, seconds])."""
        (sums, host), (mark_sums, mark_host) = now, self.mark
        sums, host = sums - mark_sums, [a - b for a, b in zip(host, mark_host)]
        if self.carry is not None:
            sums, host = sums + self.carry[0], [a + b for a, b in zip(host, self.carry[1])]
        return sums, host

    def update(self, step: int, totals: EpochTotals, optimizer) -> None:
        if step % self.every:
            return
        now = self._read(totals)
        sums, (count, steps, seconds) = self._since_mark(now)
        self.mark, self.carry = now, None
        interval = reduce_sums(sums, count, steps)  # every rank: the same step, one collective
        train = training_metrics(interval, totals.sam)
        row = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "train_loss": train.pop("train_loss"),
            "train_error": train.pop("train_error"),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "images_per_second": interval.count / max(seconds, 1e-9),
            **train,  # SAM's, after the learning rate and images/s
        }
        self.metrics.log_step(row)


PROGRESS_MODES = ("auto", "bar", "log", "off")


def progress_mode(mode: str) -> str:
    """The one rule of `auto`, in every CLI: bars on a terminal, plain lines otherwise (a log file, a pipe, a SLURM
    job's output). `bar`, `log` and `off` are returned as they are."""
    if mode == "auto":
        return "bar" if sys.stderr.isatty() and not os.environ.get("SLURM_JOB_ID") else "log"
    return mode


class Progress:
    """A tqdm bar per epoch on a terminal (loss, error, img/s), plain log lines every `trainer.log_every` steps
    otherwise. Reads the device-side running sums only every few steps."""

    REFRESH = 10

    def __init__(self, cfg: DictConfig, env, epoch: int, epochs: int, steps: int, start: int = 0) -> None:
        mode = progress_mode(cfg.trainer.progress)
        self.mode = mode if env.is_main else "off"
        self.epoch, self.epochs, self.steps, self.done = epoch, epochs, steps, start
        self.log_every = max(1, int(cfg.trainer.log_every))
        self.t0, self.n0 = time.time(), 0
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)

    def update(self, totals: EpochTotals, optimizer) -> None:
        self.done += 1
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.done % self.REFRESH == 0 or self.done == self.steps:
                self.bar.set_postfix(self._stats(totals), refresh=False)
        elif self.mode == "log" and (self.done % self.log_every == 0):
            s = self._stats(totals)
            log.info(
                "epoch %d/%d step %d/%d | loss %s | err %s | lr %.4g | %s img/s",
                self.epoch,
                self.epochs,
                self.done,
                self.steps,
                s["loss"],
                s["err"],
                optimizer.param_groups[0]["lr"],
                s["img/s"],
            )

    def _stats(self, totals: EpochTotals) -> dict:
        metrics = training_metrics(totals.local(), sam=False)  # this rank's loss and error (one device read)
        rate = totals.count / max(totals.seconds(), 1e-9)
        return {
            "loss": f"{metrics['train_loss']:.4f}",
            "err": f"{metrics['train_error']:.2f}%",
            "img/s": f"{rate:.0f}",
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
