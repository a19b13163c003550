"""Where a result came from: command, git commit, machine and package versions, stored with every result file in
one schema (`provenance`).

Nothing the project writes (config.yaml, summary.json, Hydra's record, checkpoints, W&B's config) may carry a
credential: `redact` replaces the value of every environment variable that looks like one (API keys, tokens,
secrets, passwords) wherever it appears in a string, and the value of every config key named like one, by
REDACTED. The command line is recorded redacted too.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from sam_repro.files import atomic_write_json

REDACTED = "<redacted>"
# Names of environment variables (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...) and of config keys that hold
# credentials.
_CREDENTIAL = re.compile(
    r"api[_-]?key|token|secret|passw(?:or)?d|credential|private[_-]?key|access[_-]?key", re.IGNORECASE
)
_CREDENTIAL_KEY = re.compile(r"(?:^|_)(?:api_?key|token|secret|password|passwd|credentials?)(?:$|_)", re.IGNORECASE)
_MIN_SECRET = 6  # shorter environment values ("1", "true") would redact ordinary text


def _secret_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _CREDENTIAL.search(k) and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is replaced whole


def redact(obj, environ=None, _secrets: list[str] | None = None):
    """`obj` (nested dicts, lists, strings, numbers) with credentials replaced by REDACTED; see the module docstring.
    A new object; the input is left alone."""
    secrets = _secret_values(environ) if _secrets is None else _secrets
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        return obj
    if isinstance(obj, dict):
        return {
            k: (
                REDACTED
                if isinstance(k, str) and _CREDENTIAL_KEY.search(k) and v not in (None, "")
                else redact(v, environ, secrets)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, environ, secrets) for v in obj)
    return obj


PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "timm", "wandb", "numpy", "sam-repro")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def git_state(root: Path = PROJECT_ROOT) -> tuple[str | None, bool | None]:
    """(HEAD of the checkout the code runs from, whether tracked files differ from it); (None, None) outside git
    (an installed wheel)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head, (bool(status.stdout.strip()) if status.returncode == 0 else None)


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """HEAD of the checkout the code runs from, with `-dirty` when tracked files differ; None outside git."""
    head, dirty = git_state(root)
    return None if head is None else head + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        pass
    if "SLURM_JOB_ID" in os.environ:
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return info


def provenance(command: Sequence[str] | None = None, **fields: Any) -> dict[str, Any]:
    """The one provenance record, stored with every result (summary.json, the analyses' JSON and PNGs, the tables'
    provenance.json, the GPU check, soak and the benchmarks):

      command     the command line as a list of words, credentials redacted (default: this process's argv, the
                  program by its file name, e.g. `["sam-train", "optimizer=sam"]`)
      cwd         the working directory
      git_commit  HEAD of the checkout, `-dirty` appended when tracked files differ (None outside git)
      git_dirty   whether they differ (None outside git)
      packages    versions of Python and of PACKAGES
      machine     host name, platform, CPU and GPU count and names, the SLURM job
      time        when, local time with its UTC offset (`2026-11-29T08:37:10+0000`)

    `fields` are added after them (what a kind of result records besides: the tables' inputs and run count).
    """
    words = [Path(sys.argv[0]).name, *sys.argv[1:]] if command is None else list(command)
    head, dirty = git_state()
    record: dict[str, Any] = {
        "command": redact([str(word) for word in words]),
        "cwd": os.getcwd(),
        "git_commit": None if head is None else head + ("-dirty" if dirty else ""),
        "git_dirty": dirty,
        "packages": package_versions(),
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record.update(fields)
    return record


def command_line(record: Mapping[str, Any]) -> str:
    """A provenance record's command as one line (records written before it was a list hold the line itself)."""
    command = record.get("command")
    return " ".join(shlex.quote(word) for word in command) if isinstance(command, list) else str(command)


def write_result(path: Path | str, result: dict[str, Any], announce: bool = True) -> Path:
    """Write a benchmark's or check's result as JSON with this process's provenance added (atomically); prints
    `wrote <path>` unless `announce` is false."""
    path = Path(path)
    atomic_write_json(path, {**result, "provenance": provenance()})
    if announce:
        print(f"wrote {path}")
    return path
