"""Installing beside a node's own PyTorch: version ranges, the tested constraints, the offline wheelhouse, and a core
that imports with PyTorch alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from helpers.environ import node_shell_env
from sam_repro.data.sources import cache_path

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import deps  # noqa: E402

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH_BLOCK, OTHER_BLOCK = deps.read_blocks()
PINS = dict(deps.pin(line) for line in TORCH_BLOCK + OTHER_BLOCK)


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras + PYPROJECT["build-system"]["requires"]]


# ---- ranges and constraints -------------------------------------------------------------------------------------


def test_torch_is_a_range_from_2_5_with_a_matching_torchvision():
    requirements = {r.name: r.specifier for r in declared()}
    assert "2.5.0" in requirements["torch"] and "2.4.1" not in requirements["torch"]
    assert "2.11.0" in requirements["torch"] and "3.0.0" not in requirements["torch"]
    assert "0.20.0" in requirements["torchvision"] and "0.19.1" not in requirements["torchvision"]
    assert not any(str(s).startswith("==") for name in ("torch", "torchvision") for s in requirements[name])


def test_every_declared_dependency_is_pinned_inside_its_range():
    for requirement in declared():
        name = deps.normalize(requirement.name)
        assert name in PINS, f"{requirement.name} is not in constraints.txt"
        assert PINS[name] in requirement.specifier, f"constraints.txt pins {name}=={PINS[name]}, outside {requirement}"
    assert (PINS["torch"], PINS["torchvision"]) == ("2.14.1", "0.29.1")


def test_constraints_close_over_the_dependencies_of_every_pin():
    """Every dependency of an installed pinned package is pinned too (the file is a whole resolution)."""
    env = default_environment()
    for name in PINS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                assert deps.normalize(req.name) in PINS, f"{req.name} (needed by {name}) is not in constraints.txt"


def test_this_environment_runs_the_tested_versions():
    """The suite runs with constraints.txt's versions (a stale file would claim untested ones)."""
    wrong = []
    for line in OTHER_BLOCK:
        name, version = deps.pin(line)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if "_vendor" in Path(str(dist.locate_file(""))).parts:
            continue  # a copy another package vendors (setuptools' wheel, once setuptools is imported): no install
        installed = dist.version
        if installed != version:
            wrong.append(f"{name} {installed} (constraints.txt: {version})")
    assert not wrong, "run `make setup` again: " + ", ".join(wrong)


def test_the_torch_block_holds_only_what_pytorch_alone_needs():
    others = {deps.pin(line)[0] for line in OTHER_BLOCK}
    assert {"torch", "torchvision", "triton"} <= {deps.pin(line)[0] for line in TORCH_BLOCK}
    assert not others & {"torch", "torchvision", "triton"}
    assert {
        "numpy",
        "pillow",
        "hydra-core",
        "omegaconf",
        "antlr4-python3-runtime",
        "setuptools",
        "wheel",
        "hypothesis",
        "ruff",
        "wandb-workspaces",
    } <= others


@pytest.mark.parametrize(
    "torch_version, python, kept",
    [
        ("2.11.0+cu130", (3, 12), "other"),  # a node's own build in range: keep it
        ("2.5.0", (3, 11), "other"),
        (None, (3, 11), "all"),  # no PyTorch: install the tested one
        ("2.4.1", (3, 11), "all"),  # too old: replaced by the tested one
        ("3.0.0", (3, 11), "all"),
        ("2.11.0", (3, 10), "none"),  # the pins were resolved for 3.11+
    ],
)
def test_setup_keeps_an_in_range_pytorch(torch_version, python, kept):
    pins, note = deps.constraints_for_env(torch_version, python)
    expected = {"other": OTHER_BLOCK, "all": TORCH_BLOCK + OTHER_BLOCK, "none": []}[kept]
    assert pins == expected and note


def test_an_environment_keeps_its_pytorch_and_drops_the_pins_it_rejects(monkeypatch):
    """A node's torch 2.11 requires setuptools<82 where constraints.txt pins 84.2.1: pip would upgrade torch to
    satisfy both. The pins keep the installed torch and torchvision and leave that one pin out, saying why."""
    installed = {"torch": "2.11.0+cu130", "torchvision": "0.26.0+cu130"}
    requires = {
        "torch": ["setuptools<82", "sympy>=1.13.3", 'triton==3.6.0; platform_system == "Linux"', 'opt<1; extra == "x"'],
        "torchvision": ["numpy", "torch==2.11.0"],
    }

    def version(dist):
        if dist not in installed:
            raise deps.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(deps.metadata, "version", version)
    monkeypatch.setattr(deps.metadata, "requires", lambda dist: requires[dist])
    pins = ["setuptools==84.2.1", "sympy==1.14.0", "opt==2.0", "numpy==2.4.6"]
    kept, left_out = deps.keep_installed_pytorch(pins)
    assert kept == ["sympy==1.14.0", "opt==2.0", "numpy==2.4.6", "torch==2.11.0", "torchvision==0.26.0"]
    assert left_out == ["leaving out setuptools==84.2.1: torch 2.11.0+cu130 requires setuptools<82"]
    del installed["torchvision"]  # a node without torchvision: nothing pinned for it
    assert deps.keep_installed_pytorch(["numpy==2.4.6"]) == (["numpy==2.4.6", "torch==2.11.0"], [])


def test_target_platforms_accept_every_older_manylinux():
    tags = deps.target_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"} <= set(tags)
    assert "manylinux2014_aarch64" in deps.target_platforms("manylinux_2_17_aarch64")
    assert deps.target_platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_a_constraints_file_without_its_blocks_is_one_clear_error(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("torch==2.14.1\n")
    with pytest.raises(deps.DepsError, match="not a `name==version` line inside one of the two blocks"):
        deps.read_blocks(bad)


# ---- the core without Hydra, OmegaConf or W&B ----------------------------------------------------------------------

BLOCKED = ("hydra", "omegaconf", "wandb", "timm", "tqdm", "scipy", "matplotlib", "yaml", "submitit")
BLOCKER = f"""
import importlib.abc, importlib.machinery, sys
class Absent(importlib.abc.Loader):  # `import x` fails as for a package that is not installed
    def create_module(self, spec):
        raise ModuleNotFoundError(f"blocked: {{spec.name}}", name=spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.machinery.ModuleSpec(name, Absent())
sys.meta_path.insert(0, Block())
"""


def test_the_core_imports_and_steps_with_pytorch_alone():
    """optim, models, the step, the loaders and the GPU check import (and take a SAM step) where only torch and numpy
    exist."""
    code = (
        BLOCKER
        + f"BLOCKED = {BLOCKED!r}\n"
        + """
import torch
from sam_repro.data import Data, select_train_indices
from sam_repro.data.augment import BatchAugment
from sam_repro.data.loader import EvalLoader, TrainLoader
from sam_repro.engine.checkpoint import load_checkpoint, save_checkpoint
from sam_repro.engine.distributed import init_distributed
from sam_repro.engine.evaluation import evaluate
from sam_repro.engine.provenance import provenance
from sam_repro.engine.step import StepContext, sam_step, sgd_step
from sam_repro.models import create_model
from sam_repro.optim.factory import build_optimizer, build_schedule
from sam_repro.optim.looksam import LookSAM
from sam_repro.optim.sam import SAM
import sam_repro.acceptance.run  # the GPU check, with all its parts
model = create_model("resnet8", num_classes=10)
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
loader = TrainLoader(images, torch.randint(0, 10, (32,)), 16, BatchAugment({"crop": True, "flip": True},
                     [0.5] * 3, [0.25] * 3, (32, 32)), seed=0)
for x, y in loader:
    stats = sam_step(model, opt, x, y, StepContext(group_size=8))
assert torch.isfinite(stats.loss_sum)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok []"


def test_the_blocker_does_block():
    """The check above would pass vacuously if the blocker let the modules through."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + "import sam_repro.engine.trainer"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode != 0 and "blocked: omegaconf" in result.stderr


# ---- make wheelhouse and an offline install beside an existing PyTorch -----------------------------------------------

CACHE = Path(os.environ.get("SAM_WHEELHOUSE_CACHE", "~/.cache/sam_repro/wheelhouse-test")).expanduser()
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
OFFLINE = {"PIP_CONFIG_FILE": os.devnull}
TINY = [
    "model=resnet8",
    "dataset.train_subset=256",
    "dataset.test_subset=500",
    "trainer.batch_size=64",
    "trainer.epochs=1",
    "logger.mode=disabled",
    "trainer.threads=1",
]


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """`make wheelhouse` for this Python, built once per constraints.txt and kept between runs (the project's own
    wheel is rebuilt every time)."""
    key = hashlib.sha256((ROOT / "constraints.txt").read_bytes()).hexdigest()[:12]
    dest = CACHE / f"py{PYTHON}-{key}"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "deps.py"),
            "wheelhouse",
            "--dest",
            str(dest),
            "--python-version",
            PYTHON,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, (
        "building the wheelhouse needs PyPI the first time (deselect with "
        f"-m 'not network'):\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    )
    return dest


def torch_only_site(folder: Path) -> Path:
    """A folder exposing this environment's torch, torchvision and their own dependencies, nothing else: what a node's
    PyTorch module or container offers a fresh venv (through a .pth file, like a --system-site-packages base)."""
    env = default_environment()
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, frozenset]] = [("torch", frozenset()), ("torchvision", frozenset())]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        name = deps.normalize(name)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = seen.setdefault(name, metadata.distribution(name))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    folder.mkdir()
    for dist in seen.values():
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if top != "__pycache__" and not top.endswith(".pth") and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    assert not any((folder / blocked).exists() for blocked in ("hydra", "omegaconf", "wandb", "timm"))
    return folder


@pytest.mark.network
@pytest.mark.skipif(not cache_path("cifar10").exists(), reason="CIFAR-10 is not prepared (make test does)")
def test_offline_install_beside_an_existing_pytorch_trains(wheelhouse, tmp_path):
    import torch

    # The wheelhouse: flat wheels only, no PyTorch stack, the project's own wheel and what building it needs.
    names = {deps._wheel_pin(p)[0] for p in wheelhouse.iterdir()}
    assert all(p.suffix == ".whl" for p in wheelhouse.iterdir())
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia") for n in names)
    assert {"sam-repro", "setuptools", "wheel", "antlr4-python3-runtime", "omegaconf", "hydra-core"} <= names

    # A fresh venv that sees a PyTorch (and only that) before anything is installed.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    exposed = torch_only_site(tmp_path / "node-pytorch")
    (site / "node-pytorch.pth").write_text(f"{exposed}\n")
    probe = "import json, torch; print(json.dumps([torch.__version__, torch.__file__]))"
    before = json.loads(
        subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=True, env=node_shell_env()
        ).stdout
    )
    assert before == [torch.__version__, str(exposed / "torch" / "__init__.py")]
    assert subprocess.run([str(python), "-c", "import omegaconf"], capture_output=True, env=node_shell_env()).returncode

    # The README's command, from a copy of the source, with pip told of no index and no other folder.
    source = tmp_path / "src"
    shutil.copytree(ROOT / "sam_repro", source / "sam_repro", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            str(source),
        ],
        capture_output=True,
        text=True,
        env=node_shell_env(**OFFLINE),
        timeout=1200,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]

    # PyTorch stayed where it was; the rest came from the wheelhouse into the venv.
    after = json.loads(
        subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=True, env=node_shell_env()
        ).stdout
    )
    assert after == before and not (site / "torch").exists()
    hydra_file = subprocess.run(
        [str(python), "-c", "import hydra; print(hydra.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=node_shell_env(),
    ).stdout.strip()
    assert Path(hydra_file).is_relative_to(site)

    runs = tmp_path / "runs"
    train = subprocess.run(
        [str(venv / "bin" / "sam-train"), *TINY],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=node_shell_env(SAM_RUNS_DIR=str(runs)),
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    (summary_path,) = runs.rglob("summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 1 and summary["num_train"] == 256
    assert round(summary["test_error"] * 5, 6) == round(summary["test_error"] * 5)  # k of 500 images: 0.2 k %
    packages = summary["provenance"]["packages"]
    assert packages["torch"] == metadata.version("torch") and packages["hydra-core"] == PINS["hydra-core"]
    assert packages["sam-repro"] == PYPROJECT["project"]["version"]
