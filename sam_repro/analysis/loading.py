"""Inputs and outputs of the analysis commands (`sam-analyze`, `sam-eval`).

Owns four things the analyses share, so that each of them is only its mathematics:
  * `open_run` / `load_trained_model`: a trained network back from a run directory (`<run>/checkpoints/last.pt`, where
    sam-train writes it: docs/training.md, "Outputs") or a `.pt` checkpoint written by `sam-train`, rebuilt with
    `hydra.utils.instantiate(cfg.model)` from the config stored in the checkpoint itself (so the weights and the
    architecture always come from the same file);
  * `load_split`: the images of a dataset split (the test split, or the training set exactly as the run saw it) as
    uint8, normalized batch by batch, optionally a seeded subset (the fixed sample the Hessian, m-sharpness and
    landscapes are computed on);
  * `evaluate_batches`: mean loss, top-1 and top-5 error in percent, over the trainer's evaluation loop
    (`engine.evaluation.evaluation_sums`);
  * `write_json`: result files written atomically (`sam_repro.files`); their plots go through the one figure
    writer, `analysis.plots.save_figure`, with the provenance record in their text chunks.

Every failure a user can cause (a missing or corrupt checkpoint, weights that do not fit the model) raises a
CheckpointError naming the file, which the CLIs print as one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sam_repro.data import dataset_arrays, select_train_indices
from sam_repro.data.augment import normalize
from sam_repro.data.noise import corrupt_labels
from sam_repro.engine.checkpoint import FORMAT, load_checkpoint
from sam_repro.engine.evaluation import evaluation_sums
from sam_repro.engine.rundir import RunFiles
from sam_repro.errors import CheckpointError, ConfigError, DataError
from sam_repro.files import atomic_write_json

# Prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) put on state-dict keys. sam-train saves the
# unwrapped model's state dict; stripping them anyway lets a hand-saved checkpoint load too.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """A trained network and where it came from."""

    model: nn.Module
    cfg: DictConfig
    checkpoint: Path
    epoch: int | None
    step: int | None

    @property
    def label(self) -> str:
        """A legend label in the paper's words: optimizer, rho, seed, epoch (e.g. `sam rho=0.05 seed0 ep200`)."""
        optimizer = self.cfg.get("optimizer") or {}
        parts = [str(optimizer.get("name", "model"))]
        if optimizer.get("rho") is not None:
            parts.append(f"rho={optimizer.get('rho')}")
        if self.cfg.get("seed") is not None:
            parts.append(f"seed{self.cfg.get('seed')}")
        if self.epoch is not None:
            parts.append(f"ep{self.epoch}")
        return " ".join(parts)

    def describe(self) -> dict[str, Any]:
        """What a result file records about the run it was computed on."""
        cfg = self.cfg
        return {
            "checkpoint": str(self.checkpoint),
            "label": self.label,
            "experiment": cfg.get("experiment"),
            "seed": cfg.get("seed"),
            "epoch": self.epoch,
            "step": self.step,
            "dataset": OmegaConf.select(cfg, "dataset.name"),
            "model": OmegaConf.select(cfg, "model.name"),
            "optimizer": OmegaConf.select(cfg, "optimizer.name"),
            "rho": OmegaConf.select(cfg, "optimizer.rho"),
            "m": OmegaConf.select(cfg, "trainer.m"),
        }


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory -> its `checkpoints/last.pt`; a file -> itself. CheckpointError when there is none."""
    path = Path(path).expanduser()
    if path.is_dir():
        checkpoint = RunFiles(path).checkpoint
        if not checkpoint.is_file():
            raise CheckpointError(
                f"{checkpoint} not found: {path} holds no checkpoint yet (pass a run directory written by sam-train "
                "or a .pt file)"
            )
        return checkpoint
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass a run directory or a .pt checkpoint")
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, checked for the keys the analyses need."""
    payload = load_checkpoint(path, sam_repro_format=False)  # the one safe loader (weights_only, CPU)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), Mapping):
        raise CheckpointError(f"{path} has no 'model' state dict: not a checkpoint written by sam-train")
    if payload.get("format", FORMAT) != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {payload.get('format')!r}; this version reads format {FORMAT}"
        )
    return payload


def _run_config(payload: Mapping[str, Any], checkpoint: Path) -> DictConfig:
    """The config saved with the weights; the run directory's config.yaml for checkpoints that lack one."""
    if payload.get("config") is not None:
        return OmegaConf.create(payload["config"])
    config_yaml = RunFiles.of_checkpoint(checkpoint).config
    if config_yaml.is_file():
        return OmegaConf.load(config_yaml)
    raise CheckpointError(f"{checkpoint} carries no config and {config_yaml} does not exist: cannot rebuild the model")


def open_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """Rebuild the network of a run directory or checkpoint, in eval mode on `device`."""
    import hydra.utils  # deferred: hydra's import cost is only paid by commands that rebuild a model

    checkpoint = resolve_checkpoint(path)
    payload = read_checkpoint(checkpoint)
    cfg = _run_config(payload, checkpoint)
    if cfg.get("model") is None or "_target_" not in cfg.model:
        raise CheckpointError(f"{checkpoint}: its config has no model._target_ to rebuild the network from")
    try:
        model = hydra.utils.instantiate(cfg.model)
    except Exception as error:
        raise ConfigError(
            f"model._target_={cfg.model._target_} of {checkpoint} cannot be built ({_one_line(error)})"
        ) from error
    state = {_strip_prefixes(key): value for key, value in payload["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit model {OmegaConf.select(cfg, 'model.name')} ({_one_line(error)})"
        ) from error
    model.to(device).eval()
    return Run(model=model, cfg=cfg, checkpoint=checkpoint, epoch=payload.get("epoch"), step=payload.get("step"))


def load_trained_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, DictConfig]:
    """(model, cfg) of a run directory or `.pt` checkpoint; the model in eval mode on `device`."""
    run = open_run(path, device)
    return run.model, run.cfg


def _strip_prefixes(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class ImageSplit:
    """Images of one split as uint8 (N, C, H, W) plus int64 labels; `batches` normalizes on the fly.

    Keeping uint8 (4x smaller than float32) lets a whole sample live on the GPU, so the hundreds of passes of a
    Lanczos run or a landscape grid never copy images from the host.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str
    indices: torch.Tensor | None = None  # positions of the subset within the split (None: all of it)
    label_noise: float = 0.0  # share of corrupted training labels the split carries (as the run trained on)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: str | torch.device) -> ImageSplit:
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalized float32 images, labels) in order, `batch_size` at a time, on the split's device."""
        for start in range(0, len(self), batch_size):
            images = self.images[start : start + batch_size]
            yield normalize(images, self.mean, self.std), self.labels[start : start + batch_size]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split normalized at once (for samples small enough to hold as float32)."""
        return normalize(self.images, self.mean, self.std), self.labels


def seeded_subset(num_examples: int, size: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of `size` examples drawn without replacement by a generator seeded with `seed`.

    None (all examples) when size is None or covers the split. The draw depends only on (num_examples, size, seed),
    so every checkpoint of a comparison is analysed on the same examples.
    """
    if size is None or size >= num_examples:
        return None
    if size <= 0:
        raise ConfigError(f"--subset must be positive (got {size})")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_examples, generator=generator)[:size].sort().values


def load_split(
    cfg: DictConfig,
    split: str = "test",
    subset: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    run_test_subset: bool = False,
) -> ImageSplit:
    """The `split` of the run's dataset, optionally a seeded subset of it, on the CPU.

    "test" is the official test split. "train" is the training set *as the run saw it*: the examples that
    `sam_repro.data.build_data` trains on (validation hold-out removed, `dataset.train_subset` applied) with the
    labels it trained on (`dataset.label_noise` applied with its seed), so the analyses measure the training loss.
    `root` overrides `dataset.root` (runs trained elsewhere record that machine's data path).
    `run_test_subset`: "test" is the first `dataset.test_subset` test images where the run set one, the images the
    trainer measured its `test_error` on (sam-eval's default).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test (got {split!r})")
    dataset = cfg.dataset
    arrays = dataset_arrays(dataset, root)
    label_noise = 0.0
    if split == "test":
        images, labels = arrays.test_images, arrays.test_labels
        first = dataset.get("test_subset") if run_test_subset else None
        if first is not None:
            if not 0 < int(first) <= len(labels):
                raise ConfigError(f"dataset.test_subset must be in [1, {len(labels)}] (got {first})")
            images, labels = images[: int(first)], labels[: int(first)]
    else:
        positions, _ = select_train_indices(
            len(arrays.train_labels),
            float(dataset.get("val_fraction") or 0.0),
            dataset.get("train_subset"),
            int(dataset.get("subset_seed") or 0),
        )
        images, labels = arrays.train_images[positions], arrays.train_labels[positions].astype(np.int64)
        label_noise = float(dataset.get("label_noise") or 0.0)
        if label_noise:
            labels, _ = corrupt_labels(labels, label_noise, int(dataset.num_classes), int(dataset.noise_seed))
    images, labels = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels).long()
    if images.ndim == 3:  # (N, H, W) grayscale
        images = images.unsqueeze(-1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{dataset.name} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    indices = seeded_subset(labels.shape[0], subset, seed)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return ImageSplit(
        images=images.permute(0, 3, 1, 2).contiguous(),
        labels=labels,
        mean=tuple(float(v) for v in dataset.mean),
        std=tuple(float(v) for v in dataset.std),
        split=split,
        indices=indices,
        label_noise=label_noise,
    )


# ----------------------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    loss: float
    top1_error: float | None  # percent; None when the outputs are not class scores
    top5_error: float | None  # percent; None with fewer than 5 classes, where it would be 0 by construction
    num_examples: int


def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion=F.cross_entropy,
) -> Evaluation:
    """Mean `criterion` (a batch-mean loss) over all examples, and top-1/top-5 error in percent: the trainer's
    loop, `engine.evaluation.evaluation_sums`.

    Runs the model as it is (the caller sets eval mode); batches may differ in size, each weighted by its count.
    """
    sums, num_classes = evaluation_sums(
        model, batches, lambda outputs, targets: _batch_sum(criterion, outputs, targets)
    )
    count = 0 if sums is None else int(sums[3].item())
    if count == 0:
        raise DataError("no examples to evaluate on")
    loss_sum, correct1, correct5, _ = sums.tolist()
    top1 = 100.0 * (count - int(correct1)) / count if num_classes is not None else None
    top5 = 100.0 * (count - int(correct5)) / count if num_classes is not None and num_classes >= 5 else None
    return Evaluation(loss=loss_sum / count, top1_error=top1, top5_error=top5, num_examples=count)


def _batch_sum(criterion, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A batch-mean `criterion` as the batch's sum, in float64 (as the mean times the count was always summed)."""
    return torch.as_tensor(criterion(outputs, targets), dtype=torch.float64) * outputs.shape[0]


# ----------------------------------------------------------------------------------------------------- outputs


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as indented JSON (keys in the order given) atomically (`sam_repro.files`), so a reader never
    sees half a file."""
    return atomic_write_json(path, payload, sort_keys=False)


def file_stem(path: str | os.PathLike) -> str:
    """A file-name stem for a run: its last directories (e.g. `demo__optimizer=sam__seed0`).

    A run directory keeps its last three components; a checkpoint file adds its own stem unless it is the default
    `checkpoints/last.pt` of a run directory.
    """
    path = Path(path).expanduser().resolve()
    if path.is_file():
        if RunFiles.in_checkpoints(path):
            parts = [*path.parent.parent.parts[-3:], *([] if path.name == RunFiles.CHECKPOINT else [path.stem])]
        else:
            parts = [*path.parent.parts[-2:], path.stem]
    else:
        parts = list(path.parts[-3:])
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(part.strip("/") for part in parts if part.strip("/")))
