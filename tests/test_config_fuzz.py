"""Configs fuzzed: wrong types, out-of-range values and unknown keys for every leaf of the trainer, optimizer,
schedule, dataset, augment and logger groups (each has a rule in sam_repro.engine.config.RULES), each refused with
one line naming the key; values a rule allows pass.

Mostly in-process: every option of those groups is composed once, and each case sets one leaf of one option's
config and calls `validate_config`. Fewer cases go through Hydra's override parser (`compose` with `key=value`),
and a handful through `sam-train` itself: exit status 2, one `error:` line, no traceback, no run directory left.
Hypothesis runs derandomized and without an example database, so every run tries the same cases; their number is
in the terminal summary (`figures`).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from helpers.training import TINY, train
from sam_repro.engine.config import RULES, SCHEMA_GROUPS, Rule, validate_config
from sam_repro.engine.rundir import register_resolvers
from sam_repro.errors import ConfigError
from sam_repro.run_keys import flatten

CONFIGS = Path(__file__).resolve().parents[1] / "sam_repro" / "configs"
OPTIONS = [(g, f.stem) for g in SCHEMA_GROUPS for f in sorted((CONFIGS / g).glob("*.yaml"))]
KEYS = [k for k in RULES if k.split(".")[0] in SCHEMA_GROUPS] + ["seed"]
FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Text that Hydra's override grammar reads back unchanged when quoted; in-process cases take any text but `$`
# (which would make it an interpolation).
PLAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-.:/ ", max_size=10)
ANY_TEXT = st.text(max_size=10).filter(lambda s: "$" not in s)
ABSENT = object()
DEVICES = st.from_regex(r"(auto|cpu|cuda|cuda:[0-9]{1,2})", fullmatch=True)


class Composed(dict):
    """{(group, option): config}, shown in a failure report by its size only; `leaves[option]`: the keys of the
    option's group in its config."""

    def __init__(self, configs: dict) -> None:
        super().__init__(configs)
        self.leaves = {
            o: frozenset(f"{o[0]}.{k}" for k in flatten(OmegaConf.to_container(c[o[0]]))) for o, c in configs.items()
        }

    def __repr__(self) -> str:
        return f"<{len(self)} composed options>"

    def holders(self, key: str) -> list:
        """The options that have `key` (all options of its group when none does: the key is then added)."""
        have = [o for o in self if key == "seed" or key in self.leaves[o]]
        return have or [o for o in self if o[0] == key.split(".")[0]]


@pytest.fixture(scope="module")
def composed():
    """Every option of the validated groups composed once and resolved (so that a case costs milliseconds); each
    case changes one leaf and puts it back (`changed`), which the teardown checks."""
    register_resolvers()
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        plain = {
            o: OmegaConf.to_container(compose("train", overrides=[f"{o[0]}={o[1]}"]), resolve=True) for o in OPTIONS
        }
        configs = Composed({o: OmegaConf.create(c) for o, c in plain.items()})
        yield configs
    assert {o: OmegaConf.to_container(c) for o, c in configs.items()} == plain, "a case left a change behind"


class Tally(SimpleNamespace):
    def __repr__(self) -> str:
        return "<tally>"


@pytest.fixture(scope="module")
def tally(figures):
    """Cases per kind (`tally.cases`) and the keys wrong values were tried at (`tally.keys`), reported at the end."""
    counts = Tally(cases=Counter(), keys=set())
    yield counts
    n = counts.cases
    refused = n["wrong"] + n["unknown"] + n["missing"] + n["parsed"]
    if refused:
        figures(
            f"config fuzz: {refused + n['allowed']} cases, {refused} refused with one line "
            f"naming the key ({n['wrong']} wrong values at {len(counts.keys)} keys, {n['unknown']} unknown keys, "
            f"{n['missing']} missing keys, {n['parsed']} through Hydra's parser), {n['allowed']} allowed values "
            "accepted"
        )
    if n["cli"]:
        figures(
            f"config fuzz through sam-train: {n['cli']} cases, {n['cli']} refused with exit status 2, one error "
            "line, no traceback, no run directory"
        )


@contextlib.contextmanager
def changed(cfg, key: str, value):
    """`cfg` with `key` set to `value` (added, with any parents, when absent) for the duration of the block."""
    parts = key.split(".")
    new = next(
        (i for i in range(1, len(parts) + 1) if OmegaConf.select(cfg, ".".join(parts[:i]), default=ABSENT) is ABSENT),
        None,
    )
    old = None if new is not None else OmegaConf.select(cfg, key)
    old = OmegaConf.to_container(old) if OmegaConf.is_config(old) else old
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    try:
        yield cfg
    finally:
        if new is None:
            OmegaConf.update(cfg, key, old, merge=False)
        else:
            parent = ".".join(parts[: new - 1])
            del (OmegaConf.select(cfg, parent) if parent else cfg)[parts[new - 1]]


def refusal(cfg) -> str:
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    message = str(refused.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ---- values a rule refuses and values it allows ------------------------------------------------------------------


def _below(low: float, is_open: bool) -> list[st.SearchStrategy]:
    return [
        st.integers(max_value=math.floor(low) if is_open else math.ceil(low) - 1),
        st.floats(max_value=low, allow_nan=False, allow_infinity=False).filter(
            lambda x: x < low or (is_open and x == low)
        ),
    ]


def _above(high: float, is_open: bool) -> list[st.SearchStrategy]:
    return [
        st.integers(min_value=math.ceil(high) if is_open else math.floor(high) + 1),
        st.floats(min_value=high, allow_nan=False, allow_infinity=False).filter(
            lambda x: x > high or (is_open and x == high)
        ),
    ]


def _outside(rule: Rule) -> list[st.SearchStrategy]:
    """Integers and finite floats past either bound."""
    return ([] if rule.low is None else _below(rule.low, rule.low_open)) + (
        [] if rule.high is None else _above(rule.high, rule.high_open)
    )


def refused_values(rule: Rule, text: st.SearchStrategy) -> st.SearchStrategy:
    """Values `rule` has to refuse: every other type (null too, unless allowed), numbers outside its range or not
    finite, other strings than its choices, lists with a wrong item or length."""
    others = [st.dictionaries(st.sampled_from("xyz"), st.integers(0, 9), min_size=1, max_size=2)]
    if not rule.null:
        others.append(st.none())
    non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
    kind = rule.kind
    if kind == "int":
        wrong = [st.floats(), text, st.booleans(), st.lists(st.integers(), max_size=2), *_outside(rule)]
    elif kind == "float":
        wrong = [text, st.booleans(), non_finite, st.lists(st.floats(), max_size=2), *_outside(rule)]
    elif kind == "bool":
        wrong = [st.integers(), st.floats(), text, st.lists(st.booleans(), max_size=2)]
    elif kind == "str":
        wrong = [st.integers(), st.floats(), st.booleans(), st.lists(text, max_size=2)]
        if rule.valid is not None:
            wrong.append(text.filter(lambda s: not rule.valid(s)))
    elif kind == "choice":
        wrong = [
            text.filter(lambda s: s not in rule.choices),
            st.lists(st.integers(), max_size=2),
            st.integers().filter(lambda x: x not in rule.choices),
            st.floats().filter(lambda x: x not in rule.choices),
        ]
        if not any(isinstance(c, bool) for c in rule.choices):
            wrong.append(st.booleans())
    elif kind == "floats":
        item = st.floats(0.1, 0.9)
        wrong = [
            st.floats(),
            st.integers(),
            text,
            st.lists(text, min_size=1, max_size=3),
            st.lists(non_finite, min_size=1, max_size=3),
            *[st.lists(bad, min_size=rule.length or 1, max_size=rule.length or 3) for bad in _outside(rule)],
        ]
        if rule.length is not None:
            wrong.append(st.lists(item, max_size=5).filter(lambda items: len(items) != rule.length))
    elif kind == "strings":
        wrong = [st.integers(), st.booleans(), text, st.lists(st.integers(), min_size=1, max_size=3)]
    else:
        raise AssertionError(kind)
    return st.one_of(*wrong, *others)


def allowed_values(rule: Rule, key: str) -> st.SearchStrategy:
    kind, low, high = rule.kind, rule.low, rule.high
    if kind == "int":
        allowed = st.integers(
            None if low is None else math.floor(low) + 1 if rule.low_open else math.ceil(low),
            None if high is None else math.ceil(high) - 1 if rule.high_open else math.floor(high),
        )
    elif kind in ("float", "floats"):
        number = st.floats(
            low,
            high,
            exclude_min=rule.low_open and low is not None,
            exclude_max=rule.high_open and high is not None,
            allow_nan=False,
            allow_infinity=False,
        )
        allowed = number if kind == "float" else st.lists(number, min_size=rule.length or 0, max_size=rule.length or 4)
    elif kind == "bool":
        allowed = st.booleans()
    elif kind == "str":
        allowed = DEVICES if key == "trainer.device" else PLAIN
    elif kind == "choice":
        allowed = st.sampled_from(rule.choices)
    elif kind == "strings":
        allowed = st.lists(PLAIN, max_size=3)
    else:
        raise AssertionError(kind)
    return st.one_of(allowed, st.none()) if rule.null else allowed


# ---- in-process: compose once, set one leaf, validate --------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
@settings(max_examples=15, **FUZZ)
@given(data=st.data())
def test_wrong_values_are_refused_naming_the_key(composed, tally, key, data):
    option = data.draw(st.sampled_from(composed.holders(key)), label="option")
    value = data.draw(refused_values(RULES[key], ANY_TEXT), label="value")
    with changed(composed[option], key, value) as cfg:
        message = refusal(cfg)
    assert message.startswith(f"{key} "), message
    tally.cases["wrong"] += 1
    tally.keys.add(key)


@pytest.mark.parametrize("key", KEYS)
@settings(max_examples=5, **FUZZ)
@given(data=st.data())
def test_allowed_values_pass(composed, tally, key, data):
    option = data.draw(st.sampled_from(composed.holders(key)), label="option")
    with changed(composed[option], key, data.draw(allowed_values(RULES[key], key), label="value")) as cfg:
        validate_config(cfg)
    tally.cases["allowed"] += 1


NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), PLAIN)


def _unknown(key: str) -> bool:
    return not any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in RULES)


@pytest.mark.parametrize("group", SCHEMA_GROUPS)
@settings(max_examples=25, **FUZZ)
@given(data=st.data())
def test_unknown_keys_are_refused_naming_the_key(composed, tally, group, data):
    option = data.draw(st.sampled_from([o for o in OPTIONS if o[0] == group]), label="option")
    key = data.draw(
        st.lists(NAMES, min_size=1, max_size=2).map(lambda names: ".".join([group, *names])).filter(_unknown),
        label="key",
    )
    with changed(composed[option], key, data.draw(SCALARS, label="value")) as cfg:
        message = refusal(cfg)
    assert message.startswith(f"unknown key {key}: the {group} group has no such setting"), message
    tally.cases["unknown"] += 1


def test_every_missing_key_is_refused_naming_it(composed, tally):
    required = [k for k in KEYS if k != "seed" and not RULES[k].optional]
    for key in required:
        group, name = key.split(".", 1)
        cfg = composed[next(o for o in OPTIONS if o[0] == group)]
        value = OmegaConf.to_container(cfg[group])[name]
        del cfg[group][name]
        try:
            assert refusal(cfg) == f"{key} is missing; give it a value (+{key}=...)"
        finally:
            cfg[group][name] = value
        tally.cases["missing"] += 1
    assert len(required) > 50


# ---- through Hydra's override parser -------------------------------------------------------------------------------


def written(value) -> str:
    """`value` as a Hydra override writes it (strings quoted, so that `'3'` stays a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ",".join(map(written, value)) + "]"
    return "{" + ",".join(f"{k}:{written(v)}" for k, v in value.items()) + "}"


def same(parsed, value) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return isinstance(parsed, float) and math.isnan(parsed)
    if isinstance(value, list):
        return isinstance(parsed, list) and len(parsed) == len(value) and all(map(same, parsed, value))
    return type(parsed) is type(value) and parsed == value


@pytest.mark.parametrize("group", SCHEMA_GROUPS)
@settings(max_examples=6, **FUZZ)
@given(data=st.data())
def test_command_line_values_are_refused_naming_the_key(composed, tally, group, data):
    option = data.draw(st.sampled_from([o for o in OPTIONS if o[0] == group]), label="option")
    if data.draw(st.booleans(), label="unknown key"):
        key = data.draw(NAMES.map(lambda name: f"{group}.{name}").filter(_unknown), label="key")
        value, override, expected = data.draw(SCALARS, label="value"), "+", f"unknown key {key}"
    else:
        key = data.draw(st.sampled_from([k for k in KEYS if k.startswith(group + ".")]), label="key")
        value, override, expected = data.draw(refused_values(RULES[key], PLAIN), label="value"), "", f"{key} "
        if key not in composed.leaves[option]:
            override = "+"  # optimizer.betas, or a key another option of the group has
    cfg = compose("train", overrides=[f"{group}={option[1]}", f"{override}{key}={written(value)}"])
    parsed = OmegaConf.select(cfg, key)
    parsed = OmegaConf.to_container(parsed) if OmegaConf.is_config(parsed) else parsed
    assert same(parsed, value), f"{key}={written(value)} was read as {parsed!r}"
    assert refusal(cfg).startswith(expected)
    tally.cases["parsed"] += 1


# ---- through sam-train ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["trainer.epochs=abc"], "error: trainer.epochs must be an integer (got 'abc')"),
        (["+trainer.foo=1"], "error: unknown key trainer.foo: the trainer group has no such setting"),
        (["optimizer=sam", "optimizer.rho=nan"], "error: optimizer.rho must be a finite number (got nan)"),
        (["experiment=table4/resnet32_noise"], "error: dataset.label_noise must be set on the command line"),
        (["dataset.mean=[0.5]"], "error: dataset.mean must have one value per channel"),  # after init_distributed
    ],
)
def test_sam_train_refuses_with_one_line_and_leaves_no_run_directory(tmp_path, tally, overrides, line):
    runs = tmp_path / "runs"
    proc = train(runs, *TINY, *overrides, check=False)
    output = proc.stdout + proc.stderr
    errors = [text for text in output.splitlines() if "error:" in text]
    assert proc.returncode == 2, output
    assert len(errors) == 1 and line in errors[0], output
    assert "Traceback" not in output
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))
    tally.cases["cli"] += 1
