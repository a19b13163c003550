"""What the trainer measures on held-out and training data at an evaluated epoch.

  * `evaluation_sums`: the one evaluation loop (summed loss, top-1 and top-5 hits, count), also behind sam-eval and
    the analyses (`analysis.loading.evaluate_batches`);
  * `evaluate`: exact top-1 / top-5 error and mean loss over a whole split, summed over ranks;
  * `memorization`: for runs with label noise, how much of the *corrupted* training labels the network has learnt
    (the paper's label-noise mechanism, section 3.3: plain SGD memorises the flipped labels, SAM does not).

Both run the model in eval mode (BatchNorm running statistics, no dropout) on un-augmented, normalized images, and
put the model back in train mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from sam_repro.engine.distributed import DistEnv, all_reduce_sum

# The three memorisation percentages, as logged in metrics.jsonl, summary.json and W&B.
MEMORIZATION_KEYS = ("memorized", "flipped_true", "clean_train_error")


@torch.no_grad()
def evaluation_sums(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor | None, int | None]:
    """The one evaluation loop (the trainer's `evaluate`, and `analysis.loading.evaluate_batches` for sam-eval and
    the analyses).

    Runs the model as it is (the caller sets eval mode) over `batches` of (inputs, targets) and returns
    `(sums, num_classes)`: `sums` is [summed loss, top-1 correct, top-5 correct, examples] as float64 on `device`
    (by default the device of the first outputs; None when there were no batches and no device), where
    `loss_sum(outputs, targets)` is one batch's summed loss; `num_classes` is None when some outputs are not class
    scores ((N, C) scores against int64 labels), and the correct counts then stop. Half-precision outputs (autocast)
    are scored in float32. Top-5 is top-min(5, C).
    """
    sums = None if device is None else torch.zeros(4, device=device, dtype=torch.float64)
    num_classes: int | None = 0
    for inputs, targets in batches:
        with autocast():
            outputs = model(inputs)
        if outputs.dtype in (torch.float16, torch.bfloat16):
            outputs = outputs.float()
        if sums is None:
            sums = torch.zeros(4, device=outputs.device, dtype=torch.float64)
        sums[0] += loss_sum(outputs, targets).double()
        sums[3] += targets.shape[0]
        if num_classes is None or outputs.ndim != 2 or targets.ndim != 1 or targets.dtype != torch.long:
            num_classes = None
            continue
        num_classes = outputs.shape[1]
        top = outputs.topk(min(5, num_classes), dim=1).indices
        sums[1] += (top[:, 0] == targets).sum()
        sums[2] += (top == targets[:, None]).any(1).sum()
    return sums, num_classes


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def evaluate(model: torch.nn.Module, loader, env: DistEnv, autocast) -> dict[str, float]:
    """Exact top-1/top-5 error and mean loss over the whole split, summed over ranks."""
    model.eval()
    sums, _ = evaluation_sums(model, loader, _summed_cross_entropy, autocast, env.device)
    loss, top1, top5, n = all_reduce_sum(sums).tolist()
    assert int(n) == loader.total, f"evaluated {n} examples of {loader.total}"
    model.train()
    return {"loss": loss / n, "error": 100.0 * (1 - top1 / n), "error_top5": 100.0 * (1 - top5 / n)}


def memorization_counts(predicted: torch.Tensor, noisy: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """[flipped, predicted as the flipped label, predicted as the true label, clean, clean predicted wrongly]
    as float64 counts; `noisy` is the label trained on, `true` the original one."""
    flipped = noisy != true
    clean = ~flipped
    return torch.stack(
        [
            flipped.sum(),
            (flipped & (predicted == noisy)).sum(),
            (flipped & (predicted == true)).sum(),
            clean.sum(),
            (clean & (predicted != true)).sum(),
        ]
    ).double()


def memorization_shares(counts: torch.Tensor | list[float]) -> dict[str, float]:
    """The percentages of MEMORIZATION_KEYS from summed `memorization_counts` (0 where a set is empty):
    memorized = flipped examples predicted as their flipped (trained-on) label, flipped_true = flipped examples
    predicted as their true label, clean_train_error = error on the examples that kept their label."""
    flipped, as_noisy, as_true, clean, clean_wrong = [float(c) for c in counts]
    share = lambda part, whole: 100.0 * part / whole if whole else 0.0  # noqa: E731
    return {
        "memorized": share(as_noisy, flipped),
        "flipped_true": share(as_true, flipped),
        "clean_train_error": share(clean_wrong, clean),
    }


@torch.no_grad()
def memorization(model: torch.nn.Module, loader, env: DistEnv, autocast) -> dict[str, float]:
    """`memorization_shares` over the training examples of `loader` (an EvalLoader whose labels are the pairs
    (trained-on label, true label)), summed over ranks."""
    model.eval()
    counts = torch.zeros(5, device=env.device, dtype=torch.float64)
    for x, labels in loader:
        with autocast():
            predicted = model(x).argmax(1)
        counts += memorization_counts(predicted, labels[:, 0], labels[:, 1])
    model.train()
    return memorization_shares(all_reduce_sum(counts).tolist())
