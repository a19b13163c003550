"""Shared test set-up: one torch thread per test process (the CI machine has two cores; the heavier tests run
training subprocesses beside the test process), the skip of tests that need the real CIFAR-10, fixtures that
several modules use, and `figures`, lines a test leaves for the end of the run (how many cases a fuzz test tried),
printed in pytest's terminal summary. Shared helper functions live in tests/helpers/."""

import types

import pytest
import torch

from helpers.checkpoints import fake_arrays
from sam_repro.data import sources

CIFAR10_MISSING = "CIFAR-10 is not prepared: run `sam-data cifar10` (make test does)"
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False); run `pytest -m cuda` on a GPU node"
FIGURES = pytest.StashKey[list]()


def pytest_collection_modifyitems(config, items):
    """Tests marked `data` train or evaluate on the real CIFAR-10, tests marked `cuda` need a GPU: skipped, with the
    reason, where it is missing."""
    skips = {}
    if not sources.cache_path("cifar10").exists():
        skips["data"] = pytest.mark.skip(reason=CIFAR10_MISSING)
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_dataset(monkeypatch):
    """Replace the data layer's `load_arrays` by one that serves `fake_arrays()` and records its calls."""
    arrays, calls = fake_arrays(), []

    def load_arrays(name, root=None):
        calls.append((name, str(root)))
        return arrays

    monkeypatch.setattr(sources, "load_arrays", load_arrays)
    return types.SimpleNamespace(arrays=arrays, calls=calls)


@pytest.fixture(scope="session")
def figures(pytestconfig):
    """`figures(line)` shows `line` in the terminal summary."""
    return pytestconfig.stash.setdefault(FIGURES, []).append


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
