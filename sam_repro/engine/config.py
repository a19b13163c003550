"""Checks of the composed config before any work starts: one ConfigError naming the key, no traceback."""

from __future__ import annotations

from omegaconf import DictConfig

from sam_repro.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig, env) -> None:
    tr, opt, ds = cfg.trainer, cfg.optimizer, cfg.dataset
    _require(tr.epochs >= 1, f"trainer.epochs must be >= 1 (got {tr.epochs})")
    _require(tr.epoch_scale > 0, f"trainer.epoch_scale must be > 0 (got {tr.epoch_scale})")
    _require(tr.batch_size > 0, f"trainer.batch_size must be positive (got {tr.batch_size})")
    _require(tr.eval_batch_size > 0, f"trainer.eval_batch_size must be positive (got {tr.eval_batch_size})")
    _require(tr.eval_every >= 1, f"trainer.eval_every must be >= 1 (got {tr.eval_every})")
    _require(tr.max_steps is None or tr.max_steps > 0, f"trainer.max_steps must be positive or null (got {tr.max_steps})")
    _require(tr.accumulate >= 1, f"trainer.accumulate must be >= 1 (got {tr.accumulate})")
    _require(tr.precision in PRECISIONS, f"trainer.precision must be one of {PRECISIONS} (got {tr.precision!r})")
    _require(tr.grad_clip is None or tr.grad_clip > 0, f"trainer.grad_clip must be positive or null (got {tr.grad_clip})")
    _require(0.0 <= tr.label_smoothing < 1.0, f"trainer.label_smoothing must be in [0, 1) (got {tr.label_smoothing})")
    _require(tr.progress in ("auto", "bar", "log", "off"), f"trainer.progress must be auto, bar, log or off (got {tr.progress!r})")
    _require(tr.on_corrupt_checkpoint in ("error", "restart"),
             f"trainer.on_corrupt_checkpoint must be error or restart (got {tr.on_corrupt_checkpoint!r})")
    _require(tr.get("resume", "auto") in ("auto", "force"),
             f"trainer.resume must be auto or force (got {tr.get('resume')!r})")
    inject = tr.get("inject_nonfinite_at_step")
    _require(inject is None or (isinstance(inject, int) and not isinstance(inject, bool) and inject >= 1),
             f"trainer.inject_nonfinite_at_step must be a positive step or null (got {inject!r})")
    _require(opt.lr > 0, f"optimizer.lr must be positive (got {opt.lr})")
    _require(opt.weight_decay >= 0, f"optimizer.weight_decay must be >= 0 (got {opt.weight_decay})")
    if "rho" in opt and opt.name != "sgd":
        _require(opt.rho >= 0, f"optimizer.rho must be >= 0 (got {opt.rho})")
    if "eta" in opt and opt.name != "sgd":
        _require(opt.eta >= 0, f"optimizer.eta must be >= 0 (got {opt.eta})")
    _require(0.0 <= ds.label_noise < 1.0, f"dataset.label_noise must be in [0, 1) (got {ds.label_noise})")
    _require(ds.train_subset is None or ds.train_subset > 0,
             f"dataset.train_subset must be positive or null (got {ds.train_subset})")
    world = env.world_size
    _require(tr.batch_size % world == 0,
             f"trainer.batch_size ({tr.batch_size}) must divide evenly over {world} ranks")
    per_rank = tr.batch_size // world
    _require(per_rank % tr.accumulate == 0,
             f"trainer.accumulate ({tr.accumulate}) must divide the per-rank batch ({per_rank})")
    micro = per_rank // tr.accumulate
    if tr.m is not None:
        _require(tr.m > 0 and micro % tr.m == 0,
                 f"trainer.m ({tr.m}) must divide the per-rank micro-batch (batch_size / ranks / accumulate = {micro})")
    if tr.sync_bn:
        _require(env.device.type == "cuda", "trainer.sync_bn=true needs GPUs (PyTorch's SyncBatchNorm refuses CPU "
                                            "tensors); on CPU keep the default per-device statistics")
        _require(tr.m is None or tr.m == micro, "trainer.sync_bn=true cannot be combined with trainer.m groups "
                                                "smaller than the per-rank batch")
