"""`sam-report`: the tables plus figures, as a folder with an index.md.

    sam-report runs/ --out results/report

writes index.md (the tables of sam-tables with the figures between them), bars/table<N>.png (ours vs the paper,
per table), curves/<cell>.png (test error per epoch, SGD and SAM: mean over seeds with a min-max band),
tables.md/tables.csv/runs.csv and provenance.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sam_repro.analysis.render import write_provenance, write_tables
from sam_repro.cli.tables import add_selection_arguments, command_of, inputs_of, load_report
from sam_repro.errors import SamReproError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sam-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_selection_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for index.md and the figures")
    args = parser.parse_args(argv)
    try:
        runs, report = load_report(args)
        # plots imports matplotlib (slow): only once the runs are known to be readable.
        from sam_repro.analysis.plots import write_report

        written = write_report(report, args.out)
        write_tables(report, args.out)
        write_provenance(args.out, command_of("sam-report", argv), inputs_of(args), len(runs))
    except SamReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs, {len(written) - 1} figures: {written[0].as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
