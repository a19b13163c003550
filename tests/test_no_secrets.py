"""No credential from the environment reaches an output: config.yaml, summary.json (its provenance command
included), Hydra's record, the checkpoint, train.log and the W&B run file (its config and metadata)."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers.training import BIN, TINY
from sam_repro.engine.provenance import REDACTED, redact

API_KEY = "sk-live-planted-7d1e5c0ffee"
TOKEN = "tok-planted-42a9beef"


def test_redact_replaces_credential_values_and_keys():
    env = {
        "WANDB_API_KEY": API_KEY,
        "HF_TOKEN": TOKEN,
        "AWS_SECRET_ACCESS_KEY": "abcdef123",
        "HOME": "/root",
        "SHORT_TOKEN": "1",
    }
    obj = {
        "logger": {"project": TOKEN, "tags": [f"x-{API_KEY}", "y"], "api_key": "anything", "token": None},
        "dataset": {"root": "/root/data"},
        "n": 3,
        "cmd": f"sam-train logger.entity={TOKEN} seed=1",
    }
    out = redact(obj, env)
    assert out == {
        "logger": {"project": REDACTED, "tags": [f"x-{REDACTED}", "y"], "api_key": REDACTED, "token": None},
        "dataset": {"root": "/root/data"},
        "n": 3,
        "cmd": f"sam-train logger.entity={REDACTED} seed=1",
    }
    assert obj["logger"]["project"] == TOKEN  # the input is left alone
    assert redact("seed=1", env) == "seed=1"  # a short value ("1") is not treated as a secret


@pytest.mark.data
def test_planted_credentials_reach_no_output(tmp_path):
    env = {
        **os.environ,
        "SAM_RUNS_DIR": str(tmp_path),
        "WANDB_API_KEY": API_KEY,
        "MY_SERVICE_TOKEN": TOKEN,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [
            str(BIN / "sam-train"),
            *TINY,
            "dataset.test_subset=200",
            "trainer.max_steps=1",
            "logger.mode=offline",
            "logger.project=${oc.env:MY_SERVICE_TOKEN}",
            f"logger.entity={TOKEN}",
            "logger.tags=[demo,${oc.env:WANDB_API_KEY}]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "summary.json", "last.pt", "overrides.yaml", "train.log"} <= names
    assert any(p.suffix == ".wandb" for p in files)  # the W&B run file was written (and is checked too)
    for path in files:
        data = path.read_bytes()
        for secret in (API_KEY, TOKEN):
            assert secret.encode() not in data, f"{secret} found in {path}"
    assert REDACTED in (next(p for p in files if p.name == "config.yaml")).read_text()
