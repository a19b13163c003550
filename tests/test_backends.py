"""A run's numerics (sam_repro/engine/backends.py): float32 is IEEE float32 unless `trainer.tf32=true`, set
through PyTorch's fp32_precision API; deterministic mode sets CUBLAS_WORKSPACE_CONFIG; both before any CUDA work.
The analyses run in IEEE float32. (That cuBLAS then accepts deterministic mode needs a GPU: benchmarks/gpu_check.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sam_repro.engine import trainer
from sam_repro.engine.backends import (
    ALLOCATOR_ENV,
    CUBLAS_WORKSPACE_CONFIG,
    configure,
    deterministic_cudnn,
    keep_freed_memory,
)
from sam_repro.engine.compat import has_fp32_precision_api, set_tf32

pytestmark = pytest.mark.skipif(not has_fp32_precision_api(), reason="this PyTorch has only the legacy TF32 flags")


def precisions() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.fixture(autouse=True)
def restore_backends(monkeypatch):
    """Each test changes process-wide settings: put them back."""
    before = precisions(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    (matmul, conv), deterministic, benchmark = before
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.cudnn.conv.fp32_precision = conv
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark


@pytest.fixture
def default_precisions():
    """PyTorch's defaults in a fresh process (cuDNN convolutions in TF32, matmuls unset), whatever an earlier
    in-process run set; put back afterwards."""
    saved = precisions()
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = "none", "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_fp32_is_ieee_unless_tf32_is_asked_for(default_precisions):
    assert precisions() == ("none", "tf32")  # a fresh process: cuDNN convolutions default to TF32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the legacy allow_tf32 flags warn (and raise when mixed with the new API)
        configure(deterministic=False, tf32=False)
        assert precisions() == ("ieee", "ieee")
        configure(deterministic=False, tf32=True)
        assert precisions() == ("tf32", "tf32")


def test_deterministic_mode_sets_the_cublas_workspace(monkeypatch):
    configure(deterministic=True, tf32=False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other value cuBLAS accepts: left as the user set it
    configure(deterministic=True, tf32=False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    configure(deterministic=False, tf32=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


class Stop(Exception):
    pass


def test_the_trainer_sets_them_before_any_cuda_work(monkeypatch):
    seen = {}

    def first_cuda_work(device, **options):  # init_distributed picks and binds the GPU: the first CUDA call
        seen.update(
            precisions=precisions(),
            cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        raise Stop

    set_tf32(True)
    monkeypatch.setattr(trainer, "init_distributed", first_cuda_work)
    cfg = OmegaConf.create({"trainer": {"device": "cuda", "deterministic": True, "tf32": False}})
    with pytest.raises(Stop):
        trainer.train(cfg, "unused")
    assert seen == {"precisions": ("ieee", "ieee"), "cublas": ":4096:8", "deterministic": True}


@pytest.mark.parametrize("cli", ["eval", "analyze"])
def test_the_analyses_run_in_ieee_fp32(cli, monkeypatch, tmp_path):
    from sam_repro.cli import analyze
    from sam_repro.cli import eval as eval_cli

    seen = []

    def open_run(*args, **kwargs):
        seen.append(precisions())
        raise Stop

    set_tf32(True)
    module = eval_cli if cli == "eval" else analyze
    monkeypatch.setattr(module, "open_run", open_run)
    argv = ["run", "--device", "cpu", "--no-progress"]
    with pytest.raises(Stop):
        module.main(argv if cli == "eval" else ["hessian", *argv, "--out", str(tmp_path)])
    assert seen == [("ieee", "ieee")]


def test_deterministic_cudnn_after_set_tf32():
    """`torch.backends.cudnn.flags(...)` reads the legacy allow_tf32 flag and raises once the fp32_precision API has
    been used; `deterministic_cudnn` switches only determinism and autotuning, and puts them back."""
    set_tf32(False)
    with pytest.raises(RuntimeError, match="allow_tf32"):  # why it exists: the PyTorch context manager refuses
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            pass
    torch.backends.cudnn.benchmark = True
    with deterministic_cudnn():
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert precisions() == ("ieee", "ieee")
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_the_stochastic_draws_check_runs_after_set_tf32():
    """The GPU check's replay check sets cuDNN determinism after the earlier checks switched TF32 off: its own code
    must not raise on that (it did with `cudnn.flags`, on every machine)."""
    from sam_repro.acceptance import checks

    set_tf32(False)
    env = checks.CheckEnv(torch.device("cpu"), smoke=True)
    status, detail = checks.stochastic_draws_replayed(env)
    assert status == "passed", detail


@pytest.mark.parametrize("name", ALLOCATOR_ENV)
def test_an_allocator_the_environment_chose_is_left_alone(monkeypatch, name):
    monkeypatch.setenv(name, "")
    assert keep_freed_memory() is False


def test_kept_memory_takes_the_page_faults_out_of_a_sam_step(tmp_path):
    """benchmarks/allocator.py's two arms (fresh processes): with glibc as it comes a SAM step of ResNet-8 on 128
    images faults in tens of thousands of pages that the previous step freed; with `keep_freed_memory` hardly any.
    Page faults, not times: they do not depend on the machine's load."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "allocator.json"
    command = [sys.executable, str(root / "benchmarks" / "allocator.py"), "--model", "resnet8", "--rounds", "2"]
    subprocess.run([*command, "--steps", "1", "--out", str(out)], check=True, capture_output=True, cwd=root)
    arms = json.loads(out.read_text())["arms"]
    assert arms["kept"]["applied"] is True and arms["default"]["applied"] is False
    default, kept = (arms[a]["page_faults_per_step"]["sam"] for a in ("default", "kept"))
    assert default > 10_000 and kept < default / 10, (default, kept)
