"""Checks of the composed config before any work starts: one ConfigError naming the key, no traceback.

A start resolves its config once and checks it once, at the edge: `sam-train` (`sam_repro.train.checked_config`)
resolves it (`resolve_config`), checks the schema (`check_schema`) and the constraints (`check_relations`), all
before it looks at the run directory, and hands the trainer the resolved config; the trainer checks nothing again.
The builders it calls (`optim.factory`, `data`) trust the values, except where a bound depends on the data (a
subset larger than the training set) or where a class is public on its own (`SAM(...)` checks its arguments).

  * `RULES`, the schema: one rule per leaf of the trainer, optimizer, schedule, dataset, augment and logger groups
    (type, range, null or not, choices). `check_schema(tree)` checks every leaf of those groups of a resolved
    config against its rule, and refuses a leaf without one (`unknown key trainer.foo`, e.g. from
    `+trainer.foo=1`) and a missing one. `validate_config(cfg)` resolves a composed config first (`resolve_config`:
    an interpolation that does not resolve, such as a preset's required value, names its key). They need nothing
    but the config.
  * `check_relations(cfg, world_size, device_type)`: the constraints between keys and with the machine
    (`trainer.m` divides the per-rank micro-batch, `trainer.sync_bn` needs GPUs, ...), on a config the schema
    accepted. `validate(cfg, env)` is both, for a composed config and a DistEnv (tests, and callers of the
    trainer other than `sam-train`).

A new key in one of the groups needs its rule in `RULES`, one line; tests/test_configs.py fails for any leaf of
any option without one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sam_repro.data.sources import DATASETS
from sam_repro.engine.distributed import DEVICE_SPECS, is_device_spec
from sam_repro.errors import ConfigError
from sam_repro.optim.factory import BASE_OPTIMIZERS, SAM_FAMILY
from sam_repro.run_keys import retired_key_message

SCHEMA_GROUPS = ("trainer", "optimizer", "schedule", "dataset", "augment", "logger")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOAUGMENT_POLICIES = ("cifar10", "svhn", "imagenet")  # torchvision's, as sam_repro.data.autoaugment.POLICIES


@dataclass(frozen=True)
class Rule:
    """What one leaf may hold. kind: int | float | bool | str | choice | floats | strings (lists of those).
    Numbers (and list items) lie within low..high, each bound closed unless `*_open`; floats are finite."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    length: int | None = None  # lists: exactly this many items
    valid: Callable[[object], bool] | None = None  # str: accepted values, described by `means`
    means: str = ""
    null: bool = False  # null is allowed
    optional: bool = False  # absent from some options of the group (optimizer.rho: the SAM family only)

    def error(self, key: str, value: object) -> str | None:
        """The one-line refusal of `value` at `key`, or None when the rule accepts it."""
        if value is None and self.null:
            return None
        expected = self._expected(value)
        if expected is None:
            return None
        return f"{key} must be {expected}{' or null' if self.null else ''} (got {show(value)})"

    def _expected(self, value: object) -> str | None:
        """What `value` should have been, or None when it is accepted."""
        kind = self.kind
        if kind == "int":
            if not _is_int(value):
                return "an integer"
            return None if self._in_range(value) else self.range()
        if kind == "float":
            if not _is_number(value):
                return "a number"
            if not math.isfinite(value):
                return "a finite number"
            return None if self._in_range(value) else self.range()
        if kind == "bool":
            return None if isinstance(value, bool) else "true or false"
        if kind == "str" and self.valid is not None:
            return None if self.valid(value) else self.means
        if kind == "str":
            return None if isinstance(value, str) else "a string"
        if kind == "choice":
            if any(_same(value, choice) for choice in self.choices):
                return None
            return "one of " + ", ".join(map(_word, self.choices))
        if kind == "floats":
            if (
                isinstance(value, list)
                and (self.length is None or len(value) == self.length)
                and all(_is_number(v) and math.isfinite(v) and self._in_range(v) for v in value)
            ):
                return None
            size = f"{self.length} " if self.length is not None else ""
            if self.low is None and self.high is None:
                return f"a list of {size}numbers"
            bounds = self.range()
            return f"a list of {size}positive numbers" if bounds == "positive" else f"a list of {size}numbers {bounds}"
        if kind == "strings":
            return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"
        raise AssertionError(f"unknown rule kind {kind!r}")

    def _in_range(self, v: float) -> bool:
        low_ok = self.low is None or (v > self.low if self.low_open else v >= self.low)
        high_ok = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return low_ok and high_ok

    def range(self) -> str:
        """`>= 1`, `positive`, `in [0, 1)`."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f"in {'(' if self.low_open else '['}{low:g}, {high:g}{')' if self.high_open else ']'}"
        if low is not None:
            return "positive" if low == 0 and self.low_open else f"{'>' if self.low_open else '>='} {low:g}"
        return f"{'<' if self.high_open else '<='} {high:g}"


def _bounds(min=None, above=None, max=None, below=None, positive=False) -> dict:
    if positive:
        above = 0
    return dict(
        low=above if above is not None else min,
        low_open=above is not None,
        high=below if below is not None else max,
        high_open=below is not None,
    )


# Rule constructors, the vocabulary of RULES. `above` / `below` are open bounds, `min` / `max` closed ones.
def integer(*, min=None, above=None, max=None, positive=False, null=False, optional=False) -> Rule:
    return Rule("int", **_bounds(min, above, max, None, positive), null=null, optional=optional)


def number(*, min=None, above=None, max=None, below=None, positive=False, null=False, optional=False) -> Rule:
    return Rule("float", **_bounds(min, above, max, below, positive), null=null, optional=optional)


def flag(*, optional=False) -> Rule:
    return Rule("bool", optional=optional)


def text(*, null=False, optional=False, valid=None, means="") -> Rule:
    return Rule("str", valid=valid, means=means, null=null, optional=optional)


def one_of(*choices, null=False, optional=False) -> Rule:
    return Rule("choice", choices=choices, null=null, optional=optional)


def numbers(*, length=None, min=None, above=None, max=None, below=None, positive=False, optional=False) -> Rule:
    return Rule("floats", **_bounds(min, above, max, below, positive), length=length, optional=optional)


def texts(*, optional=False) -> Rule:
    return Rule("strings", optional=optional)


RULES: dict[str, Rule] = {
    # ---- trainer -------------------------------------------------------------------------------------------------
    "trainer.name": text(),
    "trainer.epochs": integer(min=1),
    "trainer.epoch_scale": number(positive=True),
    "trainer.max_steps": integer(positive=True, null=True),
    "trainer.batch_size": integer(positive=True),
    "trainer.eval_batch_size": integer(positive=True),
    "trainer.eval_every": integer(min=1),
    "trainer.m": integer(positive=True, null=True),
    "trainer.accumulate": integer(min=1),
    "trainer.grad_clip": number(positive=True, null=True),
    "trainer.label_smoothing": number(min=0, below=1),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.tf32": flag(),
    "trainer.device": text(valid=is_device_spec, means=DEVICE_SPECS),
    "trainer.threads": integer(positive=True, null=True),
    "trainer.channels_last": flag(),
    "trainer.compile": flag(),
    "trainer.sync_bn": flag(),
    "trainer.deterministic": flag(),
    "trainer.progress": one_of("auto", "bar", "log", "off"),
    "trainer.log_every": integer(min=1),
    "trainer.dist_timeout_s": number(positive=True),
    "trainer.on_corrupt_checkpoint": one_of("error", "restart"),
    "trainer.resume": one_of("auto", "force"),
    "trainer.stall_epochs": integer(min=0),
    # ---- optimizer: sgd, then what the SAM family adds -----------------------------------------------------------
    "optimizer.name": one_of("sgd", *SAM_FAMILY),
    "optimizer.base": one_of(*BASE_OPTIMIZERS),
    "optimizer.lr": number(positive=True),
    "optimizer.momentum": number(min=0, below=1),
    "optimizer.nesterov": flag(),
    "optimizer.weight_decay": number(min=0),
    "optimizer.weight_decay_mode": one_of("l2", "base_optimizer"),
    "optimizer.betas": numbers(length=2, min=0, below=1, optional=True),  # optimizer.base=adamw only
    "optimizer.rho": number(min=0, optional=True),
    "optimizer.p": one_of(2, math.inf, optional=True),
    "optimizer.adaptive": flag(optional=True),
    "optimizer.eta": number(min=0, optional=True),
    "optimizer.k": integer(min=1, optional=True),  # looksam
    "optimizer.alpha": number(min=0, optional=True),  # looksam, gsam
    "optimizer.rho_max": number(min=0, optional=True),  # gsam
    "optimizer.rho_min": number(min=0, optional=True),  # gsam
    "optimizer.lr_min": number(min=0, optional=True),  # gsam: the learning rate at which rho = rho_min
    "optimizer.sam_start": number(min=0, optional=True),  # the SAM family's schedule (optim/sam_schedule.py)
    "optimizer.sam_every": integer(min=1, optional=True),
    "optimizer.sam_probability": number(above=0, max=1, optional=True),
    # ---- schedule ------------------------------------------------------------------------------------------------
    "schedule.name": one_of("cosine", "constant"),
    "schedule.warmup_epochs": number(min=0),
    "schedule.min_lr": number(min=0),
    # ---- dataset -------------------------------------------------------------------------------------------------
    "dataset.name": one_of(*DATASETS, "imagenet", "synthetic"),
    "dataset.root": text(optional=True),  # every dataset read from files (not synthetic)
    "dataset.num_classes": integer(min=2),
    "dataset.in_channels": integer(positive=True),
    "dataset.image_size": integer(positive=True),
    "dataset.mean": numbers(min=0, max=1),
    "dataset.std": numbers(positive=True),
    "dataset.train_subset": integer(positive=True, null=True),
    "dataset.subset_seed": integer(min=0),
    "dataset.val_fraction": number(min=0, below=1),
    "dataset.test_subset": integer(positive=True, null=True),
    "dataset.label_noise": number(min=0, below=1),
    "dataset.noise_seed": integer(min=0),
    "dataset.workers": integer(min=0, optional=True),  # imagenet
    "dataset.export": text(null=True, optional=True),  # cifar10: a `sam-data --export-subset` file
    "dataset.train_size": integer(positive=True, optional=True),  # synthetic
    "dataset.test_size": integer(positive=True, optional=True),  # synthetic
    "dataset.image_seed": integer(min=0, optional=True),  # synthetic
    # ---- augment -------------------------------------------------------------------------------------------------
    "augment.name": text(),
    "augment.crop": one_of(True, False, "inception"),
    "augment.pad": integer(min=0),
    "augment.pad_mode": one_of("reflect", "constant"),
    "augment.flip": flag(),
    "augment.cutout": integer(min=0),
    "augment.cutout_per_image": flag(),
    "augment.autoaugment": one_of(*AUTOAUGMENT_POLICIES, null=True),
    "augment.crop_area": numbers(length=2, above=0, max=1, optional=True),  # imagenet
    "augment.crop_aspect_ratio": numbers(length=2, positive=True, optional=True),  # imagenet
    "augment.crop_attempts": integer(min=1, optional=True),  # imagenet
    "augment.interpolation": one_of("bicubic", optional=True),  # imagenet
    # ---- logger --------------------------------------------------------------------------------------------------
    "logger.name": one_of("wandb", "none"),
    "logger.mode": one_of("offline", "online", "disabled"),
    "logger.project": text(optional=True),
    "logger.entity": text(null=True, optional=True),
    "logger.group": text(null=True, optional=True),
    "logger.tags": texts(optional=True),
    "logger.init_timeout": number(positive=True, optional=True),
    "logger.log_every_steps": integer(min=1),
    # ---- top level -----------------------------------------------------------------------------------------------
    "seed": integer(min=0),
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(value: object, choice: object) -> bool:
    """Equal and of the same kind: true is not 1, 2.0 is 2."""
    if isinstance(choice, bool) or isinstance(value, bool):
        return value is choice
    if _is_number(choice):
        return _is_number(value) and value == choice
    return type(value) is type(choice) and value == choice


def _word(choice: object) -> str:
    return choice if isinstance(choice, str) else show(choice)


def show(value: object) -> str:
    """A value as the command line writes it, on one line: 0, 1.5, inf, true, null, 'abc', [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    written = repr(value)
    return written if len(written) <= 80 else written[:77] + "..."


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise ConfigError(problem)


def resolve_config(cfg: DictConfig) -> dict:
    """`cfg` as plain containers with every interpolation resolved. One that does not resolve, or a value left
    `???`, is a ConfigError naming the key (`dataset.label_noise must be set ...` for a preset's required value)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key} has no value (???): set it on the command line ({key}=...)") from None
    except OmegaConfBaseException as exc:
        key, message = getattr(exc, "full_key", None) or "config", str(exc).splitlines()[0]
        if "required." in message:
            raise ConfigError(
                f"{key} must be set on the command line: this preset requires it (e.g. {key}=...)"
            ) from None
        raise ConfigError(f"{key}: {message}") from None


def _unknown(key: str) -> str:
    if retired := retired_key_message(key):
        return retired
    group, (parent, name) = key.split(".")[0], key.rsplit(".", 1)
    siblings = [k.rsplit(".", 1)[1] for k in RULES if k.rsplit(".", 1)[0] == parent]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.75)
    hint = f"did you mean {parent}.{close[0]}?" if close else "`sam-train --cfg job` prints the settings there are"
    return f"unknown key {key}: the {group} group has no such setting ({hint})"


def _check(node: dict, prefix: str, present: set[str]) -> None:
    """Every leaf below `node` (a key with a rule is a leaf, whatever its value) against its rule."""
    for name, value in node.items():
        key = f"{prefix}.{name}"
        if key in RULES:
            present.add(key)
            _refuse(RULES[key].error(key, value))
        elif isinstance(value, dict) and value:
            _check(value, key, present)
        else:
            raise ConfigError(_unknown(key))


def check_schema(tree: dict) -> None:
    """Every leaf of SCHEMA_GROUPS, and the top-level keys with a rule, of a resolved config (plain containers, as
    `resolve_config` returns them) against their rules: present unless optional, and no leaf without a rule."""
    present = {key for key in RULES if "." not in key and key in tree}
    for key in present:
        _refuse(RULES[key].error(key, tree[key]))
    for group in SCHEMA_GROUPS:
        _require(
            isinstance(tree.get(group), dict),
            f"{group} is not a config group here; choose one of its options ({group}=...)",
        )
        _check(tree[group], group, present)
    for key, rule in RULES.items():
        _require(key in present or rule.optional, f"{key} is missing; give it a value (+{key}=...)")


def validate_config(cfg: DictConfig) -> None:
    """`check_schema` of a composed config, which resolves first (`resolve_config`)."""
    check_schema(resolve_config(cfg))


def validate(cfg: DictConfig, env) -> None:
    """`validate_config`, then what depends on several keys or on the machine (`env`: a DistEnv)."""
    validate_config(cfg)
    check_relations(cfg, env.world_size, env.device.type)


IMAGENET_UNSUPPORTED = ("train_subset", "label_noise", "val_fraction", "test_subset")  # streamed from folders


def check_relations(cfg: DictConfig, world_size: int, device_type: str) -> None:
    """What depends on several keys, or on the machine: `world_size` ranks, each on a device of `device_type`
    ("cpu", "cuda"). `cfg` passed `check_schema`."""
    tr, opt, ds = cfg.trainer, cfg.optimizer, cfg.dataset
    _require(
        not (opt.base == "sgd" and opt.nesterov) or opt.momentum > 0,
        f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {opt.momentum}); set "
        "optimizer.nesterov=false for plain SGD",
    )
    if opt.name == "gsam":
        _require(
            opt.rho_min <= opt.rho_max,
            f"optimizer.rho_min ({opt.rho_min}) must not exceed optimizer.rho_max ({opt.rho_max})",
        )
        _require(
            opt.rho == opt.rho_max,
            f"optimizer=gsam takes its radius from optimizer.rho_max (optimizer.rho follows it; got rho={opt.rho}, "
            f"rho_max={opt.rho_max}): set optimizer.rho_max={opt.rho} instead",
        )
        _require(
            opt.lr_min <= opt.lr,
            f"optimizer.lr_min ({opt.lr_min}) must not exceed the peak optimizer.lr ({opt.lr})",
        )
    if opt.name == "msam":
        _require(
            opt.base != "sgd" or opt.momentum > 0,
            "optimizer=msam perturbs along the momentum buffer: it needs optimizer.momentum > 0",
        )
    for stat in ("mean", "std"):
        _require(
            len(ds[stat]) == ds.in_channels,
            f"dataset.{stat} must have one value per channel "
            f"(dataset.in_channels={ds.in_channels}; got {show(list(ds[stat]))})",
        )
    if ds.name == "imagenet":
        for key in IMAGENET_UNSUPPORTED:
            _require(not ds.get(key), f"dataset.{key} is not supported for imagenet (got {ds.get(key)})")
    _require(
        tr.batch_size % world_size == 0,
        f"trainer.batch_size ({tr.batch_size}) must divide evenly over {world_size} ranks",
    )
    per_rank = tr.batch_size // world_size
    _require(
        per_rank % tr.accumulate == 0,
        f"trainer.accumulate ({tr.accumulate}) must divide the per-rank batch ({per_rank})",
    )
    micro = per_rank // tr.accumulate
    start = opt.get("sam_start", 0)
    epochs = tr.epochs * tr.epoch_scale
    _require(
        start < epochs,
        f"optimizer.sam_start ({start:g}) must be below the run's epochs ({epochs:g}): no step would be a SAM "
        "step; use optimizer=sgd for plain training",
    )
    if tr.m is not None:
        _require(
            micro % tr.m == 0,
            f"trainer.m ({tr.m}) must divide the per-rank micro-batch (batch_size / ranks / accumulate = {micro})",
        )
    if tr.sync_bn:
        _require(
            device_type == "cuda",
            "trainer.sync_bn=true needs GPUs (PyTorch's SyncBatchNorm refuses CPU "
            "tensors); on CPU keep the default per-device statistics",
        )
        _require(
            tr.m is None or tr.m == micro,
            "trainer.sync_bn=true cannot be combined with trainer.m groups smaller than the per-rank batch",
        )
