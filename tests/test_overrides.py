"""The command line checked before Hydra composes it (sam_repro/engine/overrides.py), `sam-train --help` and tab
completion: a key of another option of its group, a misspelt key, group or preset stop with one line, before any
work; nested presets are listed, offered and explained. No test here needs the data."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers.training import BIN, env_for
from sam_repro.engine.overrides import check_overrides, config_groups
from sam_repro.errors import ConfigError
from sam_repro.train import _complete, help_text

CONFIGS = Path(__file__).resolve().parents[1] / "sam_repro" / "configs"
# The presets on disk, written as the command line writes them (table1/wrn28_10_200ep), found independently.
PRESETS = {
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
    if "recipe" not in p.parts
}


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        check_overrides(list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.rho=0.1"],
        ["+optimizer.rho=0.1"],  # trained plain SGD carrying a rho before
        ["optimizer=sgd", "++optimizer.rho=0.1"],
        ["optimizer=sam,sgd", "optimizer.rho=0.1"],  # the sgd job of a sweep
    ],
)
def test_a_key_of_another_option_names_the_option_to_choose(overrides):
    message = refusal(*overrides)
    assert message.startswith("optimizer.rho is a setting of optimizer=sam")
    assert "not of optimizer=sgd" in message and "add optimizer=sam" in message


def test_the_keys_of_the_chosen_option_are_accepted():
    check_overrides(["optimizer=sam", "optimizer.rho=0.1"])
    check_overrides(["optimizer=asam", "optimizer.eta=0.1", "trainer.epochs=3", "seed=2"])
    check_overrides(["experiment=table4/resnet32_noise", "dataset.label_noise=0.2", "optimizer=sgd,sam"])
    check_overrides(["optimizer=looksam", "optimizer.k=2", "hydra.run.dir=/tmp/x", "run_root=/tmp/y"])


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "optimizer.rh=0.1",
            "unknown key optimizer.rh: the optimizer group has no such setting (did you mean optimizer.rho?)",
        ),
        (
            "trainer.rho=0.1",
            "unknown key trainer.rho: the trainer group has no such setting (did you mean optimizer.rho?)",
        ),
        (
            "trainer.epoch=3",
            "unknown key trainer.epoch: the trainer group has no such setting (did you mean trainer.epochs?)",
        ),
        ("optimizr=sam", "unknown group or key optimizr (did you mean optimizer?)"),
        ("+trainer.m=3", "trainer.m is already set; drop the + (trainer.m=3)"),
        (
            "trainer.inject_nonfinite_at_step=3",
            "trainer.inject_nonfinite_at_step was retired: set the environment variable "
            "SAM_REPRO_FAULT=nonfinite_at_step=N instead (sam_repro/engine/faults.py)",
        ),
    ],
)
def test_unknown_keys_and_groups_say_what_was_meant(override, expected):
    assert refusal(override) == expected


def test_a_misspelt_preset_lists_the_nested_presets():
    message = refusal("experiment=table1/wrn28_10")
    assert "did you mean experiment=table1/wrn28_10_200ep" in message or "experiment=table1/wrn28_10_1800ep" in message
    listed = set(message.split("options: ", 1)[1].rstrip(")").split(", "))
    assert listed == PRESETS and "table1/wrn28_10_200ep" in PRESETS
    assert "did you mean optimizer=sam" in refusal("optimizer=sma")


def test_tab_completion_offers_the_nested_presets():
    assert set(_complete("sam-train debug=tiny experiment=")) == {f"experiment={p}" for p in PRESETS}
    assert set(_complete("sam-train +experiment=table1/")) == {
        f"+experiment={p}" for p in PRESETS if p.startswith("table1/")
    }
    assert _complete("sam-train optim") is None  # anything but group=... is Hydra's to complete


def test_help_says_what_it_does_with_examples_groups_and_where_runs_go():
    text = help_text()
    assert "powered by Hydra" not in text and text.startswith("sam-train: train")
    examples = [line for line in text.splitlines() if line.startswith("  sam-train ")]
    assert len(examples) >= 3 and any(" -m " in line for line in examples)
    for example in examples[:3]:  # every example is a command that passes the checks
        check_overrides([w for w in example.split("#")[0].split()[1:] if not w.startswith("-")])
    experiment_line = next(line for line in text.splitlines() if line.split()[:1] == ["experiment"])
    assert {w.strip(",") for w in experiment_line.split()[1:]} == PRESETS
    assert "$SAM_RUNS_DIR" in text and "seed<seed>" in text
    assert set(config_groups()) == {
        p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")
    }


def test_the_cli_refuses_a_key_of_another_option_in_one_line(tmp_path):
    """The CLI contract: exit 2, one line, no traceback, no run directory, nothing trained."""
    env = {**env_for(tmp_path / "runs"), "SAM_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [str(BIN / "sam-train"), "debug=tiny", "+optimizer.rho=0.1"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.splitlines() == [
        "error: optimizer.rho is a setting of optimizer=sam (also asam, gsam, looksam, msam), not of optimizer=sgd: "
        "add optimizer=sam to the command line"
    ]
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")
