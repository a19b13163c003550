"""An epoch's training metrics from its sums (sam_repro/engine/metrics.py), against hand computations: the one formula
behind metrics.jsonl, steps.jsonl / W&B and the console."""

from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf

from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.loggers import Progress
from sam_repro.engine.metrics import DEVICE_SUMS, HOST_SUMS, EpochSums, EpochTotals, training_metrics

CPU = torch.device("cpu")


def tensor(value):
    return None if value is None else torch.tensor(value, dtype=torch.float64)


def step_stats(loss_sum, correct, count, perturbed=None, grad_norm=None, perturbation_norm=None):
    """One step's sums as `step.StepStats` carries them (0-dim tensors; None: a plain step)."""
    return types.SimpleNamespace(
        loss_sum=tensor(loss_sum),
        correct=tensor(correct),
        count=count,
        perturbed_loss_sum=tensor(perturbed),
        grad_norm=tensor(grad_norm),
        perturbation_norm=tensor(perturbation_norm),
    )


def test_sums_become_means_and_error_rates():
    # 20 examples, loss sum 30, 15 right; SAM kept 3 steps of 16 examples: perturbed loss sum 36 on a clean 24,
    # ||g|| summed 6, ||eps|| summed 0.15.
    sums = EpochSums(
        loss=30.0,
        correct=15.0,
        count=20.0,
        steps=4.0,
        perturbed=36.0,
        sam_loss=24.0,
        grad_norm=6.0,
        perturbation_norm=0.15,
        sam_count=16.0,
        sam_steps=3.0,
    )
    out = training_metrics(sums, sam=True)
    # the keys in metrics.jsonl's order
    assert list(out) == ["train_loss", "train_error", "perturbed_loss", "sharpness", "grad_norm", "perturbation_norm"]
    assert out["train_loss"] == 1.5  # 30 / 20
    assert out["train_error"] == 25.0  # 100 * (1 - 15 / 20)
    assert out["perturbed_loss"] == 2.25  # 36 / 16
    assert out["sharpness"] == 0.75  # (36 - 24) / 16: the same examples' perturbed minus clean loss
    assert out["grad_norm"] == 2.0  # 6 / 3 kept steps
    assert out["perturbation_norm"] == pytest.approx(0.05)  # 0.15 / 3 kept steps


def test_no_sam_metrics_without_sam_steps_kept():
    sums = EpochSums(loss=3.0, correct=1.0, count=4.0, steps=1.0)
    assert training_metrics(sums, sam=False) == {"train_loss": 0.75, "train_error": 75.0}
    # SAM steps taken, none kept (each one's first pass overflowed in fp16): nothing to divide by, nothing reported
    assert training_metrics(sums, sam=True) == {"train_loss": 0.75, "train_error": 75.0}


def test_a_vector_of_sums_is_read_by_name():
    sums = EpochSums.of([float(i) for i in range(10)])
    assert [getattr(sums, k) for k in (*DEVICE_SUMS, *HOST_SUMS)] == list(range(10))
    assert (sums.loss, sums.perturbation_norm, sums.count, sums.steps) == (0.0, 5.0, 8.0, 9.0)
    with pytest.raises(ValueError):
        EpochSums.of([0.0] * 9)  # a sum short: refused, never shifted


def test_epoch_totals_leave_non_finite_sam_steps_out_of_the_sam_metrics():
    totals = EpochTotals(CPU)
    totals.add(step_stats(8.0, 6, 10, perturbed=9.0, grad_norm=2.0, perturbation_norm=0.05))
    totals.add(step_stats(4.0, 7, 10, perturbed=float("inf"), grad_norm=float("nan"), perturbation_norm=float("inf")))
    totals.add(step_stats(6.0, 8, 10, perturbed=8.0, grad_norm=4.0, perturbation_norm=0.05))
    totals.add(step_stats(2.0, 9, 10))  # a plain step (SAM's schedule skipped it)
    local = totals.local()
    assert (local.loss, local.correct, local.count, local.steps) == (20.0, 30.0, 40, 4)
    assert (local.perturbed, local.sam_loss, local.sam_count, local.sam_steps) == (17.0, 14.0, 20.0, 2.0)
    out = totals.metrics()
    assert out["train_loss"] == 0.5  # 20 / 40: every step's clean loss
    assert out["train_error"] == 25.0  # 100 * (1 - 30 / 40)
    assert out["perturbed_loss"] == 0.85  # 17 / 20: the two kept steps
    assert out["sharpness"] == pytest.approx(0.15)  # (17 - 14) / 20
    assert out["grad_norm"] == 3.0  # (2 + 4) / 2
    assert out["perturbation_norm"] == pytest.approx(0.05)
    # a mid-epoch checkpoint of these sums resumes to the same metrics
    assert EpochTotals(CPU, totals.state_dict()).metrics() == out


def test_older_checkpoints_and_other_world_sizes_resume_to_the_same_sums():
    # before the masking of non-finite SAM steps a checkpoint kept every step: the SAM sums are the clean ones; and
    # ||eps|| was saved as "eps_norm"
    old = {"loss": 6.0, "correct": 3.0, "perturbed": 9.0, "grad_norm": 2.0, "eps_norm": 0.1, "count": 4, "steps": 2}
    old |= {"sam": True, "elapsed": 1.0}
    sums = EpochTotals(CPU, old).local()
    assert (sums.sam_loss, sums.sam_count, sums.sam_steps, sums.perturbation_norm) == (6.0, 4.0, 2.0, 0.1)
    assert "eps_norm" not in EpochTotals(CPU, old).state_dict()  # saved again under today's name
    # two ranks' sums resumed by one: added (the metrics are sums over ranks)
    other = EpochTotals(CPU, old).state_dict() | {"sam": False, "elapsed": 3.0}
    merged = EpochTotals.merge([old, other])
    assert merged["loss"] == 12.0 and merged["count"] == 8 and merged["sam_steps"] == 4.0
    assert merged["perturbation_norm"] == pytest.approx(0.2)  # the old name's 0.1 and today's 0.1
    assert merged["sam"] is True and merged["elapsed"] == 3.0
    assert EpochTotals(CPU, merged).metrics()["perturbed_loss"] == 2.25  # 18 / 8


def test_the_console_shows_the_same_loss_and_error():
    cfg = OmegaConf.create({"trainer": {"progress": "off", "log_every": 1}})
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU, backend="gloo", launcher="single")
    totals = EpochTotals(CPU)
    totals.add(step_stats(30.0, 15, 20))
    stats = Progress(cfg, env, 1, 1, 1)._stats(totals)
    assert (stats["loss"], stats["err"]) == ("1.5000", "25.00%")
