"""The training loop, top to bottom. `_train` is the driver and reads like the run: `_setup` (data, model,
optimizer, schedule, step context), `_resume` (the checkpoint's weights, counters and RNG, or a fresh start),
`_open_outputs` (loggers, config.yaml, summary.json, the stop signal), then per epoch `_train_epoch` (the steps),
`_evaluate_and_log` and `_checkpoint`, and `_finish` (the final summary). Each piece takes the run's state, one
`_Run`, explicitly. One SAM step is `step.sam_step` (`_train_epoch` calls it, or `sgd_step` or `looksam_step`, as
`run.take_step`); everything here is plumbing around it. An epoch's running sums, and the training metrics made
of them, are `metrics.EpochTotals`.

Outputs in the run directory (the current working directory's `run_dir` argument):
  config.yaml (atomic), metrics.jsonl (one line per epoch), steps.jsonl (one line every logger.log_every_steps
  steps), summary.json (status, errors, provenance, the paper's value for a preset's cell), checkpoints/last.pt
  (atomic, every epoch and on a stop signal), train.log, wandb/ (offline runs).
Only rank 0 writes; every rank computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sam_repro.data import Data, build_data
from sam_repro.engine import backends
from sam_repro.engine.checkpoint import atomic_write_json, load_checkpoint, remove_stale_temporaries, save_checkpoint
from sam_repro.engine.distributed import (
    DistEnv,
    all_reduce_mean_,
    barrier,
    cleanup_distributed,
    explain_lost_rank,
    init_distributed,
    note_step,
)
from sam_repro.engine.evaluation import MEMORIZATION_KEYS, evaluate, memorization
from sam_repro.engine.faults import Faults, read_faults
from sam_repro.engine.loggers import MetricsLogger, Progress, StallWatch, StepCurves, paper_summary
from sam_repro.engine.metrics import EpochTotals, NonFiniteLoss
from sam_repro.engine.preemption import StopSignal, holding, requeue_after_lost_rank
from sam_repro.engine.provenance import provenance
from sam_repro.engine.rundir import RunFiles
from sam_repro.engine.step import StepContext, step_function
from sam_repro.errors import CheckpointError, SamReproError
from sam_repro.files import atomic_write_text
from sam_repro.models import convert_sync_batchnorm
from sam_repro.optim.factory import build_optimizer, build_sam_schedule, build_schedule

log = logging.getLogger("sam_repro")


def _set_threads(cfg: DictConfig) -> None:
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def average_bn_stats(model: torch.nn.Module, env: DistEnv) -> None:
    """Per-device BatchNorm running statistics averaged over ranks (the official code pmean-s them at eval)."""
    if not env.distributed:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            all_reduce_mean_(m.running_mean)
            all_reduce_mean_(m.running_var)


def train(cfg: DictConfig, run_dir: Path, forced: list[dict] | None = None) -> dict:
    """Train (or resume, or report) the run described by `cfg` in `run_dir`; returns the summary. `forced` lists
    the configuration changes a `trainer.resume=force` start accepted (recorded in summary.json)."""
    # Numerics first: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA work starts (init_distributed binds the GPU).
    backends.configure(deterministic=bool(cfg.trainer.deterministic), tf32=bool(cfg.trainer.get("tf32", False)))
    backends.keep_freed_memory()  # no page faults for what the last step freed (engine/backends.py)
    env = init_distributed(cfg.trainer.device, timeout_s=float(cfg.trainer.get("dist_timeout_s", 600)))
    try:
        summary = _train(cfg, Path(run_dir), env, forced or [])
        barrier()  # leave together: tearing down gloo while a peer still talks aborts the process
        return summary
    except SamReproError:
        raise
    except (RuntimeError, torch.distributed.DistError) as exc:
        # A collective that failed because another rank died or stopped answering: one line naming that rank, and
        # exit status 75, so that torchrun --max-restarts or a requeue brings the run back from its checkpoint.
        with holding():  # the launcher's SIGTERM must not cut the line off
            lost = explain_lost_rank(exc) if env.distributed else None
            if lost is None:
                raise
            log.error("error: %s", lost)
            lost.reported = True
            requeue_after_lost_rank(env, lost)  # under srun (submitit): the job comes back and resumes
        raise lost from None
    finally:
        cleanup_distributed()


@dataclass
class _Run:
    """One run's state, passed explicitly to each piece of the loop. Built by `_setup`; the counters are set by
    `_resume` and advanced by the loop; the outputs are opened by `_open_outputs`; `status` and `reason` are the
    outcome `_finish` records (summary.json says "running" until then)."""

    cfg: DictConfig
    run_dir: Path
    env: DistEnv
    start_time: float  # this start's, for the wall time (with the time before it, `wall_before`)
    data: Data  # the loaders: train (resumable), test, and val and noise_probe (or None)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
    autocast: Callable[[], contextlib.AbstractContextManager]
    ctx: StepContext
    take_step: Callable  # step.sam_step, or sgd_step or looksam_step (or ScheduledStep): the one optimizer step
    stall: StallWatch  # warns once when SAM sits at the chance plateau
    epochs: int
    steps_per_epoch: int
    per_rank: int
    train_model: torch.nn.Module | None = None  # the model the steps call: `model`, compiled with trainer.compile
    faults: Faults = Faults()  # test-only fault injection (SAM_REPRO_FAULT, engine/faults.py): none by default
    # Counters: where the run stands (the checkpoint's, on resume).
    epoch: int = 0
    step: int = 0
    best: float = math.inf
    wall_before: float = 0.0
    passes: int | None = 0  # forward-backward passes over a batch so far (None: resumed from a run that did not count)
    resumed_totals: list[dict] | dict | None = None  # a mid-epoch checkpoint's running sums: the first epoch's only
    wandb_id: str | None = None  # the resumed run's W&B id
    # Outputs, from `_open_outputs`.
    metrics: MetricsLogger = field(init=False)
    curves: StepCurves = field(init=False)
    stop: StopSignal = field(init=False)
    summary: dict = field(init=False)
    # Outcome.
    status: str = "finished"
    reason: str | None = None

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.run_dir)

    @property
    def summary_path(self) -> Path:
        return self.files.summary

    @property
    def ckpt_path(self) -> Path:
        return self.files.checkpoint

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.start_time


STOPPED = "stopped"  # the status of a run that trainer.max_steps stopped short of its schedule


def stopped_reason(max_steps: int, step: int, planned: int) -> str:
    return f"stopped at trainer.max_steps={max_steps}: step {step} of the schedule's {planned}"


def _train(cfg: DictConfig, run_dir: Path, env: DistEnv, forced: list[dict]) -> dict:
    start_time = time.time()
    previous = _previous_summary(RunFiles(run_dir).summary, env, forced)
    if previous.get("status") == "finished":
        log.info(
            "run already finished: %s (test error %.2f%%); delete the directory to train again",
            run_dir,
            previous["test_error"],
        )
        return previous
    if previous.get("status") == STOPPED:  # its checkpoint ends at trainer.max_steps: nothing to train here
        log.info("run already stopped: %s (%s); nothing trained", run_dir, previous.get("reason") or STOPPED)
        return previous

    run = _setup(cfg, run_dir, env, start_time)
    _resume(run)
    note_step(run.step)
    _open_outputs(run, previous)
    try:
        while run.epoch < run.epochs:
            totals, stopped, capped = _train_epoch(run)
            if stopped:  # a stop signal: checkpoint mid-epoch, with the epoch's running sums, and leave
                run.status, run.reason = "interrupted", f"stopped by {run.stop.signal_name} at step {run.step}"
                _checkpoint(run, totals)
                break
            run.epoch += 1
            run.data.train.set_epoch(run.epoch)
            _evaluate_and_log(run, totals, capped)
            _checkpoint(run)
            if capped:
                planned = run.epochs * run.steps_per_epoch
                run.summary["stopped_early"] = run.step < planned  # short of its schedule
                if run.step < planned:  # not "finished": never averaged, never reported as a whole run
                    run.status = STOPPED
                    run.reason = stopped_reason(run.cfg.trainer.max_steps, run.step, planned)
                break
    except NonFiniteLoss as exc:
        run.status, run.reason = "failed", str(exc)
        log.error("%s; the last good checkpoint is kept at %s", exc, run.ckpt_path)
    except BaseException as exc:
        run.status, run.reason = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _finish(run)
    if run.status == "interrupted":
        run.stop.finish()  # exits so the scheduler can requeue; never returns under SLURM
    if run.status == "failed":
        raise NonFiniteLoss(run.reason)
    return run.summary


# --------------------------------------------------------------------------------------------------------------
# The pieces of the loop, in the order `_train` calls them


def _previous_summary(summary_path: Path, env: DistEnv, forced: list[dict]) -> dict:
    """The run's summary.json so far, with this start's accepted configuration changes (`trainer.resume=force`)
    added to its record."""
    previous = _read_summary(summary_path)
    if forced:  # trainer.resume=force accepted these changes: keep every such start on record
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": forced}
        previous["resume_forced"] = [*previous.get("resume_forced", []), entry]
        if env.is_main and summary_path.exists():
            atomic_write_json(summary_path, previous)
    return previous


def _setup(cfg: DictConfig, run_dir: Path, env: DistEnv, start_time: float) -> _Run:
    """Seed, and build the data, model, optimizer, schedule and step context. `cfg` was checked where the run was
    started (`sam-train`: `sam_repro.train.checked_config`; in-process callers: `engine.config.validate`)."""
    faults = read_faults(env.world_size)
    if faults and env.is_main:
        log.warning("SAM_REPRO_FAULT (a test hook): %s", faults.describe())
    _set_threads(cfg)
    device = env.device
    torch.manual_seed(cfg.seed)

    data = build_data(cfg, device, env.rank, env.world_size)
    model = _build_model(cfg, device)
    optimizer = build_optimizer(cfg.optimizer, model)
    epochs = max(1, int(math.ceil(cfg.trainer.epochs * cfg.trainer.epoch_scale)))
    steps_per_epoch = len(data.train)
    scheduler = build_schedule(cfg.schedule, optimizer, epochs * steps_per_epoch, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if cfg.trainer.precision == "fp16" else None
    autocast = _autocast(cfg.trainer.precision, device)

    per_rank = cfg.trainer.batch_size // env.world_size
    group_size = int(cfg.trainer.m or per_rank // cfg.trainer.accumulate)
    ctx = StepContext(
        group_size=group_size,
        label_smoothing=float(cfg.trainer.label_smoothing),
        grad_clip=cfg.trainer.grad_clip,
        autocast=autocast,
        scaler=scaler,
        seed=int(cfg.seed),  # dropout/shake noise keyed by (seed, step, global group): each virtual device its own
        first_group=env.rank * (per_rank // group_size),
        micro_batch=per_rank // cfg.trainer.accumulate,  # examples per forward-backward (memory); m stays the group
    )
    # SAM, ASAM, LookSAM on the SAM steps of optimizer.sam_start / sam_every / sam_probability, plain steps between
    take_step = step_function(cfg.optimizer.name, build_sam_schedule(cfg.optimizer, steps_per_epoch, cfg.seed))
    stall = StallWatch(int(cfg.dataset.num_classes), int(cfg.trainer.get("stall_epochs", 10)))
    return _Run(
        cfg=cfg,
        run_dir=run_dir,
        env=env,
        start_time=start_time,
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        autocast=autocast,
        ctx=ctx,
        take_step=take_step,
        stall=stall,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        per_rank=per_rank,
        faults=faults,
    )


def _resume(run: _Run) -> None:
    """Continue from the run's checkpoint (weights, optimizer, schedule, loader position, counters, RNG), or start
    afresh; then every rank takes rank 0's weights, and `run.train_model` is set (compiled with trainer.compile)."""
    state = _load_resume_state(run.cfg, run.ckpt_path)
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.data.train.load_state_dict(state["loader"])
        run.epoch, run.step, run.best = state["epoch"], state["step"], state.get("best_test_error", math.inf)
        run.wall_before = state.get("wall_time_s", 0.0)
        run.passes = state.get("passes")
        run.resumed_totals = state.get("epoch_totals")
        run.wandb_id = state.get("wandb_id")
        env = run.env
        rng = state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0]  # world size changed
        torch.set_rng_state(rng["cpu"])
        if env.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], env.device)
        log.info("resumed from %s at epoch %d, step %d", run.ckpt_path, run.epoch, run.step)
    else:
        run.data.train.set_epoch(0)

    if run.env.distributed:
        # Every rank starts from rank 0's weights. Gradients are averaged by the step (one all-reduce, after the
        # per-device perturbations); BatchNorm statistics stay per device and are averaged before eval/checkpoints.
        for tensor in run.model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    run.train_model = torch.compile(run.model) if run.cfg.trainer.compile else run.model


def _open_outputs(run: _Run, previous: dict) -> None:
    """The loggers, the summary so far, config.yaml and summary.json (rank 0), the stop signal, the set-up line."""
    cfg, env = run.cfg, run.env
    run.metrics = MetricsLogger(
        cfg, run.run_dir, env, resume_epoch=run.epoch, wandb_id=run.wandb_id, resume_step=run.step
    )
    run.curves = StepCurves(cfg, env, run.metrics, run.steps_per_epoch)
    run.summary = {
        "status": "running",
        "reason": None,
        "epochs": run.epoch,
        "label_noise": run.data.info.get("label_noise"),
        "num_train": run.data.num_train,
        **paper_summary(cfg),
        "provenance": provenance(),
    }
    if previous.get("resume_forced"):
        run.summary["resume_forced"] = previous["resume_forced"]
    if env.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.files.config, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(run.summary_path, run.summary)
    run.stop = StopSignal(env)
    log.info(
        "%s | %s on %s (%d train examples), %d epochs x %d steps, batch %d (per rank %d, groups of %d), "
        "%d rank(s) on %s",
        cfg.optimizer.name,
        cfg.model.name,
        cfg.dataset.name,
        run.data.num_train,
        run.epochs,
        run.steps_per_epoch,
        cfg.trainer.batch_size,
        run.per_rank,
        run.ctx.group_size,
        env.world_size,
        env.device,
    )


def _train_epoch(run: _Run) -> tuple[EpochTotals, bool, bool]:
    """The steps of one epoch (the rest of it, when resumed mid-epoch): its running sums, and whether a stop
    signal (`stopped`) or trainer.max_steps (`capped`) ended it early."""
    cfg, env = run.cfg, run.env
    run.train_model.train()
    totals = EpochTotals(env.device, _rank_totals(run.resumed_totals, env))
    run.resumed_totals = None  # partial-epoch totals apply to the first (resumed) epoch only
    progress = Progress(cfg, env, run.epoch + 1, run.epochs, run.steps_per_epoch, start=run.data.train.position)
    run.curves.start_epoch(totals)
    stopped = capped = False
    for x, y in run.data.train:
        run.ctx.step = run.step
        stats = run.take_step(run.train_model, run.optimizer, x, y, run.ctx)  # step.sam_step (or sgd/looksam)
        run.scheduler.step()
        run.step += 1
        if run.passes is not None:
            run.passes += stats.passes
        note_step(run.step)  # what another rank's explain_lost_rank compares with, should this one stall
        if run.faults.nonfinite(run.step, env.rank):  # fault tests only (SAM_REPRO_FAULT)
            stats.loss_sum = stats.loss_sum + float("nan")
        totals.add(stats)
        progress.update(totals, run.optimizer)
        run.curves.update(run.step, totals, run.optimizer)  # a W&B / steps.jsonl row every logger.log_every_steps
        if run.step % cfg.trainer.log_every == 0:
            totals.check_finite(run.step)  # every rank: summed over ranks, so all stop at this step
        stopped = run.stop.should_stop()  # every rank calls it every step: they agree on where to stop
        capped = bool(cfg.trainer.max_steps) and run.step >= cfg.trainer.max_steps
        if stopped or capped:
            break
    progress.close()
    run.curves.end_epoch(totals)
    totals.check_finite(run.step)
    return totals, stopped, capped


def _evaluate_and_log(run: _Run, totals: EpochTotals, capped: bool) -> None:
    """The finished epoch's row of metrics.jsonl: its training metrics and, every trainer.eval_every epochs (and
    after the last, or a capped one), the test (and validation, and memorization) metrics."""
    env, data = run.env, run.data
    average_bn_stats(run.model, env)
    row = {
        "epoch": run.epoch,
        "step": run.step,
        **totals.metrics(),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_second": totals.images_per_second(env),
        "epoch_time_s": totals.seconds(),
    }
    if run.passes is not None:
        row["passes"] = run.passes  # forward-backward passes over a batch since the start: 1 per plain step, 2 per SAM
    if run.epoch % run.cfg.trainer.eval_every == 0 or run.epoch == run.epochs or capped:
        test = evaluate(run.model, data.test, env, run.autocast)
        row.update({"test_loss": test["loss"], "test_error": test["error"], "test_error_top5": test["error_top5"]})
        run.best = min(run.best, row["test_error"])
        if data.val is not None:
            val = evaluate(run.model, data.val, env, run.autocast)
            row.update({"val_loss": val["loss"], "val_error": val["error"]})
        if data.noise_probe is not None:
            row.update(memorization(run.model, data.noise_probe, env, run.autocast))
    run.metrics.log_epoch(row)
    stall = run.stall.update(run.epoch, row["train_loss"], sam_active=totals.sam)
    if stall:
        run.metrics.warn(stall)
        run.summary["stall_warning"] = stall


def _checkpoint(run: _Run, partial_epoch: EpochTotals | None = None) -> None:
    """checkpoints/last.pt (rank 0, atomically): everything a resume needs. `partial_epoch`: a mid-epoch stop's
    running sums, every rank's own (an epoch's training metrics are summed over ranks only at its end)."""
    env = run.env
    average_bn_stats(run.model, env)
    rngs = _gather_rng(env, env.device)
    totals = _gather(env, partial_epoch.state_dict()) if partial_epoch else None
    if env.is_main:
        save_checkpoint(
            run.ckpt_path,
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler else None,
                "loader": run.data.train.state_dict(),
                "rng": rngs,
                "epoch": run.epoch,
                "step": run.step,
                "best_test_error": run.best,
                "wall_time_s": run.wall_time(),
                "passes": run.passes,
                "config": OmegaConf.to_container(run.cfg, resolve=True),
                "wandb_id": run.metrics.wandb_id,
                "epoch_totals": totals,
            },
        )


def _finish(run: _Run) -> None:
    """The final summary.json (rank 0) and the loggers' end, whatever ended the run; the signal handlers are put
    back unless a stop signal still has to exit (`StopSignal.finish`, which needs them)."""
    run.summary = _finish_summary(
        run.summary, run.status, run.reason, run.epoch, run.best, run.metrics, run.wall_time()
    )
    if run.passes is not None and run.step:
        run.summary.update({"passes": run.passes, "passes_per_step": run.passes / run.step})
    if run.env.is_main:
        try:
            atomic_write_json(run.summary_path, run.summary)
        except OSError as exc:  # e.g. the full disk that failed the checkpoint: keep its error the one reported
            log.warning("could not write %s (%s)", run.summary_path, exc.strerror or exc)
    run.metrics.finish(run.summary)
    if run.status != "interrupted":
        run.stop.restore()  # (finish() needs the previous handlers: it may chain to submitit's)


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _read_summary(path: Path) -> dict:
    """The run's summary.json so far ({} for a new run). A damaged one is rewritten at this start (the checkpoint
    and metrics.jsonl hold the run's state), with a warning."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        log.warning("%s is damaged (%s); it is rewritten from this start on", path, exc)
        return {}


def _build_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    from hydra.utils import instantiate

    model = instantiate(cfg.model).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.trainer.sync_bn:
        model = convert_sync_batchnorm(model)  # timm's norm + activation layers keep their activation
    return model


def _load_resume_state(cfg: DictConfig, path: Path) -> dict | None:
    """The checkpoint to resume from, on the CPU (load_state_dict moves tensors to the model's device; RNG states
    must stay CPU tensors), or None for a fresh start."""
    remove_stale_temporaries(path)  # left by a writer killed mid-write; the renamed checkpoint is intact
    if not path.exists():
        return None
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        if cfg.trainer.on_corrupt_checkpoint == "restart":
            log.warning("%s -- starting from scratch (trainer.on_corrupt_checkpoint=restart)", exc)
            return None
        raise


def _gather(env: DistEnv, mine: object) -> list:
    """Every rank's `mine`, on every rank (a list indexed by rank)."""
    if not env.distributed:
        return [mine]
    gathered: list = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _gather_rng(env: DistEnv, device: torch.device) -> list[dict]:
    """Every rank's RNG state (a list indexed by rank)."""
    return _gather(
        env, {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    )


def _rank_totals(saved: list[dict] | dict | None, env: DistEnv) -> dict | None:
    """This rank's running sums from a mid-epoch checkpoint, which holds one entry per rank (older ones: rank 0's
    only). Under another world size rank 0 takes them all: the epoch's metrics are sums over ranks."""
    if saved is None:
        return None
    saved = [saved] if isinstance(saved, dict) else saved
    if len(saved) == env.world_size:
        return saved[env.rank]
    if not env.is_main:
        return None
    return EpochTotals.merge(saved)


def _finish_summary(
    summary: dict, status: str, reason: str | None, epoch: int, best: float, metrics: MetricsLogger, wall: float
) -> dict:
    final = metrics.last_evaluated()
    summary = dict(summary)
    summary.update(
        {
            "status": status,
            "reason": reason,
            "epochs": epoch,
            "wall_time_s": wall,
            "test_error": final.get("test_error") if final else None,
            "test_error_top5": final.get("test_error_top5") if final else None,
            "best_test_error": best if math.isfinite(best) else None,
            "images_per_second": metrics.mean_images_per_second(),
        }
    )
    for key in ("val_error", *MEMORIZATION_KEYS):
        if final and key in final:
            summary[key] = final[key]
    return summary
