"""A training epoch's metrics, in one home. `EpochTotals` keeps the epoch's running sums on the device (saved in a
mid-epoch checkpoint), `EpochSums` holds such sums on the host by name, and `training_metrics` is the one formula that
turns them into the named metrics every reader reports: the epoch's row of metrics.jsonl (the trainer), the per-step
rows of steps.jsonl and W&B (`loggers.StepCurves`, over the interval's sums) and the console (`loggers.Progress`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sam_repro.engine.distributed import DistEnv, all_reduce_sum
from sam_repro.errors import SamReproError

DEVICE_SUMS = ("loss", "correct", "perturbed", "sam_loss", "grad_norm", "perturbation_norm", "sam_count", "sam_steps")
HOST_SUMS = ("count", "steps")  # counted on the host: no device read for them


class NonFiniteLoss(SamReproError):
    pass


@dataclass(frozen=True)
class EpochSums:
    """An epoch's (or a logging interval's) sums, on the host, summed over ranks or one rank's own."""

    loss: float  # the clean loss, summed over every example
    correct: float  # examples predicted right
    count: float  # examples
    steps: float  # optimizer steps
    perturbed: float = 0.0  # SAM's perturbed loss, summed over the examples of the SAM steps kept
    sam_loss: float = 0.0  # the clean loss of those same examples
    grad_norm: float = 0.0  # ||g||, summed over the SAM steps kept
    perturbation_norm: float = 0.0  # ||eps||, summed over the SAM steps kept
    sam_count: float = 0.0  # examples of the SAM steps kept
    sam_steps: float = 0.0  # SAM steps kept

    @classmethod
    def of(cls, values: Sequence[float]) -> EpochSums:
        """From one vector: the device sums in DEVICE_SUMS' order, then HOST_SUMS."""
        return cls(**dict(zip((*DEVICE_SUMS, *HOST_SUMS), values, strict=True)))


def training_metrics(sums: EpochSums, sam: bool) -> dict[str, float]:
    """The training metrics of `sums`: the loss and the error (%) over every example and, where SAM steps were taken
    (`sam`) and some kept, the perturbed loss and the sharpness (perturbed minus clean loss) over the kept steps'
    examples and the mean ||g|| and ||eps|| over the kept steps."""
    n = max(sums.count, 1)
    out = {"train_loss": sums.loss / n, "train_error": 100.0 * (1 - sums.correct / n)}
    if sam and sums.sam_steps > 0:  # (none kept: every SAM step overflowed, nothing to report)
        out.update(
            {
                "perturbed_loss": sums.perturbed / sums.sam_count,
                "sharpness": (sums.perturbed - sums.sam_loss) / sums.sam_count,
                "grad_norm": sums.grad_norm / sums.sam_steps,
                "perturbation_norm": sums.perturbation_norm / sums.sam_steps,
            }
        )
    return out


def reduce_sums(device_sums: torch.Tensor, count: float, steps: float) -> EpochSums:
    """`device_sums` (DEVICE_SUMS' order) and the host's `count` and `steps`, summed over ranks: every rank calls it
    at the same point (one all-reduce, one copy to the host)."""
    host = torch.tensor([float(count), float(steps)], dtype=device_sums.dtype, device=device_sums.device)
    return EpochSums.of(all_reduce_sum(torch.cat([device_sums, host])).tolist())


class EpochTotals:
    """Running sums of a training epoch, on the device; read (and synchronised) only at log points. Saved in a
    mid-epoch checkpoint so a resumed epoch reports the same training metrics as an uninterrupted one.

    SAM's metrics (perturbed loss, sharpness, ||g||, ||eps||) leave out the steps whose values are non-finite: an
    fp16 step whose first pass overflowed is skipped by the scaler, but its eps, perturbed loss and ||g|| are inf
    or NaN. `sam_loss`, `sam_count` and `sam_steps` are the clean loss, examples and steps of the steps kept, so the
    sharpness compares the same examples. The clean training loss keeps every step: a non-finite one stops the run.
    """

    KEYS = DEVICE_SUMS
    # The running sums of KEYS: 0-dim float64 device tensors (set in __init__).
    loss: torch.Tensor
    correct: torch.Tensor
    perturbed: torch.Tensor
    sam_loss: torch.Tensor
    grad_norm: torch.Tensor
    perturbation_norm: torch.Tensor
    sam_count: torch.Tensor
    sam_steps: torch.Tensor
    # Older checkpoints' sums: before the masking of non-finite SAM steps the SAM-kept sums were the clean ones, and
    # ||eps|| was saved as "eps_norm".
    _OLDER = {"sam_loss": "loss", "sam_count": "count", "sam_steps": "steps", "perturbation_norm": "eps_norm"}

    def __init__(self, device: torch.device, saved: dict | None = None) -> None:
        saved = self.complete(saved or {})
        for k in self.KEYS:
            setattr(self, k, torch.tensor(saved.get(k, 0.0), device=device, dtype=torch.float64))
        self.count, self.steps, self.sam = saved.get("count", 0), saved.get("steps", 0), saved.get("sam", False)
        self._elapsed, self._start = saved.get("elapsed", 0.0), time.time()

    @classmethod
    def complete(cls, saved: dict) -> dict:
        """A checkpoint's sums under today's names, those an older checkpoint lacks filled in (`_OLDER`)."""
        return {**{k: saved[old] for k, old in cls._OLDER.items() if old in saved}, **saved}

    @classmethod
    def merge(cls, saved: list[dict]) -> dict:
        """Several ranks' saved sums as one rank's (a resume under another world size: the metrics are sums)."""
        saved = [cls.complete(s) for s in saved]
        merged = {k: sum(s[k] for s in saved) for k in (*cls.KEYS, *HOST_SUMS)}
        return merged | {"sam": any(s["sam"] for s in saved), "elapsed": max(s["elapsed"] for s in saved)}

    def state_dict(self) -> dict:
        return {
            **{k: float(getattr(self, k)) for k in self.KEYS},
            "count": self.count,
            "steps": self.steps,
            "sam": self.sam,
            "elapsed": self.seconds(),
        }

    def add(self, s) -> None:
        self.loss += s.loss_sum
        self.correct += s.correct
        self.count += s.count
        self.steps += 1
        if s.perturbed_loss_sum is not None:
            self.sam = True
            kept = (
                torch.isfinite(s.perturbed_loss_sum) & torch.isfinite(s.grad_norm) & torch.isfinite(s.perturbation_norm)
            )
            self.perturbed += torch.where(kept, s.perturbed_loss_sum, 0.0)
            self.sam_loss += torch.where(kept, s.loss_sum, 0.0)
            self.grad_norm += torch.where(kept, s.grad_norm, 0.0)
            self.perturbation_norm += torch.where(kept, s.perturbation_norm, 0.0)
            self.sam_count += kept * s.count
            self.sam_steps += kept

    def seconds(self) -> float:
        return self._elapsed + time.time() - self._start

    def images_per_second(self, env: DistEnv) -> float:
        return self.count * env.world_size / max(self.seconds(), 1e-9)

    def check_finite(self, step: int) -> None:
        """NonFiniteLoss on every rank at once when the loss is non-finite on any: the loss sums are summed over
        ranks (one all-reduce), so all ranks decide on the same number at the same step."""
        if self.count and not math.isfinite(float(all_reduce_sum(self.loss))):
            raise NonFiniteLoss(
                f"training loss became non-finite by step {step}: lower optimizer.lr, set "
                f"trainer.grad_clip, or use trainer.precision=fp32"
            )

    def sums(self) -> torch.Tensor:
        """The running sums of KEYS as one device tensor (no synchronisation)."""
        return torch.stack([getattr(self, k) for k in self.KEYS])

    def local(self) -> EpochSums:
        """This rank's sums so far, read from the device now (no collective)."""
        return EpochSums.of([*self.sums().tolist(), self.count, self.steps])

    def metrics(self) -> dict[str, float]:
        """The epoch's training metrics, its sums summed over ranks: every rank calls it (one all-reduce)."""
        return training_metrics(reduce_sums(self.sums(), self.count, self.steps), self.sam)
