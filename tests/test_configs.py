"""Every option of every config group composes, carries its `name`, and passes validation; every leaf of the
validated groups has a rule (sam_repro.engine.config.RULES); run directories are derived from what defines the
run. tests/test_config_fuzz.py throws wrong values at every rule."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers.training import compose_config
from sam_repro.engine.config import AUTOAUGMENT_POLICIES, RULES, SCHEMA_GROUPS, validate, validate_config
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.rundir import run_name
from sam_repro.errors import ConfigError
from sam_repro.run_keys import flatten

CONFIGS = Path(__file__).resolve().parents[1] / "sam_repro" / "configs"
GROUPS = ("dataset", "model", "augment", "optimizer", "schedule", "trainer", "logger")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIGS / g).glob("*.yaml"))]
SCHEMA_OPTIONS = [(g, o) for g, o in OPTIONS if g in SCHEMA_GROUPS]
PRESETS = [
    f"{group}={f.relative_to(CONFIGS / group).with_suffix('')}"
    for group in ("experiment", "debug")
    for f in sorted((CONFIGS / group).rglob("*.yaml"))
]
REQUIRED_BY_PRESET = {
    "experiment=table4/resnet32_noise": ["dataset.label_noise=0.4"],  # what a preset asks for
    "experiment=table3/efficientnet_b7": ["model.pretrained_path=/ckpt/b7.pth"],
}
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="single")


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_with_a_name(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg[group].name == option or group == "trainer"
    OmegaConf.to_container(cfg[group], resolve=True)


def test_defaults_validate():
    validate(compose_config(), CPU)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.accumulate=3", "trainer.accumulate"),
        ("trainer.m=7", "trainer.m"),
        ("trainer.grad_clip=-1", "trainer.grad_clip"),
        ("dataset.label_noise=1.5", "dataset.label_noise"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("trainer.sync_bn=true", "trainer.sync_bn"),
        ("trainer.eval_every=0", "trainer.eval_every"),
        ("optimizer.momentum=0", "optimizer.nesterov"),
        ("dataset.mean=[0.5]", "dataset.mean"),
        ("trainer.tf32=maybe", "trainer.tf32"),
    ],
)
def test_invalid_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(override), CPU)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.epochs=abc"], "trainer.epochs must be an integer (got 'abc')"),
        (["trainer.epochs=2.0"], "trainer.epochs must be an integer (got 2.0)"),
        (["trainer.epoch_scale=0"], "trainer.epoch_scale must be positive (got 0)"),
        (["trainer.compile=1"], "trainer.compile must be true or false (got 1)"),
        (["trainer.progress=loud"], "trainer.progress must be one of auto, bar, log, off (got 'loud')"),
        (["trainer.device=gpu"], "trainer.device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
        (["trainer.max_steps=0"], "trainer.max_steps must be positive or null (got 0)"),
        (["optimizer.lr=inf"], "optimizer.lr must be a finite number (got inf)"),
        (["optimizer=sam", "optimizer.p=1"], "optimizer.p must be one of 2, inf (got 1)"),
        (["augment.crop=1"], "augment.crop must be one of true, false, inception (got 1)"),
        (["augment.autoaugment=cifar100"], "augment.autoaugment must be one of cifar10, svhn, imagenet or null"),
        (["dataset.std=[0.2,0,0.2]"], "dataset.std must be a list of positive numbers (got [0.2, 0, 0.2])"),
        (["logger.tags=[a,1]"], "logger.tags must be a list of strings (got ['a', 1])"),
        (["+trainer.foo=1"], "unknown key trainer.foo: the trainer group has no such setting"),
        (
            ["+trainer.epoch=1"],
            "unknown key trainer.epoch: the trainer group has no such setting (did you mean trainer.epochs?)",
        ),
        (["+logger.rho=1"], "unknown key logger.rho"),
        (["~trainer.epochs"], "trainer.epochs is missing; give it a value (+trainer.epochs=...)"),
        (["trainer.epochs=???"], "trainer.epochs has no value (???)"),
        (
            ["experiment=table4/resnet32_noise"],
            "dataset.label_noise must be set on the command line: this preset requires it",
        ),
        (["experiment=table3/efficientnet_b7"], "model.pretrained_path must be set on the command line"),
        (["+paper.x=${nope}"], "paper.x: Interpolation key 'nope' not found"),
        (["seed=-1"], "seed must be >= 0 (got -1)"),
    ],
)
def test_schema_refusals_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as refused:
        validate_config(compose_config(*overrides))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def _group_leaves(cfg, group) -> list[str]:
    return [f"{group}.{key}" for key in flatten(OmegaConf.to_container(cfg[group], resolve=False))]


def test_every_leaf_of_every_option_has_a_rule():
    # A key added to an option file (or to a preset) without its rule in sam_repro/engine/config.py fails here.
    without = {
        f"{group}={option}": [k for k in _group_leaves(compose_config(f"{group}={option}"), group) if k not in RULES]
        for group, option in SCHEMA_OPTIONS
    }
    assert not {o: keys for o, keys in without.items() if keys}, "add a rule per key to RULES"


def test_every_rule_is_a_leaf_of_its_options():
    leaves = {(g, o): set(_group_leaves(compose_config(f"{g}={o}"), g)) for g, o in SCHEMA_OPTIONS}
    for key, rule in RULES.items():
        group = key.split(".")[0]
        if group not in SCHEMA_GROUPS:
            continue
        holders = [o for (g, o), keys in leaves.items() if g == group and key in keys]
        options = [o for g, o in SCHEMA_OPTIONS if g == group]
        if rule.optional:  # optimizer.betas is only ever given on the command line, with optimizer.base=adamw
            assert holders or key == "optimizer.betas", f"{key}: no option has it; remove its rule"
        else:
            assert holders == options, f"{key} is required but missing from {set(options) - set(holders)}"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_the_schema(preset):
    validate_config(compose_config(preset, *REQUIRED_BY_PRESET.get(preset, [])))


def test_autoaugment_choices_are_the_policies_torchvision_has():
    from sam_repro.data.autoaugment import POLICIES

    assert sorted(AUTOAUGMENT_POLICIES) == sorted(POLICIES)


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
    cfg = compose_config("experiment=table1/wrn28_10_200ep", "dataset=cifar100", "optimizer=sam", f"debug={debug}")
    validate(cfg, CPU)
    assert (cfg.trainer.threads, cfg.logger.mode) == (1, "disabled")
    assert cfg.dataset.train_subset <= 256 and cfg.dataset.test_subset <= 500
    assert cfg.optimizer.rho == 0.1  # the preset's own hyperparameters stay


def test_debug_tiny_and_preset_as_documented():
    assert set(DEBUG_OPTIONS) == {"tiny", "preset"}
    tiny = compose_config("debug=tiny")
    assert (tiny.model.name, tiny.dataset.train_subset, tiny.dataset.test_subset, tiny.trainer.batch_size) == (
        "resnet8", 256, 500, 64)  # fmt: skip
    # The command line wins over the debug option; without one nothing changes.
    assert compose_config("debug=tiny", "model=wrn16_4", "trainer.batch_size=32").model.name == "wrn16_4"
    assert compose_config("debug=tiny", "trainer.batch_size=32").trainer.batch_size == 32
    default = compose_config()
    assert "debug" not in default and default.dataset.train_subset is None and default.model.name == "resnet20"
    # debug=preset keeps the preset's model and recipe: one step, batch 8 in groups of 4.
    preset = compose_config("experiment=table1/pyramidnet272_shakedrop", "dataset=cifar10", "debug=preset")
    assert (preset.model.name, preset.trainer.grad_clip, preset.trainer.max_steps, preset.trainer.batch_size,
            preset.trainer.m) == ("pyramidnet272_shakedrop", 5.0, 1, 8, 4)  # fmt: skip


# Every preset but Table 3's, which fine-tunes the pretrained weights it requires (model.pretrained_path): debug=tiny's
# ResNet-8 cannot take them; `debug=preset` tries that preset with its own model. Nor Table 2's: ImageNet streams
# from its folders, which takes no subset (the config's check refuses debug=tiny's dataset.train_subset there);
# tests/test_preset_smoke.py trains one with the subsets lifted.
PRESETS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
    if "recipe" not in p.parts and p.parent.name not in ("table2", "table3")
)


@pytest.mark.parametrize("preset", PRESETS)
def test_debug_tiny_shrinks_every_preset_to_a_run_of_seconds(preset):
    """debug/tiny.yaml promises a run of seconds for any preset: the preset's m (demo's 128) adapted to the batch of
    64, a few epochs whatever the preset's epochs and epoch_scale, and the preset's optimizer settings kept."""
    for optimizer in ("sgd", "sam"):
        cfg = compose_config(f"experiment={preset}", f"optimizer={optimizer}", "dataset.label_noise=0.2", "debug=tiny")
        validate(cfg, CPU)  # trainer.m divides the micro-batch, and every other rule holds
        epochs = cfg.trainer.epochs * cfg.trainer.epoch_scale
        assert 1 <= epochs <= 3 and cfg.trainer.batch_size == 64 and cfg.model.name == "resnet8"
        assert cfg.dataset.train_subset <= 256 and cfg.dataset.test_subset <= 500
