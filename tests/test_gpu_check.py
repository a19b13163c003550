"""benchmarks/gpu_check.py: its parts against closed forms, and the whole run at smoke size on this CPU (the same code
a GPU runs, CUDA-only parts skipped), so that it cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_repro.acceptance import cost, run, throughput
from sam_repro.data.sources import cache_path
from sam_repro.models import create_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---- parts ------------------------------------------------------------------------------------------------------


def test_budget_runs_what_fits_and_says_why_it_skipped():
    now = [0.0]
    budget = run.Budget(100.0, clock=lambda: now[0])
    assert budget.left() == 100.0 - run.RESERVE_S
    assert budget.take("a", 50.0)
    now[0] = 60.0  # 30 s left after the reserve
    assert not budget.take("b", 31.0) and budget.take("c", 29.0)
    assert budget.skipped == [{"part": "b", "reason": "needs about 31 s, 30 s of the budget left"}]


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Quadro X", None),
    ],
)
def test_datasheet_peak_by_name(name, peak):
    assert throughput.datasheet_peak(name) == peak


def test_flops_per_image_is_the_closed_form_of_the_convolutions():
    """Forward: 2 FLOPs per multiply-add of every conv and linear layer; backward: the weight gradients (2 per MAC)
    and the input gradients (2 per MAC) of every layer but the first, whose input needs no gradient."""
    model = create_model("resnet20", num_classes=10)
    macs: list[float] = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * module.in_channels // module.groups * k)
        else:
            macs.append(output.numel() * module.in_features)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook)
    model(torch.zeros(1, 3, 32, 32))
    expected = 6 * sum(macs) - 2 * macs[0]
    assert throughput.flops_per_image("resnet20", 32, 3, 10) == expected


def test_cost_is_images_over_rate_with_flop_ratio_stand_ins():
    cells = {
        "datasets": {
            "cifar10": {"num_train": 50_000, "image_size": 32, "in_channels": 3},
            "fashion_mnist": {"num_train": 60_000, "image_size": 28, "in_channels": 1},
            "imagenet": {"num_train": 1_281_167, "image_size": 224, "in_channels": 3},
        },
        "cells": {
            "t1/a": {
                "table": 1,
                "model": "wrn28_10",
                "dataset": "cifar10",
                "optimizer": "sam",
                "epochs": 200,
                "batch_size": 256,
                "m": 32,
            },
            "t5/b": {
                "table": 5,
                "model": "wrn28_10",
                "dataset": "fashion_mnist",
                "optimizer": "sam",
                "epochs": 200,
                "batch_size": 256,
                "m": 32,
            },
            "t2/c": {
                "table": 2,
                "model": "resnet152",
                "dataset": "imagenet",
                "optimizer": "sgd",
                "epochs": 100,
                "batch_size": 4096,
                "m": 128,
            },
            "t2/d": {
                "table": 2,
                "model": "resnet50",
                "dataset": "imagenet",
                "optimizer": "sam",
                "epochs": 100,
                "batch_size": 4096,
                "m": 128,
            },
        },
    }
    rows = [
        {
            "model": "wrn28_10",
            "optimizer": "sam",
            "m": 32,
            "images_per_second": 1000.0,
            "image_size": 32,
            "precision": "bf16",
            "mode": "channels_last",
        },
        {
            "model": "wrn28_10",
            "optimizer": "sam",
            "m": 32,
            "images_per_second": 800.0,
            "image_size": 32,
            "precision": "bf16",
            "mode": "eager",
        },
        {
            "model": "resnet50",
            "optimizer": "sgd",
            "m": 128,
            "images_per_second": 3000.0,
            "image_size": 224,
            "precision": "bf16",
            "mode": "eager",
        },
    ]
    flops = {
        ("wrn28_10", 32, 3): 31.0,
        ("wrn28_10", 28, 1): 24.0,
        ("resnet50", 224, 3): 12.0,
        ("resnet152", 224, 3): 34.0,
    }
    table = cost.cost_table(cells, rows, lambda model, size, channels, classes: flops[(model, size, channels)])
    by = {c["cell"]: c for c in table["cells"]}
    assert by["t1/a"]["gpu_hours"] == pytest.approx(200 * 50_000 / 1000.0 / 3600, rel=1e-5)  # the faster row
    assert by["t1/a"]["source"] == "measured (bf16 channels_last)"
    assert by["t5/b"]["images_per_second"] == pytest.approx(1000.0 * 31 / 24, rel=1e-5)
    assert by["t2/c"]["images_per_second"] == pytest.approx(3000.0 * 12 / 34, rel=1e-5)
    assert "resnet50" in by["t2/c"]["source"]
    assert by["t2/d"]["gpu_hours"] is None and by["t2/d"]["source"] == "not measured"  # no SAM row for resnet50
    assert table["totals"]["table2"] == {"cells": 2, "gpu_hours": by["t2/c"]["gpu_hours"], "not_measured": 1}
    assert table["total_gpu_hours"] == pytest.approx(sum(t["gpu_hours"] for t in table["totals"].values()), rel=1e-5)


def test_the_shipped_cells_name_only_networks_the_check_can_rate():
    cells = cost.load_cells()["cells"]
    timed = {run.WRN.model, *(net.model for net in run.OTHERS)}
    assert {c["model"] for c in cells.values()} <= timed | set(cost.STAND_INS)
    assert set(cost.STAND_INS.values()) <= timed
    assert {c["m"] for c in cells.values() if c["model"] in timed | set(cost.STAND_INS)} <= {
        net.m for net in (run.WRN, *run.OTHERS)
    }


def test_targets_and_comparisons_from_rows():
    def row(optimizer, m, ips, mfu=None):
        return {
            "model": "wrn28_10",
            "optimizer": optimizer,
            "m": m,
            "precision": "bf16",
            "mode": "channels_last",
            "images_per_second": ips,
            "mfu": {"datasheet": None, "measured_matmul": mfu},
        }

    rows = [row("sgd", 32, 1000.0, 0.55), row("sgd", 256, 1100.0), row("sam", 32, 480.0), row("sam", 256, 560.0)]
    checks = [{"name": "host reads per step: none, one in fp16", "status": "failed", "detail": "loader: 1"}]
    targets = {t["name"].split(" at ")[0]: t["status"] for t in run._targets(rows, checks, smoke=False)}
    assert list(targets.values()) == ["met", "not met", "not met"]  # 55% MFU; 0.48x; a synchronisation
    ratios = {c["name"].split(" (")[0]: c["ratio"] for c in run._comparisons(rows)}
    assert ratios == {
        "SGD with m = 32 BatchNorm groups vs the whole batch": round(1000 / 1100, 3),
        "SAM m = 32 vs SGD m = 32": 0.48,
        "SAM vs SGD, whole batch": round(560 / 1100, 3),
    }
    assert run.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_smoke_without_out_is_refused():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--smoke needs --out FILE" in result.stderr


# ---- the whole run at smoke size ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    """`gpu_check.py --smoke` once for the tests below, on a CIFAR-10 export when the data is prepared. The budget
    is set out of reach so that what runs does not depend on this machine's speed."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    args = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--smoke",
        "--out",
        str(tmp / "check.json"),
        "--budget-s",
        "1e9",
    ]
    if cache_path("cifar10").exists():
        export = tmp / "cifar10-subset256.npz"
        made = subprocess.run(
            [str(BIN / "sam-data"), "cifar10", "--export-subset", "256", "--test-subset", "200", "--out", str(export)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert made.returncode == 0, made.stderr[-2000:]
        args += ["--data", str(export)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=tmp)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((tmp / "check.json").read_text()), result.stdout, tmp


def test_smoke_reports_every_check_and_none_fails(smoke):
    report, stdout, _ = smoke
    from sam_repro.acceptance.checks import CHECKS

    names = [c["name"] for c in report["correctness"]]
    assert names == [c.name for c in CHECKS]
    assert all(
        set(c) >= {"name", "status", "detail"} and c["status"] in ("passed", "skipped") for c in report["correctness"]
    )
    for check, result in zip(CHECKS, report["correctness"]):
        assert (result["status"] == "skipped") == check.needs_cuda, result
        assert f"check {result['status']}: {result['name']}: " in stdout
    # CUDA checks whose code runs on a CPU did run it, and it worked there.
    ran = {c["name"]: c["detail"] for c in report["correctness"] if c["detail"].startswith("needs CUDA; its code ran")}
    assert any(name.startswith("resume on CUDA") for name in ran) and any(name.startswith("DDP") for name in ran)
    passed = sum(c["status"] == "passed" for c in report["correctness"])
    assert stdout.strip().splitlines()[-1] == f"gpu check: {passed} of {len(names)} correctness checks passed"


def test_smoke_throughput_rows_are_consistent(smoke):
    report, stdout, _ = smoke
    rows = report["throughput"]
    assert {r["model"] for r in rows} >= {"wrn28_10", "shake_shake_26_2x96d", "pyramidnet272", "resnet32"}
    assert {r["mode"] for r in rows if r["model"] == "wrn28_10"} >= {"eager", "channels_last"}
    assert any("compile" in r["mode"] for r in rows)
    matmul = report["matmul"]["tflops"]
    for r in rows:
        assert set(r) >= {"model", "optimizer", "m", "precision", "mode", "images_per_second", "peak_memory_gb", "mfu"}
        assert f"throughput {throughput.format_row(r)}" in stdout
        assert r["images_per_second"] == pytest.approx(r["batch"] / r["step_s"], rel=1e-3)
        assert r["mfu"]["measured_matmul"] == pytest.approx(r["step_tflop"] / r["step_s"] / matmul, rel=2e-3, abs=1e-4)
        assert r["mfu"]["datasheet"] is None and r["peak_memory_gb"] is None  # a CPU has neither
    sam = {(r["model"], r["m"]): r["step_tflop"] for r in rows if r["optimizer"] == "sam" and r["mode"] == "eager"}
    sgd = {(r["model"], r["m"]): r["step_tflop"] for r in rows if r["optimizer"] == "sgd" and r["mode"] == "eager"}
    for key in sam.keys() & sgd.keys():  # SAM is two forward-backward passes of the same network
        assert sam[key] == pytest.approx(2 * sgd[key], rel=0.01)


def test_smoke_cost_covers_tables_1_2_4_5(smoke):
    report, _, _ = smoke
    table = report["cost"]
    assert {name: t["cells"] for name, t in table["totals"].items()} == {
        "table1": 60,
        "table2": 18,
        "table4": 8,
        "table5": 16,
    }
    for cell in table["cells"]:
        if cell["gpu_hours"] is not None:
            assert cell["gpu_hours"] == pytest.approx(cell["images"] / cell["images_per_second"] / 3600, rel=1e-4)


@pytest.mark.skipif(not cache_path("cifar10").exists(), reason="CIFAR-10 is not prepared (make test does)")
def test_smoke_trains_on_the_export(smoke):
    report, stdout, _ = smoke
    real = report["real_data"]
    assert real["num_train"] == 256 and real["num_test"] == 200 and real["epochs"] == 1
    for name in ("sgd", "sam"):
        (error,) = real["runs"][name]["test_error"]
        assert 0 <= error <= 100 and math.isclose(error * 2, round(error * 2))  # k of 200 images: 0.5 k %
    assert "real data: sam epoch 1/1: test error" in stdout


def test_smoke_writes_json_and_markdown_with_provenance(smoke):
    report, stdout, tmp = smoke
    assert set(report["provenance"]) >= {"command", "git_commit", "packages", "machine", "time"}
    assert report["smoke"] is True and report["gpu"] == "cpu"
    md = (tmp / "check.md").read_text()
    for heading in (
        "# GPU check: cpu (smoke",
        "## Correctness",
        "## Throughput",
        "## Cost on this GPU",
        "## Real data",
        "## Skipped",
    ):
        assert heading in md
    assert re.search(r"\| table1 \| 60 \| [\d.]+ \| 0 \|", md)


def test_a_failing_row_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    """Every throughput row raises: each is recorded with its error, the parts after it still run and are written,
    and the exit status says it failed."""
    from sam_repro.acceptance import checks

    def broken_row(self, spec):
        raise ValueError(f"no kernel for {spec.model}")

    monkeypatch.setattr(run.Bench, "row", broken_row)
    monkeypatch.setattr(checks, "CHECKS", (checks.Check("replay", checks.stochastic_draws_replayed),))
    monkeypatch.setattr(run.training, "find_cifar10", lambda data: None)
    assert run.main(["--smoke", "--budget-s", "1e9", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 1
    report = json.loads((tmp_path / "x.json").read_text())
    assert report["throughput"] == [] and len(report["failed_rows"]) >= 4
    assert all(f["error"].startswith("ValueError: no kernel for ") for f in report["failed_rows"])
    assert report["correctness"][0]["status"] == "passed" and report["cost"]["totals"]
    assert "throughput row failed" in (tmp_path / "x.md").read_text()


def test_a_real_data_run_past_its_time_is_one_error(tmp_path):
    """The real-data part's sam-train probe is stopped at a third of the time given and reported as one error naming
    the command, not a traceback (the GPU check records it and goes on)."""
    from sam_repro.acceptance import training
    from sam_repro.errors import SamReproError

    with pytest.raises(SamReproError, match=r"sam-train model=wrn16_4 .*optimizer=sam .*did not finish within 1 s"):
        training.short_training(["dataset.export=/nonexistent.npz"], 200, "cpu", 3.0, False, tmp_path)
