"""The repository's scripts and benchmarks (Python files outside the package), imported in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_file(relative: str, name: str) -> ModuleType:
    """The file `relative` (to the repository root: `scripts/demo.py`) run as a new module named `name`, which is not
    entered in sys.modules: each call gives a fresh module."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
