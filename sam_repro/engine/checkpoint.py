"""Atomic checkpoints: written to a temporary file in the same directory, fsynced, then renamed over the old one,
so a kill -9 at any moment leaves the previous complete checkpoint loadable."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sam_repro.errors import CheckpointError

FORMAT = 1


def atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def remove_stale_temporaries(path: Path) -> int:
    """Delete temporary files a killed writer left beside `path` (each as large as a checkpoint)."""
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.exists() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; a CheckpointError naming the file if it is unusable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/corrupt zips
        raise CheckpointError(
            f"checkpoint {path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); delete it to "
            f"start over, or pass trainer.on_corrupt_checkpoint=restart"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a sam-repro checkpoint of format {FORMAT}")
    return state
