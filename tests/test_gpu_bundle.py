"""`make gpu-bundle` and the bundle's run.sh, end to end on a simulated GPU node, so that the bundle cannot rot
between GPU runs.

The node is what the lent GPU machine has (scripts/torch_envs.py `node`): a venv of Python 3.12 with torch 2.11,
torchvision 0.26, timm and numpy and nothing else, built once from the package index and cached outside the
repository. Its `python3` comes first on the PATH, nothing points at this checkout, and the bundle is built small
(256 training, 200 test images). What this cannot see: CUDA (the cuda tier is collected and skipped, the GPU check
runs at smoke size on the CPU) and the node's own filesystem layout beyond a venv holding its PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_bundle  # noqa: E402
import torch_envs  # noqa: E402

from helpers.environ import node_shell_env  # noqa: E402
from sam_repro.acceptance.checks import CHECKS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.data]


@pytest.fixture(scope="module")
def node() -> Path:
    try:
        torch_envs.find_python(torch_envs.NODE.python)
    except torch_envs.EnvError as error:
        pytest.skip(str(error))
    return torch_envs.ensure(torch_envs.NODE)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    gpu_bundle.build_bundle(dest, 256, 200, "3.12", "manylinux_2_28_x86_64", log=lambda line: None)
    return dest


def test_the_bundle_holds_the_closure_and_no_pytorch_or_wandb(bundle):
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    names = {w.split("-")[0].lower() for w in manifest["wheels"]}
    assert {"hydra_core", "omegaconf", "antlr4_python3_runtime", "pyyaml", "pytest", "pip", "sam_repro"} <= names
    assert not names & {"torch", "torchvision", "numpy", "timm", "wandb", "submitit", "hydra_submitit_launcher"}
    assert manifest["export"]["num_train"] == 256 and manifest["export"]["num_test"] == 200
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert on_disk == set(manifest["files"]) and "tests/test_cuda.py" in on_disk and "run.sh" in on_disk


def test_an_incomplete_closure_is_refused_here(monkeypatch, tmp_path):
    """Without PyYAML (omegaconf needs it) the folder does not resolve for the node: the build says so."""
    monkeypatch.setattr(gpu_bundle, "BUNDLED", tuple(n for n in gpu_bundle.BUNDLED if n != "PyYAML"))
    with pytest.raises(gpu_bundle.deps.DepsError, match="incomplete"):
        gpu_bundle.bundle_wheels(tmp_path / "wheels", "3.12", "manylinux_2_28_x86_64", log=lambda line: None)


def test_run_sh_smoke_on_a_simulated_node(node, bundle, tmp_path):
    out, venv = tmp_path / "out", tmp_path / "venv"
    env = node_shell_env(
        PATH=f"{node / 'bin'}{os.pathsep}{os.environ['PATH']}",
        OUT=str(out),
        SAM_BUNDLE_VENV=str(venv),
        TMPDIR=str(tmp_path),
        SAM_DATA_DIR=str(tmp_path / "no-data"),  # the node has no CIFAR-10 but the bundle's export
    )
    result = subprocess.run(["./run.sh", "--smoke"], cwd=bundle, env=env, capture_output=True, text=True, timeout=3000)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert f"run.sh: node: {node / 'bin' / 'python3'}" in log

    # The venv: the node's PyTorch where it was, the rest installed into the venv, no W&B.
    probe = (
        "import json, importlib.util, torch, hydra, sam_repro; print(json.dumps([torch.__file__, hydra.__file__, "
        "sam_repro.__file__, importlib.util.find_spec('wandb') is None]))"
    )
    where = json.loads(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe],
            cwd=tmp_path,
            env=node_shell_env(),
            capture_output=True,
            text=True,
        ).stdout
    )
    assert Path(where[0]).is_relative_to(node) and where[3]
    assert all(Path(p).is_relative_to(venv) for p in where[1:3])

    # pytest -m cuda collected the whole tier and skipped it (no CUDA here).
    suite = ET.parse(out / "pytest_cuda.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(CHECKS) and all(c.find("skipped") is not None for c in cases)
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0

    # The GPU check ran at smoke size on the bundle's export.
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] and [c["name"] for c in report["correctness"]] == [c.name for c in CHECKS]
    assert all(c["status"] in ("passed", "skipped") for c in report["correctness"])
    assert report["real_data"] is not None and "cifar10-subset256.npz" in report["real_data"]["source"]
    assert not report["errors"] and (out / "gpu_check.md").exists() and (out / "run.log").exists()

    # The trainer runs in that venv without W&B (logger.mode=disabled, as debug=tiny sets it).
    runs = tmp_path / "runs"
    train = subprocess.run(
        [str(venv / "bin" / "sam-train"), "debug=tiny", "trainer.epochs=1"],
        cwd=tmp_path,
        env=node_shell_env(SAM_RUNS_DIR=str(runs)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    (summary,) = runs.rglob("summary.json")
    assert json.loads(summary.read_text())["status"] == "finished"
