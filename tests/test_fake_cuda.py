"""Device placement on every CPU run: the training step in each variant and a few steps of the trainer's loop (the
device-resident loader, augmentation, the step, the schedule, evaluation sums) on fake `cuda:0` tensors.

A test fails on any operation that mixes devices (FakeTensorMode raises as a GPU would), on any host read in a step
beyond fp16's one by design (`HostReads`: `.item()`, `bool(t)`, device-to-host copies, value-shaped ops), and on
any state (optimizer state, BatchNorm statistics, the step's sums) left off the device. What fake tensors cannot
show (values, the backward kernels, synchronisations inside PyTorch's C++) is listed in tests/helpers/fake_cuda.py;
`pytest -m cuda` (tests/test_cuda.py) checks those on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from helpers import step_variants
from helpers.fake_cuda import DEVICE, fake_cuda
from sam_repro.data.augment import BatchAugment
from sam_repro.data.loader import EvalLoader, TrainLoader
from sam_repro.engine import step as step_module
from sam_repro.engine.compat import torch_release
from sam_repro.engine.evaluation import _summed_cross_entropy, evaluation_sums
from sam_repro.engine.host_reads import HostReads
from sam_repro.models import create_model
from sam_repro.optim.factory import create_schedule

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]

# Before PyTorch 2.10, FakeTensorMode constant-propagates `.to("cuda:0")` of a real tensor: it runs the real copy,
# which asks for the CUDA driver ("Found no NVIDIA driver on your system") instead of making a fake CUDA tensor
# (2.10 skips that when no CUDA device is there, pytorch/pytorch#160431). Every test below failed so on 2.5.1
# (scripts/torch_versions.py); 2.9.0's fake_tensor.py still const-propagates, and all of them passed on 2.10.0.
pytestmark = pytest.mark.skipif(
    torch_release() < (2, 10),
    reason=f"torch {torch.__version__}: FakeTensorMode before 2.10 runs the real copy for .to('cuda:0') of a real "
    "tensor, which needs a CUDA driver (pytorch/pytorch#160431)",
)


def off_device(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stats) -> list[str]:
    """Names of the tensors a step leaves anywhere but on DEVICE."""
    named = [*model.named_parameters(), *model.named_buffers()]
    named += [(f"optimizer state {k}", v) for s in optimizer.state.values() for k, v in s.items()]
    named += [(f"stats.{k}", v) for k, v in vars(stats).items()]
    return [name for name, t in named if isinstance(t, torch.Tensor) and t.device != DEVICE]


def steps_on_fake_cuda(
    model_name: str, optimizer: str, precision: str, steps: int = 3, channels_last: bool = False, **arch
):
    """`steps` steps of one variant on fake CUDA; returns the host reads of each step and what was left off the
    device."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **arch)
    with fake_cuda():
        model = model.to(DEVICE, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        x, y = torch.randn(16, 3, 8, 8, device=DEVICE), torch.randint(0, 10, (16,), device=DEVICE)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt = step_variants.optimizer(optimizer, model)
        ctx = step_variants.context(precision, DEVICE, group_size=8)
        reads = []
        for i in range(steps):
            ctx.step = i
            with HostReads(answer=0.0) as counted:  # answer: the scaler's found_inf, read as 0 (no overflow)
                stats = step_variants.STEPS[optimizer](model, opt, x, y, ctx)
            reads.append(counted.reads)
        return reads, off_device(model, opt, stats)


@pytest.mark.parametrize("precision", step_variants.PRECISIONS)
@pytest.mark.parametrize("optimizer", step_variants.OPTIMIZERS)
def test_step_variants_stay_on_the_device(optimizer, precision):
    reads, off = steps_on_fake_cuda("resnet8", optimizer, precision)
    expected = [("_local_scalar_dense", "cuda:0")] if precision == "fp16" else []  # GradScaler.step's found_inf
    assert reads == [expected] * 3
    assert off == []


@pytest.mark.parametrize(
    "model_name, arch",
    [
        ("resnet8", {}),
        ("shake_shake_26_2x96d", {"depth": 8, "width": 8}),
        ("pyramidnet110_shakedrop", {"depth": 8, "alpha": 8}),
    ],
)
def test_channels_last_and_stochastic_layers_stay_on_the_device(model_name, arch):
    reads, off = steps_on_fake_cuda(model_name, "sam", "bf16", steps=2, channels_last=True, **arch)
    assert reads == [[], []] and off == []


def test_a_few_trainer_steps_on_the_device_loader():
    """The trainer's loop for two epochs of two steps: the device-resident loader (gathers, crop, flip, normalise on
    the device), SAM in bf16, the schedule, and evaluation's sums. No host read in any step; the loader's one copy
    per epoch is host to device."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    with fake_cuda():
        model = model.to(DEVICE)
        augment = BatchAugment({"crop": True, "pad": 4, "flip": True}, MEAN, STD, (16, 16))
        loader = TrainLoader(images.to(DEVICE), labels.to(DEVICE), 32, augment, seed=0)
        test = EvalLoader(images[:40].to(DEVICE), labels[:40].to(DEVICE), 16, MEAN, STD)
        opt = step_variants.optimizer("sam", model)
        schedule = create_schedule(opt, "cosine", total_steps=4)
        ctx = step_variants.context("bf16", DEVICE, group_size=16)
        per_step, batches = [], []
        for epoch in range(2):
            loader.set_epoch(epoch)
            model.train()
            with HostReads() as counted:
                for x, y in loader:
                    batches.append((x.device, x.dtype, y.device))
                    stats = step_module.sam_step(model, opt, x, y, ctx)
                    schedule.step()
                    ctx.step += 1
            per_step.append(counted.reads)
            model.eval()
            sums, _ = evaluation_sums(model, test, _summed_cross_entropy, ctx.autocast, DEVICE)
        assert batches == [(DEVICE, torch.float32, DEVICE)] * 4
        assert per_step == [[], []]
        assert off_device(model, opt, stats) == [] and sums.device == DEVICE


# ---- the tests above can fail ----------------------------------------------------------------------------------


def test_a_tensor_made_on_the_cpu_in_the_step_raises(monkeypatch):
    """A step that builds a per-example tensor without `device=` (the classic GPU-only bug) fails here."""
    real = step_module._loss
    monkeypatch.setattr(step_module, "_loss", lambda model, x, y, ctx: _mix(real(model, x, y, ctx), y))
    with pytest.raises(RuntimeError, match="cpu"):
        steps_on_fake_cuda("resnet8", "sam", "fp32", steps=1)


def _mix(result, y):
    loss, logits = result
    return (logits + torch.zeros(len(y), 1)).logsumexp(1).mean() + loss, logits  # (n, 1) CPU + (n, 10) CUDA


def test_a_copy_to_the_host_in_the_step_is_counted(monkeypatch):
    real = step_module._loss

    def copying(model, x, y, ctx):
        loss, logits = real(model, x, y, ctx)
        logits.detach().cpu()
        return loss, logits

    monkeypatch.setattr(step_module, "_loss", copying)
    reads, _ = steps_on_fake_cuda("resnet8", "sgd", "fp32", steps=1)
    assert reads == [[("_to_copy", "cuda:0")]]
