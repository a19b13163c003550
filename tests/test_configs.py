"""Every option of every config group composes, carries its `name`, and passes validation; run directories are
derived from what defines the run."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sam_repro.engine.config import validate
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.rundir import register_resolvers, run_name
from sam_repro.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "sam_repro" / "configs"
GROUPS = ("dataset", "model", "augment", "optimizer", "schedule", "trainer", "logger")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIGS / g).glob("*.yaml"))]
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")


def compose_train(*overrides):
    register_resolvers()
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_with_a_name(group, option):
    cfg = compose_train(f"{group}={option}")
    assert cfg[group].name == option or group == "trainer"
    OmegaConf.to_container(cfg[group], resolve=True)


def test_defaults_validate():
    validate(compose_train(), CPU)


@pytest.mark.parametrize("override, key", [
    ("trainer.epochs=0", "trainer.epochs"), ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.accumulate=3", "trainer.accumulate"), ("trainer.m=7", "trainer.m"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"), ("dataset.label_noise=1.5", "dataset.label_noise"),
    ("optimizer.lr=0", "optimizer.lr"), ("trainer.sync_bn=true", "trainer.sync_bn"),
    ("trainer.eval_every=0", "trainer.eval_every"),
])
def test_invalid_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_train(override), CPU)


def test_run_name_ignores_what_does_not_change_the_result():
    assert run_name(None, []) == "default/base"
    a = run_name("demo", ["optimizer=sam", "logger.mode=online", "seed=3", "trainer.device=cpu", "model=wrn16_4"])
    b = run_name("demo", ["model=wrn16_4", "optimizer=sam", "hydra.run.dir=x", "trainer.progress=bar"])
    assert a == b == "demo/model=wrn16_4,optimizer=sam"
    assert run_name("table1/wrn28_10_200ep", ["optimizer=sgd"]) == "table1/wrn28_10_200ep/optimizer=sgd"
    assert run_name(None, ["trainer.epochs=2", "trainer.epochs=3"]) == "default/trainer.epochs=3"
    long = run_name(None, [f"+x{i}=1" for i in range(100)])
    assert len(long.split("/", 1)[1]) <= 180


DEBUG_OPTIONS = sorted(f.stem for f in (CONFIGS / "debug").glob("*.yaml"))


@pytest.mark.parametrize("debug", DEBUG_OPTIONS)
def test_debug_options_shrink_any_preset_to_a_valid_quiet_run(debug):
    cfg = compose_train("experiment=table1/wrn28_10_200ep", "dataset=cifar100", "optimizer=sam", f"debug={debug}")
    validate(cfg, CPU)
    assert (cfg.trainer.threads, cfg.logger.mode) == (1, "disabled")
    assert cfg.dataset.train_subset <= 256 and cfg.dataset.test_subset <= 500
    assert cfg.optimizer.rho == 0.1  # the preset's own hyperparameters stay


def test_debug_tiny_and_preset_as_documented():
    assert set(DEBUG_OPTIONS) == {"tiny", "preset"}
    tiny = compose_train("debug=tiny")
    assert (tiny.model.name, tiny.dataset.train_subset, tiny.dataset.test_subset, tiny.trainer.batch_size) == (
        "resnet8", 256, 500, 64)  # fmt: skip
    # The command line wins over the debug option; without one nothing changes.
    assert compose_train("debug=tiny", "model=wrn16_4", "trainer.batch_size=32").model.name == "wrn16_4"
    assert compose_train("debug=tiny", "trainer.batch_size=32").trainer.batch_size == 32
    default = compose_train()
    assert "debug" not in default and default.dataset.train_subset is None and default.model.name == "resnet20"
    # debug=preset keeps the preset's model and recipe: one step, batch 8 in groups of 4.
    preset = compose_train("experiment=table1/pyramidnet272_shakedrop", "dataset=cifar10", "debug=preset")
    assert (preset.model.name, preset.trainer.grad_clip, preset.trainer.max_steps, preset.trainer.batch_size,
            preset.trainer.m) == ("pyramidnet272_shakedrop", 5.0, 1, 8, 4)  # fmt: skip
