"""Checkpoints: written atomically, read safely.

Writing: `sam_repro.files.atomic_write_bytes`, to a temporary file in the same directory, fsynced, then renamed
over the old one, so a kill -9 at any moment leaves the previous complete checkpoint loadable.

Reading (`load_checkpoint`, the one loader used by resume, `sam-eval` and `sam-analyze`): `torch.load` with
`weights_only=True`, always onto the CPU. The weights-only unpickler builds tensors, numbers, strings and plain
containers and nothing else, so a checkpoint someone shared cannot run code when it is opened; what sam-train
stores (state dicts of the model, optimizer, schedule and GradScaler, CPU RNG states as uint8 tensors, the resolved
config as plain containers) is all of that kind. A file that needs anything else is refused with one line naming
the file, unread. Loading to the CPU lets `load_state_dict` move each tensor to where its parameter lives, and keeps
the RNG states CPU tensors, as `torch.set_rng_state` and `torch.cuda.set_rng_state` require.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from sam_repro.errors import CheckpointError
from sam_repro.files import atomic_write_bytes, atomic_write_json, remove_stale_temporaries

__all__ = [  # the writers live in sam_repro.files; the trainer and the loggers import them from here
    "FORMAT",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
]

FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace `path`. A failed write (a full disk, a quota) leaves the previous checkpoint as it was
    and is one CheckpointError naming the file."""
    try:
        atomic_write_bytes(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint is kept: free "
            "space and run the same command again to resume from it"
        ) from None


def load_checkpoint(path: Path, *, sam_repro_format: bool = True) -> dict[str, Any]:
    """The checkpoint at `path` as a dict of CPU tensors and plain values (see the module docstring).

    CheckpointError naming the file when it is missing, damaged, or refused because it holds other objects; with
    `sam_repro_format` (resume), also when it is not a sam-train checkpoint of this FORMAT.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"GLOBAL (\S+)", str(exc))  # the weights-only unpickler refused to build this
        if needed is None:
            raise _damaged(path, exc) from None
        raise CheckpointError(
            f"checkpoint {path} was refused unread: it holds {needed.group(1)}, "
            "and only tensors and plain containers are loaded (nothing in the file was run); sam-train never "
            "writes such files, so get the checkpoint from its source again"
        ) from None
    except Exception as exc:  # torch raises many types for truncated/corrupt zips
        raise _damaged(path, exc) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    if sam_repro_format and state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a sam-repro checkpoint of format {FORMAT}")
    return state


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
        "delete it to start over, or pass trainer.on_corrupt_checkpoint=restart"
    )
