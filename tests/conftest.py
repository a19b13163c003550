"""Shared test set-up: one torch thread per test process (the CI machine has two cores; the heavier tests run
training subprocesses beside the test process)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
