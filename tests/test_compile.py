"""trainer.compile=true: dynamo compiles the model's forward a bounded number of times in a whole run.

Counted with dynamo's own counters (torch._dynamo.utils.counters), which Hydra's logging set-up cannot hide, as it
can hide the `TORCH_LOGS=recompiles` lines. torch.compile gets dynamo's "eager" backend here: guards and
recompilations are dynamo's and the same for every backend, and the eager one skips inductor's C++ compilation
(minutes on a busy CPU).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from helpers.training import TINY, compose_config
from sam_repro.engine.trainer import train

pytestmark = pytest.mark.data


@pytest.mark.parametrize(
    "switches, graphs",
    [
        (["optimizer=sgd"], 1),
        (["optimizer=sgd", "trainer.m=32"], 1),  # ghost BatchNorm: one pass, groups inside the graph
        (["optimizer=sam"], 2),  # the perturbed pass toggles BatchNorm's track_running_stats: one guard failure
        (["optimizer=sam", "trainer.m=32"], 2),
        (["optimizer=sam", "trainer.m=32", "trainer.precision=bf16"], 2),
        (["optimizer=asam", "trainer.m=32"], 2),
        (["optimizer=looksam", "optimizer.k=2", "trainer.m=32"], 3),  # full steps' two graphs, cheap steps' one
    ],
)
def test_a_compiled_run_recompiles_at_most_twice(tmp_path, monkeypatch, switches, graphs):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    cfg = compose_config(
        *TINY, "trainer.device=cpu", "trainer.progress=off", "trainer.compile=true", "trainer.max_steps=4", *switches
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "stopped"  # trainer.max_steps=4 of 12 steps
    frames = counters["frames"]["ok"]  # one compiled frame (the model's forward), once per graph
    assert counters["stats"]["unique_graphs"] == frames == graphs
    assert frames - 1 <= 2  # recompilations
    assert not counters["graph_break"]
