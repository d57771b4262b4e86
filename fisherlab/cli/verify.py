"""``fisherlab verify``: numerical checks of the facts the approximations rest on."""

from __future__ import annotations

import argparse
import sys

from fisherlab.cli.common import (
    DTYPES,
    add_problem_arguments,
    positive_int,
    problem_from_args,
    seed,
    where,
)
from fisherlab.conventions import FISHER_TYPES
from fisherlab.files import check_output_folder
from fisherlab.report import format_table, save_table
from fisherlab.verification import verify


def run(args: argparse.Namespace) -> int:
    """Check EKFAC ≤ KFAC, Woodbury's solve, SKFAC = KFAC⁻¹ and one-sample KFAC exactness."""
    check_output_folder(args.out)
    if args.model:
        problem = problem_from_args(args, fisher_type=args.fisher_types[0])
        report = verify(problem, fisher_types=args.fisher_types, progress=not args.quiet)
        place = where(args, problem)
    else:
        report = verify(
            batch_sizes=args.batch_sizes,
            fisher_types=args.fisher_types,
            seeds=args.seeds,
            dtypes=args.dtypes,
            progress=not args.quiet,
        )
        place = f"the zoo, batch sizes {args.batch_sizes}, seeds {args.seeds}, dtypes {args.dtypes}"
    print(f"verify on {place}, Fisher types {args.fisher_types}")
    print(format_table(report.summary()))
    paths = save_table(report.rows(), f"{args.out}/verify", {"command": "verify", "where": place})
    print("saved " + ", ".join(str(p) for p in paths))
    for check in report.violations:
        print(
            f"VIOLATION {check.check} on {check.problem} layer {check.layer!r}: "
            f"{check.value:.3e} > {check.tolerance:.0e}",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``verify``."""
    p = subparsers.add_parser("verify", help="numerical checks of the approximations' theory")
    add_problem_arguments(p, model_default=None)
    p.add_argument("--fisher-types", nargs="+", choices=FISHER_TYPES, default=list(FISHER_TYPES))
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 3, 17, 128])
    p.add_argument("--seeds", nargs="+", type=seed, default=[0, 1])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float64", "float32"])
    p.set_defaults(func=run)
