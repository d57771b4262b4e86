"""The ``fisherlab`` command line.

``fisherlab compare --model mlp --data digits`` compares every block approximation with the exact
Fisher of the whole embedded digits training set (streamed in batches), per layer, and saves the
table and a figure; ``fisherlab exact`` summarises the exact blocks; ``fisherlab verify`` checks
the facts the approximations rest on.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fisherlab import data, figures_cli, models, plots, train_cli
from fisherlab.analysis import FigureData
from fisherlab.comparison import DEFAULT_METHODS, compare, summary_meta
from fisherlab.conventions import FISHER_TYPES, FisherlabError
from fisherlab.exact import BACKENDS, exact_blocks
from fisherlab.problem import Problem
from fisherlab.report import format_table, save_table
from fisherlab.verification import verify

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _largest_eigenvalue(block: torch.Tensor, dense_limit: int = 2048) -> float:
    """λ_max of a symmetric PSD block: dense for small blocks, LOBPCG for large ones."""
    if block.shape[0] <= dense_limit:
        return float(torch.linalg.eigvalsh(block)[-1])
    torch.manual_seed(0)
    values, _ = torch.lobpcg(block, k=1, niter=200, tol=1e-8)
    return float(values[0])


def block_summary(name: str, module: torch.nn.Module, block: torch.Tensor) -> dict:
    """One row of the per-layer table: size, trace, norms and the largest eigenvalue."""
    trace = float(block.diagonal().sum())
    return {
        "layer": name,
        "type": type(module).__name__,
        "weight": "x".join(str(s) for s in module.weight.shape),
        "bias": module.bias is not None,
        "P": block.shape[0],
        "trace": trace,
        "frobenius": float(torch.linalg.matrix_norm(block)),
        "lambda_max": _largest_eigenvalue(block),
        "mean_diag": trace / block.shape[0],
    }


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (else a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _reference_problem(args: argparse.Namespace, fisher_type: str | None = None) -> Problem:
    """The ``--model`` (seeded) on ``--samples`` training images, in ``--batch-size`` batches."""
    dtype = DTYPES[args.dtype]
    split = data.load(args.data, seed=args.seed, dtype=dtype)
    torch.manual_seed(args.seed)
    model = models.build(args.model).to(dtype).eval()
    n = len(split.x_train) if args.samples is None else min(args.samples, len(split.x_train))
    x, y = split.x_train[:n], split.y_train[:n]
    batches = [
        (x[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, n, args.batch_size)
    ]
    return Problem(
        model,
        torch.nn.CrossEntropyLoss(),
        batches,
        fisher_type=fisher_type or args.fisher_type,
        mc_samples=getattr(args, "mc_samples", 1),
        seed=args.seed,
        progress=False if args.quiet else None,
    )


def _where(args: argparse.Namespace, problem: Problem) -> str:
    return (
        f"{args.model} on {args.data}: {problem.num_samples} training samples in batches of "
        f"{args.batch_size}, {args.dtype}"
    )


def cmd_exact(args: argparse.Namespace) -> int:
    """Exact per-layer Fisher blocks of a reference model over the training data."""
    problem = _reference_problem(args)
    start = time.perf_counter()
    blocks = exact_blocks(problem, backend=args.backend)
    seconds = time.perf_counter() - start
    modules = dict(problem.model.named_modules())
    rows = [
        block_summary(name, modules[name], block)
        for name, block in tqdm(blocks.items(), desc="summarising blocks", disable=args.quiet)
    ]
    print(
        f"exact {blocks.fisher_type} Fisher of {_where(args, problem)}, backend "
        f"{blocks.backend}, {seconds:.2f} s"
    )
    if blocks.backend_reason:
        print(f"  ({blocks.backend_reason})")
    print(format_table(rows))
    meta = {
        "command": "exact",
        **{k: v for k, v in vars(args).items() if k != "func"},
        "samples": problem.num_samples,
        "backend": blocks.backend,
        "seconds": seconds,
        "normaliser": blocks.normaliser,
    }
    paths = save_table(rows, f"{args.out}/exact-{args.model}-{args.data}-{args.fisher_type}", meta)
    print("saved " + ", ".join(str(p) for p in paths))
    return 0


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


def cmd_compare(args: argparse.Namespace) -> int:
    """Every approximation against the exact Fisher of the training data, per layer."""
    problem = _reference_problem(args)
    start = time.perf_counter()
    rows = compare(problem, methods=args.methods, damping=args.damping, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(
        f"approximations of the {args.fisher_type} Fisher of {_where(args, problem)}; "
        f"reference: the exact Fisher of those {problem.num_samples} samples; model at "
        f"initialisation (seed {args.seed}); damping {args.damping:g}; {seconds:.1f} s"
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
            f"{layer.kind} {'×'.join(map(str, layer.module.weight.shape))}"
            for layer in problem.layers.values()
        ),
        "data": args.data,
        "state": f"initialisation, seed {args.seed}",
        "seconds": seconds,
    }
    stem = f"{args.out}/compare-{args.model}-{args.data}-{args.fisher_type}"
    paths = save_table(rows, stem, meta)
    figure = FigureData("comparison", {"comparison": rows}, meta)
    paths += plots.save_figure(plots.plot_comparison(figure), stem, formats=("png",))
    print("saved " + ", ".join(str(p) for p in paths))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check EKFAC ≤ KFAC, Woodbury's solve, SKFAC = KFAC⁻¹ and one-sample KFAC exactness."""
    if args.model:
        problem = _reference_problem(args, fisher_type=args.fisher_types[0])
        report = verify(problem, fisher_types=args.fisher_types, progress=not args.quiet)
        where = _where(args, problem)
    else:
        report = verify(
            batch_sizes=args.batch_sizes,
            fisher_types=args.fisher_types,
            seeds=args.seeds,
            dtypes=args.dtypes,
            progress=not args.quiet,
        )
        where = f"the zoo, batch sizes {args.batch_sizes}, seeds {args.seeds}, dtypes {args.dtypes}"
    print(f"verify on {where}, Fisher types {args.fisher_types}")
    print(format_table(report.summary()))
    paths = save_table(report.rows(), f"{args.out}/verify", {"command": "verify", "where": where})
    print("saved " + ", ".join(str(p) for p in paths))
    for check in report.violations:
        print(
            f"VIOLATION {check.check} on {check.problem} layer {check.layer!r}: "
            f"{check.value:.3e} > {check.tolerance:.0e}",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def _add_problem_arguments(p: argparse.ArgumentParser, model_default: str | None = "mlp") -> None:
    p.add_argument("--model", choices=sorted(models.MODELS), default=model_default)
    p.add_argument("--data", choices=sorted(data.DATASETS), default="digits")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=None,
        help="training samples the Fisher is taken over (default: all)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=128, help="batch size of the streamed passes"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="folder for the CSV/JSON tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fisherlab`` command."""
    parser = train_cli.OneLineParser(
        prog="fisherlab", description="Curvature of neural networks: exact Fisher and friends."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exact = sub.add_parser("exact", help="exact per-layer Fisher blocks, summarised per layer")
    _add_problem_arguments(exact)
    exact.add_argument("--fisher-type", choices=FISHER_TYPES, default="true")
    exact.add_argument("--mc-samples", type=positive_int, default=1)
    exact.add_argument("--backend", choices=BACKENDS, default="auto")
    exact.set_defaults(func=cmd_exact)

    comp = sub.add_parser("compare", help="approximations vs the exact Fisher, per layer")
    _add_problem_arguments(comp)
    comp.add_argument("--fisher-type", choices=FISHER_TYPES, default="true")
    comp.add_argument("--mc-samples", type=positive_int, default=1)
    comp.add_argument("--damping", type=positive_float, default=1e-3)
    comp.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="method specs, e.g. kfac skfac:conv_reduction=subsample,spatial_samples=8",
    )
    comp.set_defaults(func=cmd_compare)

    ver = sub.add_parser("verify", help="numerical checks of the approximations' theory")
    _add_problem_arguments(ver, model_default=None)
    ver.add_argument("--fisher-types", nargs="+", choices=FISHER_TYPES, default=list(FISHER_TYPES))
    ver.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 3, 17, 128])
    ver.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ver.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float64", "float32"])
    ver.set_defaults(func=cmd_verify)

    figures_cli.add_parser(sub)
    train_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherlab`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FisherlabError as err:
        print(f"fisherlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
