"""The project's dependencies for `make setup` and `make wheelhouse`, from constraints.txt (stdlib only: this runs
before anything is installed).

    python scripts/deps.py constraints OUT       # the constraints for the running interpreter's environment
    python scripts/deps.py wheelhouse [--dest wheelhouse] [--python-version 3.12] [--platform manylinux_2_28_x86_64]

constraints.txt has two blocks: PyTorch with what only PyTorch needs, and everything else. `constraints` writes the
whole file, or only the second block when the environment already has a PyTorch in the supported range (a venv made
with --system-site-packages over a node's PyTorch, a conda environment...), so that pip keeps that PyTorch instead of
replacing it with the tested one.

`wheelhouse` puts into one flat folder a wheel of every package of the second block (runtime, dev and wandb-report
extras, setuptools and wheel to build the project) for the target Python and platform, builds the packages published
only as source (omegaconf's antlr4-python3-runtime) into wheels, adds the project's own wheel, and then proves the
folder complete: pip resolves `sam-repro[dev,wandb-report]` from the folder alone, for the target, with stand-ins for
torch and torchvision (which a node brings itself). Wheels already in the folder are kept, so a rerun downloads only
what changed. Then, on a node without internet, beside its PyTorch:

    pip install --no-index --find-links wheelhouse .        # or: ... --find-links wheelhouse sam-repro
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
TORCH_BLOCK = "# ---- PyTorch"
OTHER_BLOCK = "# ---- everything else"
TORCH_RANGE = ((2, 5), (3, 0))  # pyproject.toml: torch>=2.5,<3
TESTED_PYTHON = (3, 11)  # the interpreter constraints.txt was resolved for; older ones get the ranges only
STUBBED = ("torch", "torchvision")  # what a node brings itself


class DepsError(Exception):
    pass


def normalize(name: str) -> str:
    """PEP 503 name: `Jinja2`, `typing_extensions` -> `jinja2`, `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_blocks(path: Path = CONSTRAINTS) -> tuple[list[str], list[str]]:
    """(PyTorch block, everything else) as `name==version` lines, in file order."""
    blocks: dict[str, list[str]] = {TORCH_BLOCK: [], OTHER_BLOCK: []}
    current = None
    for line in path.read_text().splitlines():
        marker = next((m for m in blocks if line.startswith(m)), None)
        if marker:
            current = marker
        elif line.strip() and not line.startswith("#"):
            if current is None or "==" not in line:
                raise DepsError(f"{path}: {line!r} is not a `name==version` line inside one of the two blocks")
            blocks[current].append(line.strip())
    if not blocks[TORCH_BLOCK] or not blocks[OTHER_BLOCK]:
        raise DepsError(f"{path}: expected the blocks {TORCH_BLOCK!r} and {OTHER_BLOCK!r}")
    return blocks[TORCH_BLOCK], blocks[OTHER_BLOCK]


def pin(line: str) -> tuple[str, str]:
    name, version = line.split("==", 1)
    return normalize(name), version.split(";")[0].strip()


def _release(version: str) -> tuple[int, int]:
    numbers = re.match(r"(\d+)\.(\d+)", version)
    return (int(numbers.group(1)), int(numbers.group(2))) if numbers else (0, 0)


def installed_torch() -> str | None:
    """The torch version this interpreter's environment has (None if none): read from its metadata, not imported."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def constraints_for_env(
    torch_version: str | None, python: tuple[int, int], path: Path = CONSTRAINTS
) -> tuple[list[str], str]:
    """The pins to install with, and a note saying which were left out and why."""
    torch_block, other = read_blocks(path)
    if python < TESTED_PYTHON:
        return [], (
            f"constraints.txt was resolved for Python >= {TESTED_PYTHON[0]}.{TESTED_PYTHON[1]}; on "
            f"{python[0]}.{python[1]} pip installs within the ranges of pyproject.toml"
        )
    if torch_version is not None and TORCH_RANGE[0] <= _release(torch_version) < TORCH_RANGE[1]:
        return other, (
            f"keeping this environment's torch {torch_version} (the PyTorch block of constraints.txt is left out)"
        )
    return torch_block + other, "installing the tested set of constraints.txt"


def _requirement():
    """packaging's Requirement: the installed one, else the copy pip vendors (this runs before anything is installed);
    None where neither exists."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def keep_installed_pytorch(pins: list[str], dists: tuple[str, ...] = STUBBED) -> tuple[list[str], list[str]]:
    """For an environment whose PyTorch stays: torch and torchvision pinned to the installed versions, so that pip
    fails rather than replace them, and the other pins that their own requirements reject left out (torch 2.11
    requires setuptools<82 where constraints.txt pins 84.2.1: pip would otherwise upgrade torch to satisfy both).
    Returns the pins and one line per pin left out."""
    requirement = _requirement()
    by_name = dict(pin(line) for line in pins)
    rejected: dict[str, str] = {}
    installed = []
    for dist in dists:
        try:
            version, requires = metadata.version(dist), metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        installed.append(f"{dist}=={version.split('+')[0]}")  # == without a local label matches +cu130 builds
        for line in requires if requirement is not None else []:
            req = requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = normalize(req.name)
            if name in by_name and not req.specifier.contains(by_name[name], prereleases=True):
                rejected[name] = f"leaving out {name}=={by_name[name]}: {dist} {version} requires {req}"
    kept = [line for line in pins if pin(line)[0] not in rejected and pin(line)[0] not in dists]
    return kept + installed, list(rejected.values())


# ---- the wheelhouse ---------------------------------------------------------------------------------------------


def target_platforms(platform: str) -> list[str]:
    """pip takes wheels for exactly the platforms given; a node with glibc 2.28 also runs every older manylinux
    wheel."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    newest, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{alias}_{arch}" for minor, alias in legacy.items() if minor <= newest]


def _target_args(python_version: str, platform: str) -> list[str]:
    args = ["--python-version", python_version, "--implementation", "cp"]
    for tag in target_platforms(platform):
        args += ["--platform", tag]
    return args


def _pip(*args: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if offline:
        # Nothing but the folders named on the command line: no index, no find-links from pip's config or env.
        env["PIP_CONFIG_FILE"] = os.devnull
        for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
            env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise DepsError(f"{what} failed:\n{tail}")


def _build_wheel(source: str, dest: Path, what: str) -> None:
    """A wheel of `source` (an sdist or a project folder) into `dest`, its build requirements from `dest` alone."""
    _check(
        _pip(
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--find-links",
            str(dest),
            "--wheel-dir",
            str(dest),
            source,
            offline=True,
        ),
        what,
    )


def _wheel_pin(path: Path) -> tuple[str, str]:
    """`numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl` -> ("numpy", "2.4.6")."""
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """A metadata-only wheel that stands in for `name` so the resolver can check the rest without downloading it."""
    dist = f"{name}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: sam-repro\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')}"
        f",{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def download_pins(dest: Path, lines: list[str], python_version: str, platform: str, log=print) -> None:
    """Wheels (or sdists where no wheel exists) of the `name==version` lines not yet in `dest`, for the target."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {_wheel_pin(p) for p in dest.glob("*.whl")}
    missing = [line for line in lines if pin(line) not in have]
    if missing:
        log(f"wheels: downloading {len(missing)} of {len(lines)} packages for Python {python_version}, {platform}")
        # --no-deps: the pins are the whole closure already; it also lets pip fetch an sdist where no wheel exists.
        _check(
            _pip(
                "download",
                "--quiet",
                "--no-deps",
                "--prefer-binary",
                "--dest",
                str(dest),
                *_target_args(python_version, platform),
                *missing,
            ),
            "pip download",
        )


def build_sdists(dest: Path, log=print) -> None:
    """Build every source archive in `dest` into a pure-Python wheel there (setuptools and wheel from `dest`)."""
    for sdist in sorted([*dest.glob("*.tar.gz"), *dest.glob("*.zip")]):
        log(f"wheels: building {sdist.name} into a wheel")
        before = set(dest.glob("*.whl"))
        _build_wheel(str(sdist), dest, f"building {sdist.name}")
        built = [p.name for p in set(dest.glob("*.whl")) - before]
        if not all(name.endswith("-none-any.whl") for name in built):
            raise DepsError(
                f"{sdist.name} built into {', '.join(built)}, which is for this machine only, not the "
                f"target: build the wheelhouse on a machine like the node"
            )
        sdist.unlink()


def build_project_wheel(dest: Path, project: Path = ROOT) -> Path:
    """The project's own wheel into `dest` (an older one there is replaced); its build backend from `dest`."""
    for old in dest.glob("sam_repro-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="sam-wheelhouse-src-") as src:
        # A clean copy of what the build reads, so no stale build/ folder of the checkout leaks into the wheel.
        shutil.copytree(
            project / "sam_repro", Path(src) / "sam_repro", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(project / name, Path(src) / name)
        _build_wheel(src, dest, "building the project's wheel")
    (wheel,) = dest.glob("sam_repro-*.whl")
    return wheel


def check_resolves(folders: list[Path], requirements: list[str], python_version: str, platform: str, what: str) -> None:
    """pip resolves `requirements` for the target from `folders` alone (no index, nothing installed counted)."""
    with tempfile.TemporaryDirectory(prefix="sam-wheels-check-") as tmp:
        links = [arg for folder in folders for arg in ("--find-links", str(folder))]
        _check(
            _pip(
                "install",
                "--dry-run",
                "--ignore-installed",
                "--no-index",
                "--only-binary=:all:",
                *links,
                *_target_args(python_version, platform),
                "--target",
                str(Path(tmp) / "t"),
                *requirements,
                offline=True,
            ),
            f"resolving {' '.join(requirements)} from {', '.join(str(f) for f in folders)} alone ({what})",
        )


def build_wheelhouse(
    dest: Path, python_version: str, platform: str, constraints: Path = CONSTRAINTS, project: Path = ROOT, log=print
) -> list[Path]:
    start = time.perf_counter()
    torch_block, other = read_blocks(constraints)
    download_pins(dest, other, python_version, platform, log)
    build_sdists(dest, log)
    build_project_wheel(dest, project)

    forbidden = [
        p.name for p in dest.glob("*.whl") if normalize(p.name.split("-")[0]) in {pin(line)[0] for line in torch_block}
    ]
    if forbidden:
        raise DepsError(f"{dest} holds PyTorch-stack wheels ({', '.join(forbidden)}); a node brings its own")

    with tempfile.TemporaryDirectory(prefix="sam-wheelhouse-check-") as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        pins = dict(pin(line) for line in torch_block)
        for name in STUBBED:
            stub_wheel(stubs, name, pins[name])
        check_resolves([dest, stubs], ["sam-repro[dev,wandb-report]"], python_version, platform, "a wheel is missing")

    wheels = sorted(dest.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels) / 2**20
    log(
        f"wheelhouse: {len(wheels)} wheels, {size:.0f} MB in {dest} ({time.perf_counter() - start:.0f} s); "
        f"complete for Python {python_version} on {platform} beside the node's torch and torchvision"
    )
    return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("constraints", help="write the constraints for this interpreter's environment")
    env.add_argument("out", type=Path)
    house = sub.add_parser("wheelhouse", help="build a flat folder of wheels for an offline install")
    house.add_argument("--dest", type=Path, default=ROOT / "wheelhouse")
    house.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    house.add_argument("--platform", default="manylinux_2_28_x86_64")
    house.add_argument("--constraints", type=Path, default=CONSTRAINTS)
    args = parser.parse_args(argv)
    try:
        if args.command == "constraints":
            torch_version = installed_torch()
            pins, note = constraints_for_env(torch_version, sys.version_info[:2])
            left_out = []
            if pins and not any(pin(line)[0] == "torch" for line in pins):  # this environment's PyTorch stays
                pins, left_out = keep_installed_pytorch(pins)
            args.out.write_text("\n".join(pins) + "\n")
            for line in [note, *left_out]:
                print(f"setup: {line}", file=sys.stderr)
        else:
            build_wheelhouse(args.dest, args.python_version, args.platform, args.constraints)
    except DepsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
