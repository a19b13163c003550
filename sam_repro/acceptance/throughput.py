"""Throughput of the paper's networks: images/s and peak memory of SGD and SAM steps, the FLOPs of one step counted by
`torch.utils.flop_counter.FlopCounterMode`, MFU against the GPU's datasheet bf16 peak and against a large bf16 matmul
measured in the same run, and the share of each step the device-resident data path takes.

A row times the trainer's own pieces: `TrainLoader` batches (synthetic uint8 images on the device, the paper's basic
augmentation) into `sgd_step` / `sam_step` with the model as the trainer builds it (channels_last, `torch.compile`
of the model). ImageNet-sized rows feed one fixed batch: there the data path is JPEG decoding in DataLoader workers,
which this check cannot see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from sam_repro.acceptance.common import STEPS, endless, make_optimizer, step_context, sync, synthetic_loader
from sam_repro.engine.compat import set_tf32
from sam_repro.models import create_model

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s. Longest name first when matching.
DATASHEET_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}


def datasheet_peak(gpu_name: str) -> float | None:
    for key in sorted(DATASHEET_BF16_TFLOPS, key=len, reverse=True):
        if key in gpu_name:
            return DATASHEET_BF16_TFLOPS[key]
    return None


def measure_matmul(device: torch.device, n: int, iterations: int) -> float:
    """TFLOP/s of an n x n x n bf16 matmul, the best rate this PyTorch reaches on the device."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    sync(device)
    return 2 * n**3 * iterations / (time.perf_counter() - start) / 1e12


@dataclass(frozen=True)
class RowSpec:
    model: str
    optimizer: str  # sgd | sam
    m: int
    precision: str  # fp32 (IEEE) | tf32 | bf16
    mode: str  # eager | channels_last | compile | channels_last+compile
    batch: int = 256
    image_size: int = 32
    num_classes: int = 10
    arch: tuple = ()  # architecture overrides (smoke sizes), as sorted (key, value) pairs

    @property
    def label(self) -> str:
        return f"{self.model} {self.optimizer} m={self.m} {self.precision} {self.mode}"


@dataclass
class Timing:
    warmup: int = 2
    min_steps: int = 5
    max_steps: int = 30
    min_seconds: float = 2.0


@dataclass
class Bench:
    """The model (and its compiled wrapper) shared by the consecutive rows of one (network, mode), so each is built and
    compiled once; the previous one is dropped first, so a row's peak memory is its own network's."""

    device: torch.device
    timing: Timing
    compile_backend: str = "inductor"
    datasheet: float | None = None
    matmul_tflops: float | None = None
    _models: dict = field(default_factory=dict)
    _flops: dict = field(default_factory=dict)
    _loader_seconds: dict = field(default_factory=dict)

    def model(self, spec: RowSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(module, what the step calls): the same module, or its torch.compile wrapper."""
        key = (spec.model, spec.arch, spec.mode, spec.image_size, spec.num_classes)
        if key not in self._models:
            self._models.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            module = create_model(spec.model, num_classes=spec.num_classes, **dict(spec.arch)).to(self.device)
            if "channels_last" in spec.mode:
                module = module.to(memory_format=torch.channels_last)
            # dynamic=False: one graph per batch shape, as a training run (one shape) gets, not a dynamic one
            called = (
                torch.compile(module, backend=self.compile_backend, dynamic=False) if "compile" in spec.mode else module
            )
            self._models[key] = (module, called)
        return self._models[key]

    def batches(self, spec: RowSpec):
        if spec.image_size <= 64:
            return endless(synthetic_loader(4 * spec.batch, spec.image_size, spec.batch, self.device))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec.batch, 3, spec.image_size, spec.image_size, generator=g).to(self.device)
        y = torch.randint(0, spec.num_classes, (spec.batch,), generator=g).to(self.device)
        if "channels_last" in spec.mode:
            x = x.contiguous(memory_format=torch.channels_last)
        return iter(lambda: (x, y), None)

    def loader_seconds(self, spec: RowSpec) -> float | None:
        """Seconds per batch of the device-resident loader alone (index, gather, crop, flip, normalise)."""
        if spec.image_size > 64:
            return None
        key = (spec.image_size, spec.batch)
        if key not in self._loader_seconds:
            batches = self.batches(spec)
            for _ in range(2):
                next(batches)
            sync(self.device)
            count, start = max(self.timing.min_steps, 5), time.perf_counter()
            for _ in range(count):
                next(batches)
            sync(self.device)
            self._loader_seconds[key] = (time.perf_counter() - start) / count
        return self._loader_seconds[key]

    def step_flops(self, spec: RowSpec, module: torch.nn.Module, run_step: Callable[[torch.nn.Module], None]) -> float:
        """FLOPs of one step (forward and backward of every pass), counted once per network, optimizer and batch on
        the eager module (the count does not depend on precision or mode)."""
        key = (spec.model, spec.arch, spec.optimizer, spec.batch, spec.image_size)
        if key not in self._flops:
            with FlopCounterMode(display=False) as counter:
                run_step(module)
            self._flops[key] = float(counter.get_total_flops())
        return self._flops[key]

    def row(self, spec: RowSpec) -> dict:
        out = {
            "model": spec.model,
            "arch": dict(spec.arch),
            "optimizer": spec.optimizer,
            "m": spec.m,
            "precision": spec.precision,
            "mode": spec.mode,
            "batch": spec.batch,
            "image_size": spec.image_size,
            "images_per_second": None,
            "step_s": None,
            "peak_memory_gb": None,
            "mfu": {"datasheet": None, "measured_matmul": None},
            "step_tflop": None,
            "data_share": None,
            "steps": 0,
            "note": None,
        }
        if self.device.type == "cuda":
            set_tf32(spec.precision == "tf32")
        try:
            module, called = self.model(spec)
            optimizer = make_optimizer(spec.optimizer, module)
            ctx = step_context(spec.m, "fp32" if spec.precision == "tf32" else spec.precision, self.device)
            step = STEPS[spec.optimizer]
            batches = self.batches(spec)
            run_step = lambda net: _one_step(step, net, optimizer, batches, ctx)  # noqa: E731
            for _ in range(self.timing.warmup):
                run_step(called)
            flops = self.step_flops(spec, module, run_step)
            sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            steps, start = 0, time.perf_counter()
            while steps < self.timing.min_steps or (
                steps < self.timing.max_steps and time.perf_counter() - start < self.timing.min_seconds
            ):
                run_step(called)
                steps += 1
            sync(self.device)
            seconds = (time.perf_counter() - start) / steps
        except torch.cuda.OutOfMemoryError:
            self._models.clear()
            torch.cuda.empty_cache()
            out["note"] = "out of memory"
            return out
        finally:
            if self.device.type == "cuda":
                set_tf32(False)
        achieved = flops / seconds / 1e12
        loader = self.loader_seconds(spec)
        out.update(
            {
                "images_per_second": _sig(spec.batch / seconds),
                "step_s": _sig(seconds),
                "steps": steps,
                "step_tflop": _sig(flops / 1e12),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)
                if self.device.type == "cuda"
                else None,
                "mfu": {
                    "datasheet": _sig(achieved / self.datasheet) if self.datasheet else None,
                    "measured_matmul": _sig(achieved / self.matmul_tflops) if self.matmul_tflops else None,
                },
                "data_share": _sig(min(1.0, loader / seconds)) if loader is not None else None,
            }
        )
        if loader is None:
            out["note"] = "fixed batch: ImageNet's data path is JPEG decoding in DataLoader workers, not measured"
        return out


def _one_step(step, net: torch.nn.Module, optimizer, batches, ctx) -> None:
    """One training `step` of `net` on the next of `batches`."""
    x, y = next(batches)
    step(net, optimizer, x, y, ctx)


def _sig(value: float, digits: int = 6) -> float:
    """`value` to `digits` significant digits: short in the JSON, exact enough to recompute one field from others."""
    return float(f"{value:.{digits}g}")


def format_row(row: dict) -> str:
    if row["images_per_second"] is None:
        return f"{row['model']} {row['optimizer']} m={row['m']} {row['precision']} {row['mode']}: {row['note']}"
    mfu = row["mfu"]
    parts = [f"{row['images_per_second']:.0f} img/s"]
    if row["peak_memory_gb"] is not None:
        parts.append(f"{row['peak_memory_gb']:.1f} GB")
    if mfu["datasheet"] is not None:
        parts.append(f"MFU {100 * mfu['datasheet']:.1f}% of datasheet")
    if mfu["measured_matmul"] is not None:
        parts.append(f"{100 * mfu['measured_matmul']:.1f}% of the measured matmul")
    if row["data_share"] is not None:
        parts.append(f"data path {100 * row['data_share']:.1f}%")
    return f"{row['model']} {row['optimizer']} m={row['m']} {row['precision']} {row['mode']}: " + ", ".join(parts)


def flops_per_image(model: str, image_size: int, in_channels: int, num_classes: int, arch: tuple = ()) -> float:
    """Forward + backward FLOPs of one training image, counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        net = create_model(model, num_classes=num_classes, in_channels=in_channels, **dict(arch))
        x = torch.randn(2, in_channels, image_size, image_size)
    net.train()
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / 2
