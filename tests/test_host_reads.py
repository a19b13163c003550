"""Host reads of the training step (sam_repro/engine/host_reads.py), counted on the CPU: none in fp32 and bf16, and
exactly one in fp16 (GradScaler.step's read of found_inf, kept by design). On a GPU each read is a synchronisation;
`pytest -m cuda` (tests/test_cuda.py) counts them there with CUDA's own sync debug mode too."""

from __future__ import annotations

import pytest
import torch

from helpers import step_variants
from sam_repro.acceptance import checks
from sam_repro.engine.host_reads import HostReads
from sam_repro.engine.step import sgd_step
from sam_repro.models import create_model


def test_the_counter_sees_each_kind_of_read():
    x = torch.arange(4.0)
    with HostReads(count_cpu=True) as reads:
        x.sum().item()
        bool(x.sum() > 0)
        torch.equal(x, x)
        x.nonzero()
        x[x > 1]
        x + 1  # not a read
    assert [op for op, _ in reads.reads] == ["_local_scalar_dense", "_local_scalar_dense", "equal", "nonzero", "index"]
    with HostReads() as reads:  # by default a CPU tensor's value is already on the host
        x.sum().item()
    assert reads.reads == []


@pytest.mark.parametrize("precision", step_variants.PRECISIONS)
@pytest.mark.parametrize("name", step_variants.OPTIMIZERS)
def test_step_reads_nothing_but_fp16s_found_inf(name, precision):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    opt = step_variants.optimizer(name, model)
    ctx = step_variants.context(precision, torch.device("cpu"), group_size=8)
    step = step_variants.STEPS[name]
    counts = []
    for i in range(3):  # LookSAM (k = 2): full, plain, full; the first step creates the momentum buffers
        ctx.step = i
        with HostReads(count_cpu=True) as reads:
            step(model, opt, x, y, ctx)
        counts.append(len(reads.reads))
    assert counts == [1 if precision == "fp16" else 0] * 3, reads.reads


def test_a_read_added_to_the_step_is_counted(monkeypatch):
    """The test above can fail: a step that reads its loss (as a logging line might) counts one more."""
    from sam_repro.engine import step as step_module

    real = step_module._loss

    def reading_loss(*args, **kwargs):
        loss, logits = real(*args, **kwargs)
        float(loss.detach())
        return loss, logits

    monkeypatch.setattr(step_module, "_loss", reading_loss)
    model = create_model("resnet8", num_classes=10)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    with HostReads(count_cpu=True) as reads:
        sgd_step(model, step_variants.optimizer("sgd", model), x, y, step_variants.context("fp32", x.device, 8))
    assert len(reads.reads) == 1


def test_the_gpu_checks_count_runs_on_the_cpu():
    """The GPU check's own code, the dispatcher's count only: fp16's one read is expected, nothing else."""
    status, detail = checks.no_synchronisation(checks.CheckEnv(torch.device("cpu"), smoke=True))
    assert status == "passed", detail
    assert "sam_step fp16: 1 (expected 1" in detail and "sam_step bf16: 0 (expected 0)" in detail
