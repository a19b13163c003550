"""Checkpoints carry no code: one loader (`engine.checkpoint.load_checkpoint`, weights_only=True, onto the CPU)
serves resume, `sam-eval` and `sam-analyze`; a file that needs anything but tensors and plain containers is refused
with one line naming it and nothing in it runs. Everything sam-train writes loads that way, and pretrained weights
go through timm's weights-only loader (`.safetensors` accepted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.training import TINY, comparable, compose_config, read_metrics, train
from sam_repro.analysis.loading import open_run
from sam_repro.cli import analyze
from sam_repro.cli import eval as eval_cli
from sam_repro.engine.checkpoint import load_checkpoint
from sam_repro.errors import CheckpointError

# debug=tiny, evaluated on 200 test images in one batch.
RUN_ARGS = [*TINY, "dataset.test_subset=200", "trainer.eval_batch_size=200"]


class Payload:
    """Unpickling this creates the file `marker`: the proof that a loader ran code from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_checkpoint(path: Path, marker: Path, **state) -> Path:
    torch.save({"format": 1, "model": {}, **state, "payload": Payload(marker)}, path)
    return path


def test_a_checkpoint_with_code_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "shared.pt", marker)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and "refused unread" in message and "io.open" in message and "\n" not in message


def test_loads_onto_the_cpu_whatever_the_caller(tmp_path, monkeypatch):
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    torch.save({"format": 1, "rng": [{"cpu": torch.get_rng_state()}]}, tmp_path / "c.pt")
    monkeypatch.setattr(torch, "load", spy)
    state = load_checkpoint(tmp_path / "c.pt")
    assert seen["weights_only"] is True and seen["map_location"] == "cpu"
    assert state["rng"][0]["cpu"].device.type == "cpu" and state["rng"][0]["cpu"].dtype == torch.uint8


def test_damaged_missing_and_foreign_files_are_named(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt is damaged"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="nothing.pt does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a sam-repro checkpoint of format 1"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert load_checkpoint(tmp_path / "foreign.pt", sam_repro_format=False) == {"model": {}}


def test_sam_eval_and_sam_analyze_refuse_it_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "shared.pt", marker)
    assert eval_cli.main([str(path), "--no-progress"]) == 2
    assert analyze.main(["hessian", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 2 and all(line.startswith("error: checkpoint ") and "refused unread" in line for line in lines)
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        open_run(path)


@pytest.mark.data
@pytest.mark.parametrize(
    "switches",
    [
        ["optimizer=sgd"],
        ["optimizer=sam", "trainer.m=32"],
        ["optimizer=asam"],
        ["optimizer=looksam", "optimizer.k=2", "trainer.max_steps=3"],
        ["optimizer=sam", "trainer.precision=fp16"],
    ],
)
def test_everything_sam_train_writes_loads_weights_only(tmp_path, switches):
    proc = train(tmp_path, *RUN_ARGS, "trainer.max_steps=2", *switches, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = tmp_path.rglob("last.pt")
    state = load_checkpoint(path)
    assert set(state) >= {"model", "optimizer", "scheduler", "loader", "rng", "config", "epoch", "step"}
    assert state["step"] == (3 if "optimizer=looksam" in switches else 2)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    if "trainer.precision=fp16" in switches:
        assert state["scaler"]["scale"] > 0
    assert open_run(path.parent.parent).model is not None  # and the analyses read it through the same loader


@pytest.mark.data
def test_resume_restores_the_rng_from_cpu_tensors_whatever_torch_load_would_map(tmp_path, monkeypatch):
    # On a GPU, loading a checkpoint with map_location=<the run's device> put the saved RNG states on the GPU, and
    # torch.set_rng_state refused them at every requeue. Stand-in for "tensors mapped elsewhere": a torch.load that
    # puts every tensor on the meta device unless the caller asks for the CPU. The resumed run must still get CPU
    # byte tensors for the RNG and end exactly as the uninterrupted run (model, optimizer, LookSAM state restored).
    from sam_repro.engine.trainer import train as train_in_process

    def config(*overrides):
        return compose_config(
            *TINY,
            "trainer.device=cpu",
            "trainer.progress=off",
            "optimizer=looksam",
            "optimizer.k=3",
            "trainer.epochs=2",
            *overrides,
        )

    reference = tmp_path / "reference"
    train_in_process(config(), reference)

    run = tmp_path / "resumed"
    train_in_process(config("trainer.max_steps=4"), run)  # stops at the end of epoch 1 (4 steps per epoch)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    real_load, real_set_rng_state, rng_states = torch.load, torch.set_rng_state, []

    def load_elsewhere(f, map_location=None, **kwargs):
        return real_load(f, map_location="cpu" if map_location == "cpu" else "meta", **kwargs)

    def set_rng_state(state):
        rng_states.append((state.device.type, state.dtype))
        real_set_rng_state(state)

    monkeypatch.setattr(torch, "load", load_elsewhere)
    monkeypatch.setattr(torch, "set_rng_state", set_rng_state)
    train_in_process(config(), run)
    monkeypatch.undo()

    assert rng_states and set(rng_states) == {("cpu", torch.uint8)}
    assert comparable(read_metrics(run)) == comparable(read_metrics(reference))
    weights, expected = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (run, reference))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.data
def test_resume_refuses_a_checkpoint_with_code(tmp_path):
    assert train(tmp_path, *RUN_ARGS, "trainer.max_steps=1", check=False).returncode == 0
    [path] = tmp_path.rglob("last.pt")
    run = path.parent.parent
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    marker = tmp_path / "ran"
    malicious_checkpoint(path, marker)
    proc = train(tmp_path, *RUN_ARGS, "trainer.max_steps=1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    assert f"error: checkpoint {path} was refused unread" in out
    assert not marker.exists()


def test_pretrained_weights_load_weights_only_and_safetensors_work(tmp_path):
    from safetensors.torch import save_file

    from sam_repro.models.timm_models import create_timm_model as timm_model

    source = timm_model(num_classes=10, timm_name="resnet18")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = timm_model(num_classes=10, timm_name="resnet18", pretrained_path=str(tmp_path / "w.safetensors"))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    marker = tmp_path / "ran"
    torch.save({"state_dict": source.state_dict(), "payload": Payload(marker)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="w.pth: it holds objects other than tensors"):
        timm_model(num_classes=10, timm_name="resnet18", pretrained_path=str(tmp_path / "w.pth"))
    assert not marker.exists()
