"""An offline W&B run file (`wandb/offline-run-*/run-*.wandb`) read back with W&B's own record schema.

The file is what `wandb sync` uploads and what a dashboard would receive: `wandb.proto.wandb_internal_pb2.Record`
messages framed like a LevelDB log. A 7-byte file header (":W&B", 0xBEE1, version 0), then 32 KiB blocks of
chunks, each with a 7-byte header (CRC-32 of the type byte and the data, length, type: full, first, middle, last);
a block's tail shorter than a header is padding. (wandb 0.31 ships no Python reader; the format is the one its Go
core writes, `core/pkg/leveldb`.)
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every Record of the run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # padding at the end of a block
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        if length == 0 and kind == 0:  # zero fill
            pos += left
            continue
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def _items(items) -> dict:
    """History/summary/config items ({key or nested_key path: JSON value}) as a flat dict."""
    return {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in items}


@dataclass
class OfflineRun:
    """What a dashboard would get from one offline run."""

    run: object = None  # the RunRecord: group, job_type, tags, display name
    config: dict = field(default_factory=dict)  # the last config record's items (keys -> nested values)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # the summary records applied in order
    metrics: list = field(default_factory=list)  # MetricRecords (define_metric)
    exit_code: int | None = None


HANG_GUARD_S = 1800  # only against a hung W&B core process: the wait below ends on the file's exit record


def read_offline_run(path: Path) -> OfflineRun:
    """The run as W&B recorded it, once the file is complete: `wandb.finish()` returns before W&B's core process has
    flushed the file, so this waits for the exit record (progress, not a time; the guard only stops a hang)."""
    give_up = time.monotonic() + HANG_GUARD_S
    while (run := _read(path)).exit_code is None:
        if time.monotonic() > give_up:
            raise AssertionError(f"{path}: W&B never wrote the exit record (its core process hung)")
        time.sleep(0.1)
    return run


def _read(path: Path) -> OfflineRun:
    out = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = record.run
            out.config.update(_items(record.run.config.update))
        elif kind == "config":
            out.config.update(_items(record.config.update))
        elif kind == "history":
            out.history.append(_items(record.history.item))
        elif kind == "summary":
            out.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                out.summary.pop("/".join(item.nested_key) if item.nested_key else item.key, None)
        elif kind == "metric":
            out.metrics.append(record.metric)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out


def offline_run_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
