"""The model zoo (sam_repro/models) against published parameter counts, closed forms and a second computation."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import sam_repro
from sam_repro.errors import CheckpointError, ConfigError, DataError
from sam_repro.models import (
    CifarResNet,
    PyramidNet,
    ShakeDrop,
    ShakeShake,
    ShakeShakeResNet,
    WideResNet,
    architecture_defaults,
    convert_sync_batchnorm,
    create_model,
    list_models,
    make_norm,
    set_true_gradient,
)

CONFIG_DIR = Path(sam_repro.__file__).parent / "configs"
MODEL_CONFIGS = sorted((CONFIG_DIR / "model").glob("*.yaml"))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_on_meta(name: str, num_classes: int = 10, **kwargs) -> int:
    """Parameter count without allocating or initialising the weights (fast for the 60 M-parameter models)."""
    return _count_on_meta(name, num_classes, tuple(sorted(kwargs.items())))


@functools.cache
def _count_on_meta(name: str, num_classes: int, kwargs: tuple) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes, **dict(kwargs)))


# Tiny members of every CIFAR family (a fraction of a second each on one core), two of them with stochastic layers.
TINY = {
    "resnet": lambda **kw: CifarResNet(depth=8, **kw),
    "wide_resnet": lambda **kw: WideResNet(depth=16, widen_factor=1, **kw),
    "shake_shake": lambda **kw: ShakeShakeResNet(depth=14, width=8, **kw),
    "pyramidnet_shakedrop": lambda **kw: PyramidNet(depth=11, alpha=12, bottleneck=True, shakedrop=True, **kw),
    "pyramidnet_basic": lambda **kw: PyramidNet(depth=8, alpha=8, bottleneck=False, **kw),
}
STOCHASTIC = ["shake_shake", "pyramidnet_shakedrop"]


# --- parameter counts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, num_classes, published",
    [
        ("wrn28_10", 10, 36.5e6),  # Zagoruyko & Komodakis 2016, Table 5
        ("shake_shake_26_2x96d", 10, 26.2e6),  # Gastaldi 2017, Table 1
        ("pyramidnet272", 10, 26.0e6),  # Han et al. 2017, Table 4 (bottleneck, alpha 200); ShakeDrop adds none
        ("resnet32", 10, 0.46e6),  # He et al. 2016, Table 6
        ("resnet50", 1000, 25.6e6),  # He et al. 2016 (ImageNet), as timm
    ],
)
def test_default_configurations_within_one_percent_of_published_counts(name, num_classes, published):
    assert abs(count_on_meta(name, num_classes) / published - 1) < 0.01


@pytest.mark.parametrize(
    "name, overrides, num_classes, published_millions",
    [
        # The exact architecture of each paper reproduces its count to the printed precision.
        ("wrn28_10", {"shortcut": "conv"}, 10, 36.5),
        ("wrn16_8", {"shortcut": "conv"}, 10, 11.0),
        ("wrn16_4", {"shortcut": "conv"}, 10, 2.7),
        ("wrn40_2", {"shortcut": "conv"}, 10, 2.2),
        ("pyramidnet272", {"width_rounding": "floor"}, 10, 26.0),
        ("pyramidnet272", {"width_rounding": "floor", "depth": 200, "alpha": 240}, 10, 26.6),
        ("pyramidnet110", {"width_rounding": "floor"}, 10, 1.7),
        ("shake_shake_26_2x96d", {}, 10, 26.2),
        ("shake_shake_26_2x32d", {}, 10, 2.9),
        ("shake_shake_26_2x32d", {"width": 64}, 10, 11.7),
        ("resnet20", {}, 10, 0.27),
        ("resnet44", {}, 10, 0.66),
        ("resnet56", {}, 10, 0.85),
        ("resnet110", {}, 10, 1.7),
        ("resnet101", {}, 1000, 44.5),
        ("resnet152", {}, 1000, 60.2),
        ("efficientnet_b0", {}, 1000, 5.3),
    ],
)
def test_counts_round_to_the_published_values(name, overrides, num_classes, published_millions):
    decimals = len(str(published_millions).split(".")[1])
    assert round(count_on_meta(name, num_classes, **overrides) / 1e6, decimals) == published_millions


def test_wide_resnet_shortcut_variants_differ_by_the_three_projection_convs():
    # The official shortcut is parameter-free; the projection variant adds one bias-free 1x1 conv per group.
    k = 10
    projections = 16 * 16 * k + 16 * k * 32 * k + 32 * k * 64 * k
    assert count_on_meta("wrn28_10", shortcut="conv") - count_on_meta("wrn28_10") == projections == 258_560


def test_pyramidnet_rounding_adds_the_official_two_hundred_thousand_parameters():
    difference = count_on_meta("pyramidnet272") - count_on_meta("pyramidnet272", width_rounding="floor")
    assert 0.1e6 < difference < 0.3e6


# --- shapes, normalization, initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_forward_shapes_for_cifar_fashion_mnist_and_odd_sizes(family, norm):
    torch.manual_seed(0)
    rgb = TINY[family](num_classes=10, in_channels=3, norm=norm)
    gray = TINY[family](num_classes=7, in_channels=1, norm=norm)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    gray.eval()
    assert gray(torch.randn(2, 1, 15, 13)).shape == (2, 7)


@pytest.mark.parametrize("family", sorted(TINY))
def test_global_pooling_is_a_mean_with_a_deterministic_backward(family):
    """No `nn.AdaptiveAvgPool2d` (its CUDA backward has no deterministic implementation, so
    `trainer.deterministic=true` would stop on a GPU); the mean pools exactly as it did, in float64."""
    model = TINY[family](num_classes=10, in_channels=3, norm="batch").double()
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    (pool,) = [m for m in model.modules() if type(m).__name__ == "GlobalAvgPool"]
    x = torch.randn(3, 16, 7, 5, dtype=torch.float64, requires_grad=True)
    ours, ref = pool(x), nn.AdaptiveAvgPool2d(1)(x)
    assert ours.shape == ref.shape and torch.allclose(ours, ref, rtol=1e-12, atol=0)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g_ours, g_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", sorted(TINY))
def test_batchnorm_is_plain_with_flax_momentum_and_epsilon(family):
    norms = [m for m in TINY[family](num_classes=10).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    # torch momentum 0.1 weighs the new batch; flax momentum 0.9 weighs the running average: the same update.
    assert all(m.momentum == 0.1 and m.eps == 1e-5 and m.track_running_stats for m in norms)


def test_make_norm_choices():
    assert isinstance(make_norm("batch", 64), nn.BatchNorm2d)
    assert make_norm("group", 160).num_groups == 32
    assert make_norm("group", 24).num_groups == 8
    assert make_norm("group", 19).num_groups == 1
    assert isinstance(make_norm("none", 64), nn.Identity)
    with pytest.raises(ConfigError, match="model.norm"):
        make_norm("layer", 64)


@pytest.mark.parametrize("family", sorted(TINY))
def test_norm_none_has_no_normalization_biased_convs_and_trains(family):
    torch.manual_seed(0)
    model = TINY[family](num_classes=10, norm="none")
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    model.eval()  # deterministic stochastic layers, so the two losses are comparable
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = F.cross_entropy(model(x), y)
    before.backward()
    optimizer.step()
    after = F.cross_entropy(model(x), y)
    assert after < before - 1e-3
    # Every parameter tensor receives a gradient somewhere (zero-initialised branch ends unlock the rest next step).
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("norm", ["group", "none"])
def test_batch_independent_norms_give_per_example_outputs(family, norm):
    # What `group`/`none` are for: an example's output does not depend on the rest of the batch. (Eval mode only
    # fixes the stochastic layers' draws; these norms compute the same in both modes.)
    torch.manual_seed(0)
    model = TINY[family](num_classes=10, norm=norm).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-5, atol=1e-6)


def test_official_initialisation():
    torch.manual_seed(0)
    model = WideResNet(depth=16, widen_factor=4, num_classes=100)
    dense = model.classifier[-1]
    bound = 1 / math.sqrt(100)
    assert dense.weight.abs().max() <= bound and dense.weight.abs().max() > 0.95 * bound
    assert torch.all(dense.bias == 0)
    big = model.blocks[-1].conv2  # 256 -> 256, 3x3: Kaiming normal, fan_out, gain 2
    expected_std = math.sqrt(2.0 / (256 * 9))
    assert abs(big.weight.std().item() / expected_std - 1) < 0.02


@pytest.mark.parametrize("family", sorted(TINY))
def test_norm_none_blocks_start_as_their_parameter_free_shortcut(family):
    torch.manual_seed(0)
    model = TINY[family](num_classes=10, norm="none").eval()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda block, inputs, output: seen.append((block, inputs[0], output)))
    model(torch.randn(2, 3, 16, 16))
    checked = 0
    for block, x, out in seen:
        strided = out.shape[2:] != x.shape[2:]
        projected = isinstance(getattr(block, "shortcut", None), nn.Module) or getattr(block, "projection", None)
        if strided or projected or getattr(block, "shortcut_from_activated", False):
            continue
        # Identity (He et al.: relu of a non-negative input) plus zero channels where the width grows.
        channels = x.shape[1]
        torch.testing.assert_close(out[:, :channels], x)
        assert torch.all(out[:, channels:] == 0)
        checked += 1
    assert checked > 0


# --- stochastic layers ------------------------------------------------------------------------------------------


def shake_shake_coefficients(true_gradient: bool, batch: int = 4000):
    """Forward and backward coefficients of branch a, read off with a = 1, b = 0."""
    layer = ShakeShake().train()
    layer.true_gradient = true_gradient
    a = torch.ones(batch, 1, 1, 1, requires_grad=True)
    b = torch.zeros(batch, 1, 1, 1, requires_grad=True)
    out = layer(a, b)
    out.sum().backward()
    return out.detach().flatten(), a.grad.flatten(), b.grad.flatten()


def test_shake_shake_coefficients():
    torch.manual_seed(0)
    alpha, beta, beta_b = shake_shake_coefficients(true_gradient=False)
    n = alpha.numel()
    for u in (alpha, beta):  # U[0, 1]: mean 1/2, variance 1/12
        assert u.min() >= 0 and u.max() <= 1
        assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    torch.testing.assert_close(beta + beta_b, torch.ones(n))  # the branches get beta and 1 - beta
    assert abs(torch.corrcoef(torch.stack([alpha, beta]))[0, 1]) < 4 / math.sqrt(n)  # independent draws

    alpha, grad, _ = shake_shake_coefficients(true_gradient=True)
    assert torch.equal(alpha, grad)


def test_shake_shake_eval_is_the_expectation():
    layer = ShakeShake().eval()
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    state = torch.get_rng_state()
    torch.testing.assert_close(layer(a, b), 0.5 * (a + b))
    assert torch.equal(torch.get_rng_state(), state)  # no draw in eval mode


def shake_drop_coefficients(layer: ShakeDrop, batch: int = 4000):
    x = torch.ones(batch, 1, 1, 1, requires_grad=True)
    out = layer.train()(x)
    out.sum().backward()
    return out.detach().flatten(), x.grad.flatten()


@pytest.mark.parametrize("keep_prob", [0.0, 0.3, 1.0])
def test_shake_drop_coefficients(keep_prob):
    torch.manual_seed(0)
    layer = ShakeDrop(keep_prob, alpha_range=(-1.0, 1.0), beta_range=(0.0, 1.0))
    forward, backward = shake_drop_coefficients(layer)
    n = forward.numel()
    kept = forward == 1.0
    assert torch.equal(kept, backward == 1.0)  # one Bernoulli gate for both passes
    assert abs(kept.float().mean() - keep_prob) <= 4 * math.sqrt(keep_prob * (1 - keep_prob) / n) + 1e-9
    dropped = ~kept
    if dropped.any():
        assert forward[dropped].min() >= -1 and forward[dropped].max() <= 1
        assert backward[dropped].min() >= 0 and backward[dropped].max() <= 1
    # Eval scales by the expectation of the forward coefficient: keep_prob + E[alpha] (1 - keep_prob).
    eval_coefficient = layer.eval()(torch.ones(1)).item()
    assert eval_coefficient == pytest.approx(keep_prob)
    assert abs(forward.mean() - eval_coefficient) < 4 * forward.std() / math.sqrt(n) + 1e-9

    layer.true_gradient = True
    forward, backward = shake_drop_coefficients(layer)
    assert torch.equal(forward, backward)


def test_shake_drop_eval_uses_the_alpha_range_mean():
    layer = ShakeDrop(0.25, alpha_range=(0.0, 1.0)).eval()
    assert layer(torch.ones(1)).item() == pytest.approx(0.25 + 0.5 * 0.75)


def test_pyramidnet_shakedrop_follows_the_linear_decay_rule():
    model = PyramidNet(depth=20, alpha=12, bottleneck=True, shakedrop=True, final_keep_prob=0.5)
    keep = [m.keep_prob for m in model.modules() if isinstance(m, ShakeDrop)]
    n = len(keep)
    assert n == 6
    assert keep == pytest.approx([1 - (layer / n) * 0.5 for layer in range(1, n + 1)])
    assert keep[-1] == 0.5


@pytest.mark.parametrize("family", STOCHASTIC)
def test_eval_mode_is_deterministic(family):
    torch.manual_seed(0)
    model = TINY[family](num_classes=10).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert torch.equal(first, model(x))


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", STOCHASTIC)
def test_restoring_the_rng_replays_output_and_gradient(family):
    # SAM's two passes must see the same noise: the engine restores the RNG state before the second pass.
    torch.manual_seed(0)
    model = TINY[family](num_classes=10).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    state = torch.get_rng_state()
    out1, grads1 = forward_backward(model, x, y)
    out_fresh, _ = forward_backward(model, x, y)
    assert not torch.equal(out1, out_fresh)  # new draws without the restore (the test can fail)
    torch.set_rng_state(state)
    out2, grads2 = forward_backward(model, x, y)
    assert torch.equal(out1, out2)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(grads1, grads2))


@pytest.mark.parametrize("family", STOCHASTIC)
def test_true_gradient_changes_the_gradient_not_the_forward(family):
    torch.manual_seed(0)
    model = TINY[family](num_classes=10).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    state = torch.get_rng_state()
    out_shake, grads_shake = forward_backward(model, x, y)
    torch.set_rng_state(state)
    assert set_true_gradient(model, True) == sum(isinstance(m, (ShakeShake, ShakeDrop)) for m in model.modules()) > 0
    out_true, grads_true = forward_backward(model, x, y)
    # Same draws for every layer: the flag must not shift the random stream.
    assert torch.equal(out_shake, out_true)
    assert not all(torch.equal(a, b) for a, b in zip(grads_shake, grads_true))
    set_true_gradient(model, False)
    assert not any(getattr(m, "true_gradient", False) for m in model.modules())


@pytest.mark.parametrize("family", STOCHASTIC)
def test_true_gradient_is_the_gradient_of_the_sampled_network(family):
    """Second computation: a central finite difference, replaying the same noise at w +- h d (float64)."""
    torch.manual_seed(0)
    model = TINY[family](num_classes=5, norm="group").double().train()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    direction = [d / norm for d in direction]  # unit step: h stays far below the distance to the nearest ReLU kink
    state = torch.get_rng_state()

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=step)
            torch.set_rng_state(state)
            value = F.cross_entropy(model(x), y).item()
            for p, d in zip(params, direction):
                p.sub_(d, alpha=step)
        return value

    h = 1e-6
    finite_difference = (loss_at(h) - loss_at(-h)) / (2 * h)

    def directional_derivative(true_gradient: bool) -> float:
        set_true_gradient(model, true_gradient)
        torch.set_rng_state(state)
        _, grads = forward_backward(model, x, y)
        return sum((g * d).sum() for g, d in zip(grads, direction)).item()

    assert directional_derivative(True) == pytest.approx(finite_difference, rel=1e-5)
    assert directional_derivative(False) != pytest.approx(finite_difference, rel=1e-2)


# --- registry and configs ---------------------------------------------------------------------------------------


def test_registry_errors_name_the_key():
    with pytest.raises(ConfigError, match="wrn28_10"):
        create_model("wrn28-10", 10)
    with pytest.raises(ConfigError, match="model.widen"):
        create_model("wrn28_10", 10, widen=8)
    with pytest.raises(ConfigError, match="model.norm"):
        create_model("resnet20", 10, norm="layer")
    with pytest.raises(ConfigError, match="model.norm"):
        create_model("resnet50", 10, norm="none")
    with pytest.raises(ConfigError, match="model.depth"):
        create_model("wrn28_10", 10, depth=27)
    with pytest.raises(ConfigError, match="model.shortcut"):
        create_model("wrn28_10", 10, shortcut="1x1")


def test_every_registered_model_has_a_config_and_back():
    assert sorted(path.stem for path in MODEL_CONFIGS) == list_models()


def compose_model_config(path: Path, num_classes: int, in_channels: int):
    cfg = OmegaConf.create({"dataset": {"num_classes": num_classes, "in_channels": in_channels}})
    cfg.model = OmegaConf.load(path)
    return cfg


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda path: path.stem)
def test_config_spells_out_the_registry_architecture(path):
    model = OmegaConf.to_container(compose_model_config(path, num_classes=10, in_channels=3).model, resolve=True)
    assert model.pop("_target_") == "sam_repro.models.create_model"
    assert model.pop("name") == path.stem
    assert (model.pop("num_classes"), model.pop("in_channels"), model.pop("norm")) == (10, 3, "batch")
    expected = {key: list(v) if isinstance(v, tuple) else v for key, v in architecture_defaults(path.stem).items()}
    assert model == expected


# Built through hydra (on the meta device: structure only); the large ones are covered by the test above and their
# parameter counts by the tests at the top.
SMALL_CONFIGS = [
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "wrn16_4",
    "wrn40_2",
    "shake_shake_26_2x32d",
    "pyramidnet110",
    "pyramidnet110_shakedrop",
    "efficientnet_b0",
]


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_config_instantiates_the_registry_model(name):
    cfg = compose_model_config(CONFIG_DIR / "model" / f"{name}.yaml", num_classes=10, in_channels=3)
    with torch.device("meta"):
        from_config = instantiate(cfg.model)
        from_registry = create_model(name, 10, 3)
    assert repr(from_config) == repr(from_registry)  # every module with its hyperparameters (keep_prob, eps, ...)
    assert count_parameters(from_config) == count_parameters(from_registry)


def test_config_fills_classes_and_channels_from_the_dataset():
    cfg = compose_model_config(CONFIG_DIR / "model" / "resnet8.yaml", num_classes=7, in_channels=1)
    model = instantiate(cfg.model)
    assert model.stem[0].in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_root_config_composes_a_model():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=["model=resnet8", "model.norm=group"])
    model = instantiate(cfg.model)
    assert isinstance(model, CifarResNet)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model.classifier[-1].out_features == cfg.dataset.num_classes


# --- timm models ------------------------------------------------------------------------------------------------


def test_imagenet_resnet_zero_initialises_the_last_batchnorm_of_each_block():
    torch.manual_seed(0)
    model = create_model("resnet50", 1000)
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 3 + 4 + 6 + 3
    assert all(torch.all(block.bn3.weight == 0) for block in blocks)
    assert all(torch.all(block.bn1.weight == 1) for block in blocks)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet20"])
def test_sync_batchnorm_keeps_every_layer_and_its_activation(name):
    # trainer.sync_bn: timm's BatchNormAct2d (norm + SiLU in one module) must stay norm + SiLU. No process group is
    # needed: without one, SyncBatchNorm normalizes locally, so the converted network computes what the original does.
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    model = create_model(name, 10)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    x = torch.randn(4, 3, 32, 32)
    expected = {mode: copy.deepcopy(model).train(mode)(x) for mode in (False, True)}
    converted = convert_sync_batchnorm(model)
    after = dict(converted.named_modules())
    assert before and all(isinstance(after[n], nn.SyncBatchNorm) for n in before)
    fused = [n for n, m in before.items() if isinstance(m, BatchNormAct2d)]
    assert bool(fused) == (name == "efficientnet_b0")
    for n in fused:
        assert isinstance(after[n], SyncBatchNormAct) and after[n].act is before[n].act
        assert after[n].drop is before[n].drop
    assert name != "efficientnet_b0" or any(isinstance(before[n].act, nn.SiLU) for n in fused)
    for mode in (False, True):  # eval first: a training forward updates the running statistics
        torch.testing.assert_close(converted.train(mode)(x), expected[mode], rtol=0, atol=0)


@pytest.fixture(scope="module")
def efficientnet_b0_weights(tmp_path_factory):
    torch.manual_seed(0)
    source = create_model("efficientnet_b0", 1000)
    path = tmp_path_factory.mktemp("weights") / "tf_efficientnet_b0.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_efficientnet_loads_local_weights_and_replaces_a_mismatched_head(efficientnet_b0_weights):
    path, source = efficientnet_b0_weights
    torch.manual_seed(1)
    model = create_model("efficientnet_b0", 10, pretrained_path=str(path))
    assert model.classifier.out_features == 10
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in source.items() if not key.startswith("classifier."))
    same_head = create_model("efficientnet_b0", 1000, pretrained_path=str(path))
    assert torch.equal(same_head.classifier.weight, source["classifier.weight"])


def test_pretrained_weights_errors(efficientnet_b0_weights, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(DataError, match=str(missing)):
        create_model("efficientnet_b0", 10, pretrained_path=str(missing))
    path, _ = efficientnet_b0_weights
    with pytest.raises(CheckpointError, match=str(path)):
        create_model("efficientnet_b1", 10, pretrained_path=str(path))
