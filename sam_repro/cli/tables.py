"""`sam-tables`: our runs beside the paper's tables, as Markdown, CSV and LaTeX.

    sam-tables runs/                           print the Markdown tables, write nothing
    sam-tables runs/ --out results/tables      write tables.md, tables.csv, runs.csv, provenance.json there
    sam-tables runs/ --table 1 --latex --out results/table1
    sam-tables --wandb my-team/sam-repro --out results/wandb
    sam-tables results/cpu_scale_variants/runs --variants --costs benchmarks/results/sam_overhead.json \
        --show memorized --out results/cpu_scale_variants

With --variants: one table per setting (a cell without its epochs) of every optimizer variant (SGD at twice the
epochs, SAM from a later epoch, GSAM, ...) against plain SGD and SAM, with its passes and time relative to SGD's
(`sam_repro.analysis.variants`), and a figure of gain against cost (gain_vs_cost.png).

Each cell: mean ± 95% t-interval (n) of the final test error of its finished runs, the paper's value, and
SAM − SGD (paired by seed when both optimizers ran the same seeds, Welch otherwise). Unfinished and failed runs are
listed under "Runs not averaged". The table files are byte-identical for identical runs; the command, git commit
and time go to provenance.json beside them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sam_repro.analysis.aggregate import build_report
from sam_repro.analysis.render import render_latex, render_markdown, write_provenance, write_tables
from sam_repro.analysis.runs import RunRecord, load_runs
from sam_repro.errors import DataError, SamReproError
from sam_repro.paper import TABLE_IDS


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared with sam-report: which runs, which table, how to group."""
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIRS",
        help="run directories or folders containing them (searched recursively)",
    )
    parser.add_argument(
        "--table",
        default="auto",
        choices=[*map(str, TABLE_IDS), "auto"],
        help="one table of the paper, with all its cells (missing ones marked), or auto: every "
        "table that has runs, plus 'Other runs' (default)",
    )
    parser.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="KEYS",
        help="comma-separated dotted config keys that split cells further, e.g. trainer.m; "
        "optimizer.* keys (optimizer.rho) split the optimizer column instead",
    )
    parser.add_argument(
        "--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this W&B project through the public API"
    )
    parser.add_argument(
        "--show",
        nargs="+",
        default=[],
        metavar="KEY",
        help="also show these summary.json values as mean ± interval, e.g. memorized (the share "
        "of flipped training labels learnt, label-noise runs) or best_test_error",
    )
    parser.add_argument(
        "--sgd-epochs",
        choices=["best", "as-run"],
        default="best",
        help="best (default): as the paper, where SGD-only runs at twice a cell's epochs exist, show "
        "the SGD budget with the lower mean error; as-run: every epoch count its own cell",
    )


def collect_runs(run_dirs: Sequence[str], wandb_path: str | None) -> list[RunRecord]:
    if not run_dirs and not wandb_path:
        raise DataError("no runs given: pass run directories or --wandb ENTITY/PROJECT")
    runs = load_runs(run_dirs) if run_dirs else []
    if wandb_path:
        from sam_repro.analysis.wandb_source import load_wandb_runs

        runs += load_wandb_runs(wandb_path)
    if not runs:
        raise DataError(f"no runs found in W&B project {wandb_path}")
    return runs


def command_of(prog: str, argv: Sequence[str] | None) -> list[str]:
    """The command line as typed (argv given when called from Python, e.g. in tests)."""
    return [prog, *(sys.argv[1:] if argv is None else argv)]


def inputs_of(args: argparse.Namespace) -> list[str]:
    return [*args.run_dirs, *([f"wandb:{args.wandb}"] if args.wandb else [])]


def load_report(args: argparse.Namespace):
    """The runs named on the command line and their report; warnings go to stderr (shared with sam-report)."""
    runs = collect_runs(args.run_dirs, args.wandb)
    report = build_report(
        runs,
        table=args.table,
        group_by=args.group_by,
        sgd_best_of_doubled=args.sgd_epochs == "best",
        extra_metrics=args.show,
    )
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return runs, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sam-tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_selection_arguments(parser)
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write tables.md, tables.csv, runs.csv (+ tables.tex) and provenance.json here; "
        "without it the tables are printed and nothing is written",
    )
    parser.add_argument(
        "--latex", action="store_true", help="also LaTeX (tables.tex; printed instead of Markdown without --out)"
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="the optimizer variants of each setting against plain SGD and SAM, with their cost, instead of the "
        "paper's tables",
    )
    parser.add_argument(
        "--costs",
        metavar="JSON",
        help="with --variants: the benchmark result whose per-step ratios give each variant's time "
        "(benchmarks/results/sam_overhead.json)",
    )
    args = parser.parse_args(argv)
    if args.variants and (args.latex or args.table != "auto"):
        parser.error("--variants makes its own table: leave out --latex and --table")
    if args.costs and not args.variants:
        parser.error("--costs goes with --variants")
    try:
        if args.variants:
            return _variants(args, argv)
        runs, report = load_report(args)
        if args.out is None:
            sys.stdout.write(render_latex(report) if args.latex else render_markdown(report))
            return 0
        written = write_tables(report, args.out, latex=args.latex)
        written.append(write_provenance(args.out, command_of("sam-tables", argv), inputs_of(args), len(runs)))
    except SamReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    averaged = len(runs) - len(report.excluded)
    print(
        f"{len(runs)} runs ({averaged} averaged, {len(report.excluded)} not): "
        + " ".join(p.as_posix() for p in written)
    )
    return 0


def _variants(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from sam_repro.analysis.variants import (
        build_variants,
        load_costs,
        render_variants_markdown,
        write_variants,
    )

    runs = collect_runs(args.run_dirs, args.wandb)
    report = build_variants(runs, args.group_by, load_costs(args.costs), args.show, args.costs)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(render_variants_markdown(report))
        return 0
    written = write_variants(report, args.out)
    written.append(write_provenance(args.out, command_of("sam-tables", argv), inputs_of(args), len(runs)))
    print(f"{len(runs)} runs ({len(runs) - len(report.excluded)} averaged): " + " ".join(p.as_posix() for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
