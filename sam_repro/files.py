"""Files written atomically: the one writer of every result, record and checkpoint the project keeps.

`atomic_write_bytes` writes to a temporary file beside the target (`.<name>.<random>.tmp`), flushes and fsyncs it,
then renames it over the target: a reader, or a run restarted after a kill -9 or a power cut, sees the old file or
the whole new one, never half of one. A failed write removes its temporary file and leaves the target as it was.
Checkpoints, summary.json, metrics, the dataset caches and downloads, the analysis results, the tables, provenance
records, figures and the cluster check's records all go through it.

Like `errors` and `run_keys`, this module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# The process's umask, read once at import (reading it means setting it, which must not race other threads' files).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Replace `path` atomically with what `write(file)` writes into a binary file object; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` (newlines as they are, as `Path.write_text` writes them on POSIX)."""
    data = text.encode(encoding)
    return atomic_write_bytes(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True, indent: int | None = 2) -> Path:
    """`obj` as JSON (indented, keys sorted unless told otherwise) and a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete the temporary files a killed writer left beside `path` (a checkpoint's are as large as it)."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.exists() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)
