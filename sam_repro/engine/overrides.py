"""The command line's overrides, checked against the config tree before Hydra composes anything.

Hydra accepts `+optimizer.rho=0.1` with `optimizer=sgd` (and trains plain SGD that carries a `rho`), and answers a
typo with several lines about the config search path or `+`. `check_overrides(overrides)` stops such a command
with one ConfigError line instead:
  * a group option that does not exist (`optimizer=adamm`, `experiment=table1/wrn28_10`): "did you mean", and the
    options, nested presets written as `experiment=table1/wrn28_10_200ep`;
  * a key that belongs to another option of its group (`optimizer.rho=0.1` or `+optimizer.rho=0.1` with
    `optimizer=sgd`): the key and the option to add (`optimizer=sam`);
  * a key no option has (`optimizer.rh=0.1`, `trainer.rho=0.1`, `optimizr=sam`): "did you mean";
  * `+key` for a key that is already set: drop the `+`.
Every combination of the group options a sweep (`-m optimizer=sgd,sam`) asks for is checked: a sweep never starts
a job that would be refused or, worse, train the wrong thing.

`config_groups()` lists the groups and their options (nested presets included); `--help` and tab completion
(`sam_repro.train`) show them.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sam_repro.errors import ConfigError
from sam_repro.run_keys import retired_key_message

CONFIG_MODULE = "sam_repro.configs"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
HIDDEN = ("recipe/",)  # building blocks of presets (experiment/recipe/cifar.yaml), not presets to train
MAX_COMBINATIONS = 64  # group sweeps larger than this are checked on their first combination only


def config_groups() -> dict[str, list[str]]:
    """{group: [options]} of `sam-train` (not Hydra's own groups); nested options as `table1/wrn28_10_200ep`."""
    groups = {}
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
        groups[folder.name] = sorted(str(f.relative_to(folder).with_suffix("")) for f in folder.rglob("*.yaml"))
    return groups


def shown_options(options: Sequence[str]) -> list[str]:
    """The options a user picks from (without the presets' building blocks)."""
    return [o for o in options if not o.startswith(HIDDEN)]


def _did_you_mean(word: str, candidates: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _option_error(group: str, value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, shown_options(options), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(f'{group}={c}' for c in close)}? " if close else ""
    return f"{group} has no option {value!r} ({hint}options: {', '.join(shown_options(options))})"


def _option_keys(group: str, option: str, seen: frozenset = frozenset()) -> tuple[set[str], int]:
    """The dotted keys (below the group) that `group=option` sets, with those of the options it builds on (its
    `defaults`), and how many levels of such options it builds on (sam on sgd: 1)."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if option in seen or not path.exists():
        return set(), 0
    node = OmegaConf.to_container(OmegaConf.load(path))
    node = node if isinstance(node, dict) else {}
    keys, depth = set(), 0
    for entry in node.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            inherited, level = _option_keys(group, entry, seen | {option})
            keys |= inherited
            depth = max(depth, level + 1)
    keys |= set(_flat_keys(node))
    return keys, depth


def _builds_on(group: str, option: str, base: str, seen: frozenset = frozenset()) -> bool:
    """Whether `group=option` has `base` among the options in its `defaults`, directly or further down."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if option in seen or not path.exists():
        return False
    entries = (OmegaConf.to_container(OmegaConf.load(path)) or {}).get("defaults") or []
    parents = [e for e in entries if isinstance(e, str) and e != "_self_" and "/" not in e]
    return base in parents or any(_builds_on(group, p, base, seen | {option}) for p in parents)


def _flat_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        if isinstance(value, dict) and value:
            keys += _flat_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _has(cfg: DictConfig, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _all_keys(cfg: DictConfig) -> list[str]:
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return _flat_keys(plain)


def _unknown_key(key: str, cfg: DictConfig, groups: dict[str, list[str]]) -> str:
    """`unknown key optimizer.rh: the optimizer group has no such setting (did you mean optimizer.rho?)`."""
    if retired := retired_key_message(key):
        return retired
    first, _, rest = key.partition(".")
    known = set(_all_keys(cfg))
    for group, options in groups.items():
        if group in cfg:
            for option in options:
                known |= {f"{group}.{k}" for k in _option_keys(group, option)[0]}
    if not rest:  # a top-level word: a group or a top-level key misspelt
        close = _did_you_mean(first, [*groups, *(k for k in known if "." not in k)])
        hint = f"did you mean {close}?" if close else "`sam-train --help` lists the groups"
        return f"unknown group or key {key} ({hint})"
    parent, leaf = key.rsplit(".", 1)
    siblings = [k.rsplit(".", 1)[1] for k in known if "." in k and k.rsplit(".", 1)[0] == parent]
    close = _did_you_mean(leaf, siblings)
    if close:
        suggestion = f"{parent}.{close}"
    else:  # the right name in the wrong group (trainer.rho for optimizer.rho)
        elsewhere = sorted(k for k in known if k.rsplit(".", 1)[-1] == leaf)
        suggestion = elsewhere[0] if elsewhere else None
    if suggestion is None and first not in cfg:
        close = _did_you_mean(first, [*groups, *(k for k in known if "." not in k)])
        suggestion = f"{close}.{rest}" if close else None
    hint = f"did you mean {suggestion}?" if suggestion else "`sam-train --cfg job` prints the settings there are"
    where = f"the {first} group" if first in groups else f"the config's {parent}"
    return f"unknown key {key}: {where} has no such setting ({hint})"


def _parse(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"cannot read the override: {str(exc).splitlines()[0]}") from None


def _prefix(override) -> str:
    if override.is_delete():
        return "~"
    if override.is_force_add():
        return "++"
    return "+" if override.is_add() else ""


def _values(override) -> list[str]:
    """A group override's options: one, or each of a sweep's (`optimizer=sgd,sam`)."""
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    try:
        return [str(v) for v in override.sweep_string_iterator()]
    except Exception:  # noqa: BLE001 -- a range or glob sweep: leave it to Hydra
        return []


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse (ConfigError, one line) what Hydra would refuse in many lines, or accept and train wrongly: see the
    module docstring. `overrides` are the command line's, without sam-train's flags (-m, --cfg ...)."""
    from hydra import compose, initialize_config_module

    groups = config_groups()
    parsed = _parse(overrides)
    group_overrides, key_overrides = [], []
    # Presets in other folders (hydra.searchpath=[file://...]) are Hydra's to find: compose with them.
    searchpath = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath"]
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or key == "run_root":
            continue
        if key in groups:
            values = _values(override)
            if not override.is_delete() and not searchpath:
                for value in values:
                    if value != "null" and value not in groups[key]:
                        raise ConfigError(_option_error(key, value, groups[key]))
            group_overrides.append([f"{_prefix(override)}{key}={v}" for v in values] or [override.input_line])
        else:
            key_overrides.append(override)
    if not key_overrides:
        return
    combinations = list(itertools.islice(itertools.product(*group_overrides), MAX_COMBINATIONS))
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for combination in combinations:
            try:
                cfg = compose(config_name="train", overrides=[*searchpath, *combination], return_hydra_config=True)
            except Exception as exc:  # noqa: BLE001 -- Hydra's own refusal, in one line
                raise ConfigError(str(exc).strip().splitlines()[0]) from None
            choices = cfg.hydra.runtime.choices
            for override in key_overrides:
                _check_key(override, cfg, choices, groups)


def _check_key(override, cfg: DictConfig, choices, groups: dict[str, list[str]]) -> None:
    key = override.key_or_group
    group, _, rest = key.partition(".")
    present = _has(cfg, key)
    if present:
        if override.is_add() and not override.is_force_add():
            raise ConfigError(f"{key} is already set; drop the + ({override.input_line.lstrip('+')})")
        return
    chosen = choices.get(group) if group in groups else None
    if chosen is not None and rest:
        owners = []
        for option in groups[group]:
            keys, depth = _option_keys(group, option)
            if rest in keys:
                owners.append((depth, option))
        if owners:
            # the option the others build on first (sam before asam, gsam, looksam; then msam, which sets rho too)
            built_on = {option: sum(_builds_on(group, other, option) for _, other in owners) for _, option in owners}
            names = [option for _, option in sorted(owners, key=lambda o: (o[0], -built_on[o[1]], o[1]))]
            also = f" (also {', '.join(sorted(names[1:]))})" if len(names) > 1 else ""
            raise ConfigError(
                f"{key} is a setting of {group}={names[0]}{also}, not of {group}={chosen}: "
                f"add {group}={names[0]} to the command line"
            )
    if not override.is_add() or group in groups:
        raise ConfigError(_unknown_key(key, cfg, groups))
