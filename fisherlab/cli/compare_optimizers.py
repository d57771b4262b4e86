"""``fisherlab compare-optimizers``: the optimizers of a config file, seeded, then the figures."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from fisherlab import experiments as ex
from fisherlab.cli.common import INTERRUPTED, accuracy, figure_format, seed
from fisherlab.conventions import FisherlabError
from fisherlab.files import check_output_folder, write_text
from fisherlab.report import format_table, save_table


def dump_json(value: Any) -> str:
    """JSON with two-space indents; lists and dicts of plain values on one line."""
    text = json.dumps(value, indent=2, ensure_ascii=False)

    def joined(match: re.Match) -> str:  # JSON strings hold no raw newline: only items split
        return match.group(1) + re.sub(r",\s*\n\s*", ", ", match.group(2)) + match.group(3)

    plain = r'(?:[-+.\deE]+|"[^"\n]*"|null|true|false)'
    text = re.sub(r"(\[)\s+(" + plain + r"(?:,\s+" + plain + r")*)\s+(\])", joined, text)
    item = r'"[\w-]+": (?:' + plain + r"|\[[^\[\]{}\n]*\])"
    return re.sub(r"(\{)\s+(" + item + r"(?:,\s+" + item + r")*)\s+(\})", joined, text) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run the optimizers of a config file with several seeds, then draw the figures."""
    if args.update_config and not args.grid:
        raise FisherlabError("--update-config writes the grid's choice: give it with --grid")
    experiment = ex.load_experiment(args.config)
    if args.quick:
        experiment = ex.quick_variant(experiment)
        if args.update_config:
            raise FisherlabError("--quick and --update-config: a quick grid does not tune")
    out = Path(args.out or experiment.get("out") or "runs/compare")
    check_output_folder(out)
    figures = args.figures or experiment.get("figures")
    if figures:
        check_output_folder(figures, "--figures")
    if args.update_config:  # known now, not after hours of grid search
        check_output_folder(Path(args.config).resolve().parent, "the folder of --config")
    try:
        runs, grids = ex.compare_optimizers(
            experiment,
            out,
            optimizers=args.optimizers,
            seeds=args.seeds,
            grid=args.grid,
            force=args.force,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"interrupted: finished runs and epochs are logged under {out}", file=sys.stderr)
        return INTERRUPTED
    if args.grid:
        rows = [
            {"model": m, "optimizer": o, **g.best, "select": g.select}
            for (m, o), g in grids.items()
        ]
        print("grid search, best at the last epoch:")
        print(format_table(rows))
        save_table(rows, out / "grid" / "best", {"config": str(args.config)})
        if args.update_config:
            write_text(args.config, dump_json(experiment))
            print(f"wrote the tuned learning rates and dampings into {args.config}")
    target = args.target if args.target is not None else experiment.get("target_accuracy")
    if figures:
        table, written = ex.write_curves(runs, figures, target, args.formats)
        print(ex.markdown_table(table))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compare-optimizers``."""
    cmp = subparsers.add_parser(
        "compare-optimizers",
        help="run several optimizers with several seeds from a config file",
        description="Run every optimizer of a JSON config (see configs/digits.json) with every "
        "seed, reuse finished runs, then draw the curves and the time-to-target table.",
    )
    cmp.add_argument("--config", required=True, help="JSON experiment file")
    cmp.add_argument("--out", help="runs folder (default: the config's 'out')")
    cmp.add_argument("--figures", help="figures folder (default: the config's 'figures')")
    cmp.add_argument("--target", type=accuracy, help="test accuracy of the time-to-target table")
    cmp.add_argument(
        "--formats", nargs="+", type=figure_format, default=["png", "pdf"], help="figure formats"
    )
    cmp.add_argument("--optimizers", nargs="+", choices=ex.OPTIMIZER_NAMES, help="only these")
    cmp.add_argument("--seeds", type=seed, nargs="+", help="override the config's seeds")
    cmp.add_argument("--grid", action="store_true", help="tune lr and damping first")
    cmp.add_argument(
        "--update-config", action="store_true", help="with --grid: write the choice to --config"
    )
    cmp.add_argument("--force", action="store_true", help="rerun finished runs")
    cmp.add_argument(
        "--quick",
        action="store_true",
        help="the whole protocol shrunk to minutes (subsets, 2 epochs, a small grid); runs in "
        "<out>-quick, figures in <figures>/quick",
    )
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=run)
