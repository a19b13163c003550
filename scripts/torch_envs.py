"""Cached virtual environments with a given PyTorch, outside the repository, built once from the package index:

    python scripts/torch_envs.py node        # what the lent GPU node has: Python 3.12, torch 2.11, torchvision 0.26,
                                             # timm and numpy, nothing else (tests/test_gpu_bundle.py runs the
                                             # bundle's run.sh on it)

Prints the environment's folder. Environments live under $SAM_ENVS_DIR (default ~/.cache/sam_repro/envs), one
folder per name, Python and PyTorch; a folder counts as built once its `.complete` stamp exists (a build cut short
is redone). The interpreter comes from $SAM_PYTHON<major><minor> (SAM_PYTHON312=/path/to/python3.12), else
`python3.12` on the PATH, else pyenv's newest 3.12.x. Needs the package index the first time (several GB: PyPI's
PyTorch for Linux is the CUDA build).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVS = Path(os.environ.get("SAM_ENVS_DIR", "~/.cache/sam_repro/envs")).expanduser()
STAMP = ".complete"


@dataclass(frozen=True)
class TorchEnv:
    name: str
    python: str  # "3.12"
    packages: tuple[str, ...]  # pip requirement lines

    @property
    def folder(self) -> Path:
        torch = next(p.split("==")[1] for p in self.packages if p.startswith("torch=="))
        return ENVS / f"{self.name}-torch{torch}-py{self.python}"


# The lent GPU node (its image's versions); timm and numpy at constraints.txt's pins.
NODE = TorchEnv("node", "3.12", ("torch==2.11.0", "torchvision==0.26.0", "timm==1.0.31", "numpy==2.4.6"))
ENVIRONMENTS = {env.name: env for env in (NODE,)}


class EnvError(Exception):
    pass


def _runs(python: Path | str) -> bool:
    """Whether `python` starts and has venv (a pyenv shim for a version that is installed but not selected fails)."""
    try:
        result = subprocess.run([str(python), "-c", "import venv"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def find_python(version: str) -> Path:
    """An interpreter of `version` ("3.12") that runs: $SAM_PYTHON312, `python3.12` on the PATH, or pyenv's newest."""
    variable = f"SAM_PYTHON{version.replace('.', '')}"
    override = os.environ.get(variable)
    if override:
        if not _runs(override):
            raise EnvError(f"{variable}={override} does not run (or lacks venv)")
        return Path(override)
    found = shutil.which(f"python{version}")
    if found and _runs(found):
        return Path(found)
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser() / "versions"
    candidates = sorted(
        pyenv.glob(f"{version}.*/bin/python{version}"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parts[-3].split(".")],
    )
    for candidate in reversed(candidates):
        if _runs(candidate):
            return candidate
    raise EnvError(f"no Python {version} that runs: set {variable} or put python{version} on the PATH")


def ensure(env: TorchEnv, log=print) -> Path:
    """The environment's folder, built first if it is not complete."""
    folder = env.folder
    if (folder / STAMP).exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    python = find_python(env.python)
    log(f"{env.name}: building {folder} with {python} ({' '.join(env.packages)}; needs the package index)")
    made = subprocess.run([str(python), "-m", "venv", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        raise EnvError(f"{python} -m venv {folder} failed:\n{(made.stdout + made.stderr)[-3000:]}")
    pip = [str(folder / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    for args in (["install", "-q", "--upgrade", "pip"], ["install", "-q", *env.packages]):
        result = subprocess.run([*pip, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise EnvError(f"pip {' '.join(args)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    freeze = subprocess.run([*pip, "freeze"], capture_output=True, text=True, check=True).stdout
    (folder / STAMP).write_text(freeze)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(ENVIRONMENTS))
    args = parser.parse_args(argv)
    try:
        print(ensure(ENVIRONMENTS[args.name], log=lambda line: print(line, file=sys.stderr)))
    except (EnvError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
