"""`sam-eval` and run loading on a tiny checkpoint written here, checked against a direct computation of the error,
and on a checkpoint `sam-train` wrote, against the test error the run itself recorded.

The dataset readers are replaced by a fake `sam_repro.data.sources` module holding a few dozen random images
(the `fake_dataset` fixture, tests/conftest.py), so most tests need no data on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers.checkpoints import MEAN, NUM_CLASSES, STD, run_config, write_run
from helpers.training import BIN, TINY, only_run_dir, read_config, train
from sam_repro.analysis.loading import load_split, load_trained_model, seeded_subset
from sam_repro.cli.eval import main
from sam_repro.data import build_data, select_train_indices

CONFIGS = Path(__file__).resolve().parents[1] / "sam_repro" / "configs"


def direct_errors(model: torch.nn.Module, images_nhwc: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1/top-5 error in percent, computed without the package's normalization or evaluation loop."""
    x = torch.from_numpy(images_nhwc).double().div(255.0)
    x = (x - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)
    x = x.permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits = model.eval()(x)
    ranking = logits.argsort(dim=1, descending=True)
    y = torch.from_numpy(labels)
    top1 = (ranking[:, 0] != y).double().mean().item() * 100
    top5 = (~(ranking[:, :5] == y[:, None]).any(1)).double().mean().item() * 100
    return top1, top5


RESNET8 = {
    "_target_": "sam_repro.models.create_model",
    "name": "resnet8",
    "num_classes": NUM_CLASSES,
    "in_channels": 3,
    "norm": "batch",
    "depth": 8,
}


@pytest.mark.parametrize("model_cfg", [None, RESNET8], ids=["tiny_cnn", "resnet8"])
def test_sam_eval_matches_direct_computation(tmp_path, fake_dataset, capsys, model_cfg):
    torch.set_num_threads(1)
    model = write_run(tmp_path / "run", model_cfg=model_cfg)
    expected_top1, expected_top5 = direct_errors(
        model, fake_dataset.arrays.test_images, fake_dataset.arrays.test_labels
    )
    assert 0 < expected_top5 < expected_top1 < 100  # a case where the two errors are informative

    rc = main(
        [
            str(tmp_path / "run"),
            "--json",
            "--no-progress",
            "--device",
            "cpu",
            "--batch-size",
            "16",
            "--data-root",
            "/elsewhere",
        ]
    )
    assert rc == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["num_examples"] == 40 and record["split"] == "test" and record["epoch"] == 3
    assert record["top1_error"] == pytest.approx(expected_top1, abs=1e-9)
    assert record["top5_error"] == pytest.approx(expected_top5, abs=1e-9)
    assert fake_dataset.calls == [("fake10", "/elsewhere")]  # --data-root overrides dataset.root


def test_sam_eval_train_mode_would_differ(tmp_path, fake_dataset):
    """Guard for the test above: with batch statistics the error differs, so it does check eval mode."""
    model = write_run(tmp_path / "run")
    x = torch.from_numpy(fake_dataset.arrays.test_images).float().div(255).permute(0, 3, 1, 2)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), model.train()(x), atol=1e-3)


def test_sam_eval_checkpoint_file_and_text_line(tmp_path, fake_dataset, capsys):
    model = write_run(tmp_path / "run")
    expected_top1, expected_top5 = direct_errors(
        model, fake_dataset.arrays.test_images, fake_dataset.arrays.test_labels
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main([str(checkpoint), "--no-progress", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert f"top-1 error {expected_top1:.2f}%" in line and f"top-5 error {expected_top5:.2f}%" in line


def test_load_run_rebuilds_the_saved_network(tmp_path):
    model = write_run(tmp_path / "run", seed=3)
    loaded, cfg = load_trained_model(tmp_path / "run")
    assert cfg.seed == 3 and cfg.optimizer.name == "sam"
    assert not loaded.training
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name


def test_load_run_strips_wrapper_prefixes(tmp_path):
    model = write_run(tmp_path / "run")
    payload = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    payload["model"] = {f"module._orig_mod.{k}": v for k, v in payload["model"].items()}
    torch.save(payload, tmp_path / "wrapped.pt")
    loaded, _ = load_trained_model(tmp_path / "wrapped.pt")
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_load_split_subset_is_seeded(fake_dataset):
    cfg = OmegaConf.create(run_config())
    first = load_split(cfg, "train", subset=10, seed=1)
    again = load_split(cfg, "train", subset=10, seed=1)
    other = load_split(cfg, "train", subset=10, seed=2)
    assert len(first) == 10 and torch.equal(first.indices, again.indices)
    assert not torch.equal(first.indices, other.indices)
    assert torch.equal(first.labels, torch.from_numpy(fake_dataset.arrays.train_labels)[first.indices])
    assert first.images.shape == (10, 3, 8, 8) and first.images.dtype == torch.uint8
    assert seeded_subset(48, 48, 0) is None and seeded_subset(48, None, 0) is None


def test_train_split_is_the_training_set_the_run_saw(fake_dataset):
    """Validation hold-out, train_subset and label noise as `build_data` applies them (a second computation)."""
    config = run_config()
    config["dataset"] |= {
        "val_fraction": 0.25,
        "train_subset": 20,
        "subset_seed": 1,
        "label_noise": 0.5,
        "noise_seed": 3,
    }
    config |= {
        "augment": OmegaConf.to_container(OmegaConf.load(CONFIGS / "augment" / "basic.yaml")),
        "trainer": {"batch_size": 4, "eval_batch_size": 10},
    }
    cfg = OmegaConf.create(config)
    trained_on = build_data(cfg, torch.device("cpu")).train
    split = load_split(cfg, "train")
    assert len(split) == 20 and split.label_noise == 0.5
    assert torch.equal(split.images, trained_on.images) and torch.equal(split.labels, trained_on.labels)
    # Half of the 20 labels are corrupted (never to the true class): compare with the clean labels.
    positions, _ = select_train_indices(48, 0.25, 20, 1)
    clean = torch.from_numpy(fake_dataset.arrays.train_labels[positions])
    assert int((split.labels != clean).sum()) == 10


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "not found"),
        (lambda d: (d.mkdir(), (d / "garbage.pt").write_bytes(b"not a checkpoint")), "corrupt"),
    ],
    ids=["missing", "no-checkpoint", "corrupt"],
)
def test_sam_eval_errors_are_one_line(tmp_path, capsys, setup, message):
    target = tmp_path / "run"
    setup(target)
    path = target / "garbage.pt" if (target / "garbage.pt").exists() else target
    assert main([str(path), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err and str(path.name) in err


def test_weights_that_do_not_fit_name_the_file(tmp_path, capsys):
    write_run(tmp_path / "run")
    payload = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    payload["model"].pop("5.bias")
    torch.save(payload, tmp_path / "run" / "checkpoints" / "last.pt")
    assert main([str(tmp_path / "run"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "do not fit" in err and err.count("\n") == 1


def test_console_entry_point_prints_no_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "sam_repro.cli.eval", str(missing), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.data
def test_sam_eval_on_a_trained_run_reproduces_its_test_error(tmp_path):
    """A run sam-train wrote (real CIFAR-10, `debug=tiny`): sam-eval rebuilds the network from the checkpoint and
    measures on the test set the test error and loss the trainer recorded in summary.json and metrics.jsonl.

    The run evaluates on the whole test set (`dataset.test_subset=null`): sam-eval's test split is the official
    one, whatever subset the run evaluated on."""
    train(tmp_path, *TINY, "trainer.epochs=1", "dataset.test_subset=null")
    run = only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    batch = read_config(run)["trainer"]["eval_batch_size"]  # the trainer's batches: the same sums, bit for bit
    result = subprocess.run(
        [str(BIN / "sam-eval"), str(run), "--json", "--no-progress", "--device", "cpu", "--batch-size", str(batch)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["num_examples"] == 10_000 and record["epoch"] == 1  # the CIFAR-10 test set, the last epoch
    assert 0 < summary["test_error"] < 100  # an informative error, not a trivial 0 or 100
    assert record["top1_error"] == pytest.approx(summary["test_error"], abs=1e-9)
    assert record["top5_error"] == pytest.approx(last["test_error_top5"], abs=1e-9)
    assert record["loss"] == pytest.approx(last["test_loss"], rel=1e-5)


def test_sam_eval_measures_the_runs_test_subset_and_says_so_without_bars_in_a_log(tmp_path, fake_dataset, capsys):
    model = write_run(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = torch.load(checkpoint, weights_only=False)
    payload["config"]["dataset"]["test_subset"] = 16  # the run measured its test error on the first 16 images
    torch.save(payload, checkpoint)
    first16, _ = direct_errors(model, fake_dataset.arrays.test_images[:16], fake_dataset.arrays.test_labels[:16])
    assert main([str(tmp_path / "run"), "--device", "cpu", "--batch-size", "4"]) == 0  # progress auto, not a tty
    captured = capsys.readouterr()
    assert captured.err == ""  # no tqdm bar in a log
    assert f"top-1 error {first16:.2f}%" in captured.out
    assert "test split, first 16 images (the run's dataset.test_subset; --full-test for all)" in captured.out
    assert main([str(tmp_path / "run"), "--device", "cpu", "--full-test", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["num_examples"], record["run_test_subset"]) == (40, 16)
