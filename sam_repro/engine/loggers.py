"""Where metrics go: `metrics.jsonl` in the run directory (always, the source of truth for tables), Weights &
Biases (optional; offline by default; a failure to start is a warning, never fatal), and the console (a tqdm bar on
a terminal, plain log lines otherwise). Rank 0 only."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sam_repro.engine.checkpoint import atomic_write_bytes
from sam_repro.engine.provenance import redact

log = logging.getLogger("sam_repro")


def _group(cfg: DictConfig) -> str:
    """The table cell a run belongs to: what SGD and SAM runs that should be compared have in common."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    experiment = cfg.get("experiment") or "default"
    return f"{experiment}/{cfg.dataset.name}/{cfg.model.name}/{cfg.augment.name}"


@contextlib.contextmanager
def _redacted_argv():
    saved = sys.argv
    sys.argv = redact(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


class MetricsLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, env, resume_epoch: int = 0, wandb_id: str | None = None):
        self.cfg, self.run_dir, self.enabled = cfg, run_dir, env.is_main
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # Keep the epochs the checkpoint covers; a line written after the last checkpoint is redone.
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("epoch", 0) <= resume_epoch]
            text = "".join(json.dumps(r) + "\n" for r in self.rows).encode()
            atomic_write_bytes(self.path, lambda f: f.write(text))
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
            self.wandb_run.define_metric("*", step_metric="epoch")
            for row in self.rows:  # a new offline run after a requeue: replay the history it would miss
                if not online:
                    self.wandb_run.log(row)
        except Exception as exc:  # noqa: BLE001 -- W&B must never stop training
            log.warning(
                "W&B could not start (%s: %s); training goes on, metrics are in %s",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                self.path,
            )
            self.wandb_run = None

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
        return f"{self.cfg.optimizer.name}-{self.cfg.model.name}-{self.cfg.dataset.name}-seed{self.cfg.seed}"

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
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(row)
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B log failed (%s); continuing with local metrics only", exc)
                self.wandb_run = None

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
            for key in (
                "status",
                "test_error",
                "best_test_error",
                "test_error_top5",
                "epochs",
                "wall_time_s",
                "memorized",
                "flipped_true",
                "clean_train_error",
            ):
                if key not in summary:
                    continue
                self.wandb_run.summary[key] = summary.get(key)
            self.wandb_run.finish(exit_code=0 if summary.get("status") == "finished" else 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed (%s)", exc)
        self.wandb_run = None


class Progress:
    """A tqdm bar per epoch on a terminal (loss, error, img/s), plain log lines every `trainer.log_every` steps
    otherwise. Reads the device-side running sums only every few steps."""

    REFRESH = 10

    def __init__(self, cfg: DictConfig, env, epoch: int, epochs: int, steps: int, start: int = 0) -> None:
        mode = cfg.trainer.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and not os.environ.get("SLURM_JOB_ID") else "log"
        self.mode = mode if env.is_main else "off"
        self.epoch, self.epochs, self.steps, self.done = epoch, epochs, steps, start
        self.log_every = max(1, int(cfg.trainer.log_every))
        self.t0, self.n0 = time.time(), 0
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)

    def update(self, totals, optimizer) -> None:
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

    def _stats(self, totals) -> dict:
        n = max(totals.count, 1)
        rate = totals.count / max(totals.seconds(), 1e-9)
        return {
            "loss": f"{float(totals.loss) / n:.4f}",
            "err": f"{100 * (1 - float(totals.correct) / n):.2f}%",
            "img/s": f"{rate:.0f}",
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
