"""`sam-wandb`: from a folder of runs to the W&B dashboard and a report per paper table.

    sam-wandb sync runs/                              upload every offline run not yet synced (`wandb sync`)
    sam-wandb report --table 1 --project sam-repro --entity my-team
                                                      a W&B Report of Table 1: a section per cell, SGD beside SAM
    sam-wandb report --table 1 --runs runs/ --dry-run --out table1_report.json
                                                      the report's spec as JSON, from the runs found, no network

`sync` finds `wandb/offline-run-*` folders below RUNS_DIR (the trainer writes them into each run directory) and
runs `wandb sync` on each one without a `run-*.wandb.synced` marker (W&B writes it after an upload); the command
can be replaced through SAM_WANDB_SYNC_COMMAND (e.g. for a wrapper). `report` needs the optional extra
`sam-repro[wandb-report]` (wandb-workspaces) and, unless --dry-run, a W&B API key (`wandb login`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sam_repro.errors import ConfigError, DataError, SamReproError
from sam_repro.files import atomic_write_text
from sam_repro.paper import TABLE_IDS

SYNC_COMMAND_ENV = "SAM_WANDB_SYNC_COMMAND"


# ---- sync -----------------------------------------------------------------------------------------------------
def offline_runs(root: Path) -> list[Path]:
    """Every offline W&B run folder (holding a `run-*.wandb` file) at or below `root`, sorted."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (pass the folder that holds the run directories)")
    return sorted(p.parent for p in root.rglob("offline-run-*/run-*.wandb"))


def is_synced(folder: Path) -> bool:
    return any(folder.glob("run-*.wandb.synced"))


def sync_command() -> list[str]:
    """`wandb sync` (the wandb beside this Python, else the one on PATH), or SAM_WANDB_SYNC_COMMAND."""
    if os.environ.get(SYNC_COMMAND_ENV):
        return shlex.split(os.environ[SYNC_COMMAND_ENV])
    beside = Path(sys.executable).with_name("wandb")
    return [str(beside) if beside.exists() else "wandb", "sync"]


def sync_runs(root: Path, command: Sequence[str] | None = None, dry_run: bool = False) -> dict[str, list[Path]]:
    """Upload the offline runs below `root` that are not synced yet: `command + [folder]` for each. Returns the
    folders {"synced", "skipped", "failed"} (with dry_run, "synced" lists those that would be)."""
    command = list(command) if command is not None else sync_command()
    done: dict[str, list[Path]] = {"synced": [], "skipped": [], "failed": []}
    for folder in offline_runs(root):
        if is_synced(folder):
            done["skipped"].append(folder)
            print(f"skipped {folder} (already synced)")
            continue
        if dry_run:
            done["synced"].append(folder)
            print(f"would sync {folder}")
            continue
        try:
            proc = subprocess.run([*command, str(folder)], capture_output=True, text=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot run {command[0]} ({exc.strerror or exc}): install wandb or set {SYNC_COMMAND_ENV}"
            ) from None
        if proc.returncode == 0:
            done["synced"].append(folder)
            print(f"synced {folder}")
        else:
            done["failed"].append(folder)
            last = (proc.stderr or proc.stdout).strip().splitlines()
            print(f"failed {folder} (exit {proc.returncode}: {last[-1] if last else 'no output'})")
    return done


def _sync(args: argparse.Namespace) -> int:
    done = sync_runs(Path(args.runs_dir), dry_run=args.dry_run)
    verb = "to sync" if args.dry_run else "synced"
    print(f"{len(done['synced'])} {verb}, {len(done['skipped'])} already synced, {len(done['failed'])} failed")
    return 1 if done["failed"] else 0


# ---- report ---------------------------------------------------------------------------------------------------
def _report(args: argparse.Namespace) -> int:
    from sam_repro.analysis.runs import load_runs
    from sam_repro.analysis.wandb_report import build_report, report_library, report_spec

    runs = load_runs(args.runs) if args.runs else None
    spec = report_spec(args.table, args.entity, args.project, runs)
    if runs is not None and not spec["sections"]:
        raise DataError(f"{' '.join(args.runs)}: no runs of a cell of Table {args.table} found")
    count = len(spec["sections"])
    cells = f"{count} section{'s' if count != 1 else ''} (cells of Table {args.table})"
    if args.dry_run:
        text = json.dumps(spec, indent=1, ensure_ascii=False) + "\n"
        if args.out:
            atomic_write_text(args.out, text)
            print(f"wrote {args.out}: {cells}, {len(spec['other_runs'])} other runs left out", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    report_library()  # refuses without wandb-workspaces, before any network
    import wandb

    try:
        wandb.Api()  # raises without an API key
    except Exception:  # noqa: BLE001 -- the client's own error types for one cause
        raise ConfigError(
            "sam-wandb report needs a W&B API key to save the report: run `wandb login` or set WANDB_API_KEY "
            "(or pass --dry-run to write the spec without network)"
        ) from None
    try:
        report = build_report(spec)
        report.save()
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"could not save the report to W&B ({type(exc).__name__}: {first})") from None
    print(f"saved {report.url}: {cells}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sam-wandb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="upload the offline runs below a folder that are not synced yet")
    sync.add_argument("runs_dir", metavar="RUNS_DIR", help="the folder of run directories (e.g. runs/)")
    sync.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    report = commands.add_parser("report", help="a W&B Report of one paper table, SGD beside SAM per cell")
    report.add_argument("--table", required=True, choices=[str(t) for t in TABLE_IDS], help="the paper's table")
    report.add_argument("--project", default="sam-repro", help="the W&B project of the runs (default: sam-repro)")
    report.add_argument("--entity", help="the W&B entity (team or user) of the project (default: your own)")
    report.add_argument(
        "--runs",
        nargs="+",
        metavar="DIR",
        help="run directories or folders of them: one section per cell they cover (default: every cell)",
    )
    report.add_argument("--dry-run", action="store_true", help="write the report's spec as JSON, no network")
    report.add_argument("--out", metavar="FILE", help="with --dry-run: write the spec here instead of stdout")
    args = parser.parse_args(argv)
    try:
        return _sync(args) if args.command == "sync" else _report(args)
    except SamReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
