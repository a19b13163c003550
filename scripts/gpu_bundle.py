"""`make gpu-bundle`: one folder that a GPU node with PyTorch, numpy and timm, and no internet, runs as it is.

    python scripts/gpu_bundle.py [--dest gpu-bundle] [--train 10000] [--test 2000] [--python-version 3.12]

    gpu-bundle/
      run.sh                    ./run.sh [--smoke] [--budget-s 540] [--only tests|check]  (scripts/gpu_bundle_run.sh)
      wheels/                   what the trainer and the CUDA tier need beyond PyTorch, numpy and timm: hydra-core,
                                omegaconf, antlr4-python3-runtime (built here from its source archive), PyYAML,
                                packaging, pytest with what it needs, pip to install them offline, and the project's
                                own wheel (installed without its declared dependencies: no W&B, no submitit)
      cifar10-subset<N>.npz     `sam-data cifar10 --export-subset N --test-subset M`
      tests/                    tests/conftest.py, tests/helpers/ and tests/test_cuda.py: `pytest -m cuda`
      pyproject.toml            the project's, for pytest's settings (markers, --strict-markers)
      MANIFEST.json             every file with its size and SHA-256, the versions, the export's metadata, provenance

At most MAX_MIB, so that it travels beside a checkout within a 64 MiB allowance. The wheels are downloaded once
into a cache (~/.cache/sam_repro/gpu-bundle-wheels, keyed by constraints.txt and the target Python) and resolved
for the target from the folder alone before it is written, so a missing wheel fails here, not on the node.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

import deps

ROOT = Path(__file__).resolve().parents[1]
MAX_MIB = 60
# The closure of hydra-core, omegaconf and pytest (constraints.txt's versions); check_resolves proves it whole.
BUNDLED = (
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "PyYAML",
    "packaging",
    "pytest",
    "pluggy",
    "iniconfig",
    "Pygments",
)
INSTALLED = ["hydra-core", "omegaconf", "pytest"]  # what run.sh asks pip for; the rest follows from these
BUILD_ONLY = ("setuptools", "wheel")  # to build antlr4's source archive and the project's wheel, not shipped
TESTS = ("conftest.py", "helpers", "test_cuda.py")
CACHE = Path(os.environ.get("SAM_BUNDLE_CACHE", "~/.cache/sam_repro/gpu-bundle-wheels")).expanduser()


class BundleError(Exception):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_wheels(dest: Path, python_version: str, platform: str, log=print) -> list[Path]:
    """The bundle's wheels into `dest`: downloaded into the cache once, antlr4 and the project built there."""
    _, other = deps.read_blocks()
    pins = {deps.pin(line)[0]: line for line in other}
    wanted = [pins[deps.normalize(name)] for name in (*BUNDLED, *BUILD_ONLY)]
    key = hashlib.sha256(deps.CONSTRAINTS.read_bytes()).hexdigest()[:12]
    cache = CACHE / f"py{python_version}-{platform}-{key}"
    pip_line = f"pip=={metadata.version('pip')}"  # the pip that built the bundle installs it on the node
    deps.download_pins(cache, [*wanted, pip_line], python_version, platform, log)
    deps.build_sdists(cache, log)
    project = deps.build_project_wheel(cache)

    dest.mkdir(parents=True)
    shipped = {deps.normalize(name) for name in BUNDLED} | {"pip"}
    for wheel in cache.glob("*.whl"):
        if deps._wheel_pin(wheel)[0] in shipped:
            shutil.copy2(wheel, dest / wheel.name)
    shutil.copy2(project, dest / project.name)
    deps.check_resolves([dest], INSTALLED, python_version, platform, f"the bundle's closure {BUNDLED} is incomplete")
    return sorted(dest.glob("*.whl"))


def build_bundle(dest: Path, n_train: int, n_test: int, python_version: str, platform: str, log=print) -> dict:
    from sam_repro.cli.data import main as sam_data
    from sam_repro.data.export import read_export
    from sam_repro.engine.provenance import provenance
    from sam_repro.files import atomic_write_json

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wheels = bundle_wheels(dest / "wheels", python_version, platform, log)

    export = dest / f"cifar10-subset{n_train}.npz"
    args = ["cifar10", "--export-subset", str(n_train), "--test-subset", str(n_test), "--out", str(export)]
    if sam_data(args) != 0:
        raise BundleError(f"`sam-data {' '.join(args)}` failed (is CIFAR-10 prepared? `make data`)")
    _, export_meta = read_export(export)

    (dest / "tests").mkdir()
    for name in TESTS:
        source = ROOT / "tests" / name
        if source.is_dir():
            shutil.copytree(source, dest / "tests" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / "tests" / name)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(ROOT / "scripts" / "gpu_bundle_run.sh", dest / "run.sh")
    (dest / "run.sh").chmod(0o755)

    files = sorted(p for p in dest.rglob("*") if p.is_file())
    manifest = {
        "python_version": python_version,
        "platform": platform,
        "wheels": [p.name for p in wheels],
        "export": {k: export_meta[k] for k in ("dataset", "num_train", "num_test", "subset_seed", "sha256")},
        "files": {str(p.relative_to(dest)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        "provenance": provenance(),
    }
    atomic_write_json(dest / "MANIFEST.json", manifest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > MAX_MIB * 2**20:
        raise BundleError(
            f"{dest} holds {size / 2**20:.1f} MiB, more than {MAX_MIB} MiB: export fewer images (--train, --test)"
        )
    manifest["bytes"] = size
    log(
        f"gpu-bundle: {dest} ({size / 2**20:.1f} MiB): {len(wheels)} wheels, {n_train} training and {n_test} test "
        f"images; on the node: cd {dest.name} && ./run.sh"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "gpu-bundle")
    parser.add_argument("--train", type=int, default=10_000, help="training images in the export (default 10000)")
    parser.add_argument("--test", type=int, default=2_000, help="test images in the export (default 2000)")
    parser.add_argument("--python-version", default="3.12", help="the node's Python (default 3.12)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64")
    args = parser.parse_args(argv)
    try:
        build_bundle(args.dest, args.train, args.test, args.python_version, args.platform)
    except (BundleError, deps.DepsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
