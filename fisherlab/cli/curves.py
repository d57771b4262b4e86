"""``fisherlab curves``: curves and the time-to-target table of finished runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fisherlab import experiments as ex
from fisherlab.cli.common import accuracy, figure_format
from fisherlab.conventions import FisherlabError
from fisherlab.experiments.summary import skipped_steps
from fisherlab.files import check_output_folder


def run(args: argparse.Namespace) -> int:
    """Curves and the time-to-target table of finished runs."""
    check_output_folder(args.out)
    named = {Path(p).resolve() for p in args.runs}
    folders = ex.find_runs(args.runs)
    runs = []
    for folder in folders:
        try:
            run = ex.load_run(folder)
        except FisherlabError as err:
            if folder.resolve() in named or len(folders) == 1:  # the run asked for: an error
                raise
            print(f"skipping {folder}: {err}", file=sys.stderr)
            continue
        if run.config.tag == "grid" and not args.include_grid:
            continue
        if run.status not in ("finished", "diverged", "failed"):
            print(f"skipping {folder}: status {run.status}", file=sys.stderr)
            continue
        runs.append(run)
        skipped, _ = skipped_steps(run)
        if skipped:
            print(f"{folder}: {run.note or f'{skipped} skipped steps'}", file=sys.stderr)
    if not runs:
        raise FisherlabError(f"no finished runs under {', '.join(args.runs)}")
    table, written = ex.write_curves(runs, args.out, args.target, args.formats)
    print(ex.markdown_table(table))
    print(f"{len(runs)} runs; wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``curves``."""
    cur = subparsers.add_parser(
        "curves",
        help="loss/accuracy curves and a time-to-target table of finished runs",
        description="Draw loss vs epoch, loss vs wall-clock and accuracy vs wall-clock (mean and "
        "min-max over seeds) and the time-to-target table of the runs at or below RUNS.",
    )
    cur.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    cur.add_argument("--out", default="figures", help="figures folder")
    cur.add_argument("--target", type=accuracy, help="test accuracy (default: per data set)")
    cur.add_argument("--formats", nargs="+", type=figure_format, default=["png", "pdf"])
    cur.add_argument("--include-grid", action="store_true", help="also the grid-search runs")
    cur.set_defaults(func=run)
