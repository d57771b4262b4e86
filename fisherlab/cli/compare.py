"""``fisherlab compare``: every approximation against the exact Fisher of the training data."""

from __future__ import annotations

import argparse
import time

from fisherlab import plots
from fisherlab.analysis import FigureData
from fisherlab.cli.common import (
    add_problem_arguments,
    positive_float,
    positive_int,
    problem_from_args,
    where,
)
from fisherlab.comparison import DEFAULT_METHODS, compare, summary_meta
from fisherlab.conventions import FISHER_TYPES
from fisherlab.files import check_output_folder
from fisherlab.report import format_table, save_table

COMPARE_COLUMNS = (
    "layer",
    "method",
    "P",
    "reference",
    "rel_frobenius",
    "spectrum_distance",
    "direction_cosine",
    "build_s",
    "memory_mb",
)


def run(args: argparse.Namespace) -> int:
    """Every approximation against the exact Fisher of the training data, per layer."""
    check_output_folder(args.out)
    problem = problem_from_args(args)
    start = time.perf_counter()
    rows = compare(problem, methods=args.methods, damping=args.damping, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(
        f"approximations of the {args.fisher_type} Fisher of {where(args, problem)}; "
        f"reference: the exact Fisher of those {problem.num_samples} samples; model "
        f"{_state(args)}; damping {args.damping:g}; {seconds:.1f} s"
    )
    shown = [{k: r[k] for k in COMPARE_COLUMNS} for r in rows if not r["note"]]
    print(format_table(shown))
    noted: dict[str, list[dict]] = {}
    for r in rows:
        if r["note"]:
            noted.setdefault(r["method"], []).append(r)
    for method, refused in noted.items():  # one line per method; the JSON has every message
        layers = ", ".join(r["layer"] for r in refused)
        print(f"  {method}: layers {layers}: {refused[0]['note'].split(';')[0]}")
    meta = {
        "command": "compare",
        **{k: v for k, v in vars(args).items() if k != "func"},
        **summary_meta(problem, args.methods, args.damping),
        "model": f"{args.model}: "
        + ", ".join(
            f"{layer.kind} {'×'.join(map(str, layer.weight.shape))}"
            for layer in problem.layers.values()
        ),
        "data": args.data,
        "state": _state(args),
        "seconds": seconds,
    }
    name = args.model.replace("/", "_").replace(":", "-")
    stem = f"{args.out}/compare-{name}-{args.data}-{args.fisher_type}"
    paths = save_table(rows, stem, meta)
    figure = FigureData("comparison", {"comparison": rows}, meta)
    paths += plots.save_figure(plots.plot_comparison(figure), stem, formats=("png",))
    print("saved " + ", ".join(str(p) for p in paths))
    return 0


def _state(args: argparse.Namespace) -> str:
    """Where the parameters come from: a checkpoint file, or the seeded initialisation."""
    if getattr(args, "checkpoint", None):
        return f"at checkpoint {args.checkpoint}"
    return f"at initialisation (seed {args.seed})"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compare``."""
    p = subparsers.add_parser("compare", help="approximations vs the exact Fisher, per layer")
    add_problem_arguments(p)
    p.add_argument("--fisher-type", choices=FISHER_TYPES, default="true")
    p.add_argument("--mc-samples", type=positive_int, default=1)
    p.add_argument("--damping", type=positive_float, default=1e-3)
    p.add_argument(
        "--checkpoint",
        help="a checkpoint of --model saved by torch.save (a state dict, or a dict holding one "
        "under state_dict); default: the seeded initialisation",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="method specs, e.g. kfac skfac:conv_reduction=subsample,spatial_samples=8",
    )
    p.set_defaults(func=run)
