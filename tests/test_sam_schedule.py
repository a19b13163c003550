"""SAM's schedule (sam_repro/optim/sam_schedule.py, `step.ScheduledStep`): which steps are SAM steps, what the
others are, and that runs with a schedule resume exactly; and the stall warning (`loggers.StallWatch`)."""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from helpers.tiny_net import tiny_bn_mlp
from helpers.training import TINY, comparable, compose_config, read_metrics
from sam_repro.engine import trainer as trainer_module
from sam_repro.engine.checkpoint import load_checkpoint
from sam_repro.engine.loggers import StallWatch
from sam_repro.engine.step import ScheduledStep, StepContext, looksam_step, sam_step, sgd_step, step_function
from sam_repro.engine.trainer import train
from sam_repro.optim.factory import build_optimizer, build_sam_schedule
from sam_repro.optim.sam_schedule import SamSchedule, sam_schedule, uniform


def batches(steps: int, n: int = 8):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for _ in range(steps)
    ]


def optimizer_cfg(name: str, **extra):
    cfg = dict(name=name, base="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, weight_decay_mode="l2")
    if name != "sgd":
        cfg.update(rho=0.1, p=2, adaptive=name == "asam", eta=0.01 if name == "asam" else 0.0)
    if name == "looksam":
        cfg.update(k=2, alpha=0.7)
    return OmegaConf.create({**cfg, **extra})


def take_steps(step, model, optimizer, steps: int, m: int = 4) -> list:
    """`steps` steps of the step function `step` on `batches(steps)`, in groups of `m`; their StepStats."""
    ctx = StepContext(group_size=m, grad_clip=1.0)
    out = []
    for t, (x, y) in enumerate(batches(steps)):
        ctx.step = t
        out.append(step(model, optimizer, x, y, ctx))
    return out


def state(model: nn.Module, optimizer) -> list[torch.Tensor]:
    base = getattr(optimizer, "base_optimizer", optimizer)
    momentum = [base.state[p]["momentum_buffer"] for p in model.parameters() if p in base.state]
    return [*model.state_dict().values(), *momentum]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- which steps are SAM steps -------------------------------------------------------------------------------------


def test_sam_steps_happen_exactly_where_configured():
    assert [SamSchedule(start=5, every=3).is_sam_step(t) for t in range(12)] == [
        t >= 5 and (t - 5) % 3 == 0 for t in range(12)
    ]
    assert sam_schedule(1.5, 1, 1.0, steps_per_epoch=8, seed=0).start == 12  # epochs to steps
    assert SamSchedule().always and not SamSchedule(start=1).always
    random_sam = SamSchedule(probability=0.3, seed=7)
    draws = [random_sam.is_sam_step(t) for t in range(20_000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.015  # 4.6 standard deviations of a binomial share
    assert draws == [SamSchedule(probability=0.3, seed=7).is_sam_step(t) for t in range(20_000)]  # keyed, no state
    assert draws != [SamSchedule(probability=0.3, seed=8).is_sam_step(t) for t in range(20_000)]
    assert all(0 <= uniform(3, t) < 1 for t in range(1000))


def test_the_paper_schedule_is_the_sam_step_itself():
    assert step_function("sam", SamSchedule()) is sam_step
    assert step_function("asam", None) is sam_step
    assert step_function("looksam", SamSchedule()) is looksam_step
    assert step_function("sgd", SamSchedule(start=3)) is sgd_step
    assert isinstance(step_function("sam", SamSchedule(start=3)), ScheduledStep)


def test_sam_start_0_equals_sam_bit_for_bit():
    a, b = tiny_bn_mlp().double(), tiny_bn_mlp().double()
    opt_a, opt_b = build_optimizer(optimizer_cfg("sam"), a), build_optimizer(optimizer_cfg("sam"), b)
    take_steps(sam_step, a, opt_a, 4)
    take_steps(ScheduledStep(sam_step, SamSchedule(start=0)), b, opt_b, 4)
    assert_bitwise(state(a, opt_a), state(b, opt_b))


@pytest.mark.parametrize("name", ["sam", "asam", "looksam"])
def test_steps_before_the_start_are_sgd_steps_bit_for_bit(name):
    sgd_model, sam_model = tiny_bn_mlp().double(), tiny_bn_mlp().double()
    sgd = build_optimizer(optimizer_cfg("sgd"), sgd_model)
    sam = build_optimizer(optimizer_cfg(name), sam_model)
    step = step_function(name, SamSchedule(start=3))
    plain = take_steps(step, sam_model, sam, 3)
    take_steps(sgd_step, sgd_model, sgd, 3)
    assert_bitwise(state(sgd_model, sgd), state(sam_model, sam))
    assert all(s.passes == 1 and s.perturbed_loss_sum is None for s in plain)
    if name == "looksam":
        assert sam.steps_taken == 0  # its own cycle of k starts with SAM's start: the first SAM step is a full one


def test_sam_every_k_alternates_and_the_passes_are_counted():
    model = tiny_bn_mlp().double()
    opt = build_optimizer(optimizer_cfg("sam"), model)
    stats = take_steps(step_function("sam", SamSchedule(start=1, every=2)), model, opt, 7)
    assert [s.passes for s in stats] == [1, 2, 1, 2, 1, 2, 1]
    assert [s.perturbed_loss_sum is not None for s in stats] == [p == 2 for p in (1, 2, 1, 2, 1, 2, 1)]


def test_the_schedule_comes_from_the_config():
    cfg = optimizer_cfg("sam", sam_start=0.5, sam_every=2, sam_probability=0.5)
    assert build_sam_schedule(cfg, steps_per_epoch=10, seed=3) == SamSchedule(start=5, every=2, probability=0.5, seed=3)
    assert build_sam_schedule(optimizer_cfg("sgd"), steps_per_epoch=10, seed=3) is None


# ---- through the trainer: resume mid-warm-start, the counted passes ------------------------------------------------

RUN = [*TINY, "trainer.device=cpu", "trainer.progress=off", "optimizer=sam", "trainer.epochs=3"]


def stop_at(monkeypatch, stop_step: int) -> None:
    """SIGTERM to this process during step `stop_step` (the trainer checkpoints after it and exits 143)."""

    def choose(name, schedule):
        take = step_function(name, schedule)

        def step(model, optimizer, x, y, ctx):
            if ctx.step == stop_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return take(model, optimizer, x, y, ctx)

        return step

    monkeypatch.setattr(trainer_module, "step_function", choose)


@pytest.mark.data
@pytest.mark.parametrize("schedule", [["optimizer.sam_start=1.5"], ["optimizer.sam_probability=0.5"]])
def test_a_run_resumed_mid_schedule_equals_the_uninterrupted_run(tmp_path, monkeypatch, schedule):
    cfg = compose_config(*RUN, *schedule)  # 4 steps per epoch: sam_start=1.5 makes steps 0-5 plain
    whole = train(cfg, tmp_path / "whole")
    with monkeypatch.context() as patch:
        stop_at(patch, stop_step=4)  # in the warm start, in the middle of epoch 2
        with pytest.raises(SystemExit) as stopped:
            train(cfg, tmp_path / "resumed")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 5
    resumed = train(cfg, tmp_path / "resumed")

    assert comparable(read_metrics(tmp_path / "resumed")) == comparable(read_metrics(tmp_path / "whole"))
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert_bitwise(list(a["model"].values()), list(b["model"].values()))
    steps = 12
    sam_steps = sum(build_sam_schedule(cfg.optimizer, 4, cfg.seed).is_sam_step(t) for t in range(steps))
    assert whole["passes"] == resumed["passes"] == steps + sam_steps  # 1 per plain step, 2 per SAM step
    assert read_metrics(tmp_path / "whole")[-1]["passes"] == steps + sam_steps
    if schedule == ["optimizer.sam_start=1.5"]:
        assert sam_steps == 6


# ---- the stall warning -----------------------------------------------------------------------------------------------


def test_stall_watch_says_it_once_after_the_streak_and_only_while_sam_runs():
    chance = math.log(10)
    watch = StallWatch(10, epochs=3)
    said = [watch.update(e, chance * 1.01, sam_active=True) for e in range(1, 8)]
    assert [s is not None for s in said] == [False, False, True, False, False, False, False]
    assert "optimizer.sam_start" in said[2] and "schedule.warmup_epochs" in said[2] and "\n" not in said[2]

    watch = StallWatch(10, epochs=3)  # a streak broken by one epoch off the plateau starts again
    losses = [chance, chance, 2.0, chance, chance]
    assert not any(watch.update(e, loss, sam_active=True) for e, loss in enumerate(losses))
    watch = StallWatch(10, epochs=3)  # plain steps (SGD, or SAM before its start) are not SAM's stall
    assert not any(watch.update(e, chance, sam_active=False) for e in range(10))
    assert not any(StallWatch(10, epochs=0).update(e, chance, sam_active=True) for e in range(10))
    watch = StallWatch(10, epochs=3)  # 2% of ln 10 is 0.046
    assert not any(watch.update(e, chance - 0.05, sam_active=True) for e in range(10))


@pytest.mark.data
def test_the_stall_warning_fires_on_a_run_built_to_stall_and_not_on_a_normal_one(tmp_path, caplog):
    args = [*TINY, "trainer.device=cpu", "trainer.progress=off", "optimizer=sam", "trainer.epochs=8"]
    args += ["trainer.stall_epochs=3", "trainer.eval_every=8"]
    stalled = train(compose_config(*args, "optimizer.rho=5"), tmp_path / "stalled")  # rho far too large
    lines = [r.getMessage() for r in caplog.records if "SAM stall" in r.getMessage()]
    assert len(lines) == 1 and stalled["stall_warning"] == lines[0]
    caplog.clear()
    normal = train(compose_config(*args), tmp_path / "normal")
    assert not [r for r in caplog.records if "SAM stall" in r.getMessage()]
    assert "stall_warning" not in normal
    assert copy.deepcopy(normal)["status"] == "finished"
