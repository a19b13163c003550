"""Waiting on the processes a test starts, for what they write."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest


def wait_for_file(path: Path, procs: Sequence[subprocess.Popen], hang_guard_s: float) -> None:
    """Wait until `path` exists. If any of `procs` ends first (or `hang_guard_s` passes: only against a hang), kill
    them all and fail with what they printed."""
    give_up = time.monotonic() + hang_guard_s
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > give_up:
            for p in procs:
                p.kill()
            pytest.fail(f"{path} never appeared; the processes printed: {[p.communicate()[0] for p in procs]}")
        time.sleep(0.05)
