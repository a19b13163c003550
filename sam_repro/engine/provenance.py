"""Where a result came from: command, git commit, machine and package versions, stored with every result file.

Nothing the project writes (config.yaml, summary.json, Hydra's record, checkpoints, W&B's config) may carry a
credential: `redact` replaces the value of every environment variable that looks like one (API keys, tokens,
secrets, passwords) wherever it appears in a string, and the value of every config key named like one, by
REDACTED. The command line is recorded redacted too.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

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


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """HEAD of the checkout the code runs from, with `-dirty` when tracked files differ; None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


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


def provenance() -> dict:
    return {
        "command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        "cwd": os.getcwd(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
