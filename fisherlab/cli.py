"""The ``fisherlab`` command line.

``fisherlab exact --model mlp --data digits`` computes the exact Fisher blocks of a reference
model on a batch of the embedded digits data and prints (and saves) a per-layer summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fisherlab import data, figures_cli, models, train_cli
from fisherlab.comparison import DEFAULT_METHODS, compare
from fisherlab.conventions import FISHER_TYPES, FisherlabError
from fisherlab.exact import BACKENDS, exact_blocks
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


def _reference_problem(args: argparse.Namespace):
    dtype = DTYPES[args.dtype]
    split = data.load(args.data, seed=args.seed, dtype=dtype)
    torch.manual_seed(args.seed)
    model = models.build(args.model).to(dtype).eval()
    x, y = split.x_train[: args.batch_size], split.y_train[: args.batch_size]
    return model, torch.nn.CrossEntropyLoss(), x, y


def cmd_exact(args: argparse.Namespace) -> int:
    """Exact per-layer Fisher blocks of a reference model on a batch of data."""
    model, loss_fn, x, y = _reference_problem(args)
    start = time.perf_counter()
    blocks = exact_blocks(
        model,
        loss_fn,
        x,
        y,
        fisher_type=args.fisher_type,
        mc_samples=args.mc_samples,
        backend=args.backend,
    )
    seconds = time.perf_counter() - start
    modules = dict(model.named_modules())
    rows = [
        block_summary(name, modules[name], block)
        for name, block in tqdm(blocks.items(), desc="summarising blocks", disable=args.quiet)
    ]
    print(
        f"exact {blocks.fisher_type} Fisher of {args.model} on {args.data}: batch {x.shape[0]}, "
        f"{args.dtype}, backend {blocks.backend}, {seconds:.2f} s"
    )
    if blocks.backend_reason:
        print(f"  ({blocks.backend_reason})")
    print(format_table(rows))
    meta = {
        "command": "exact",
        **{k: v for k, v in vars(args).items() if k != "func"},
        "backend": blocks.backend,
        "seconds": seconds,
        "normaliser": blocks.normaliser,
    }
    paths = save_table(rows, f"{args.out}/exact-{args.model}-{args.data}-{args.fisher_type}", meta)
    print("saved " + ", ".join(str(p) for p in paths))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Every approximation against the exact Fisher, per layer, on a reference model."""
    model, loss_fn, x, y = _reference_problem(args)
    rows = compare(
        model,
        loss_fn,
        x,
        y,
        methods=args.methods,
        fisher_type=args.fisher_type,
        damping=args.damping,
        mc_samples=args.mc_samples,
        progress=not args.quiet,
    )
    print(
        f"approximations of the {args.fisher_type} Fisher of {args.model} on {args.data}: "
        f"batch {x.shape[0]}, {args.dtype}, damping {args.damping:g} (exact reference: woodbury)"
    )
    print(format_table(rows))
    meta = {"command": "compare", **{k: v for k, v in vars(args).items() if k != "func"}}
    paths = save_table(
        rows, f"{args.out}/compare-{args.model}-{args.data}-{args.fisher_type}", meta
    )
    print("saved " + ", ".join(str(p) for p in paths))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check EKFAC ≤ KFAC, Woodbury's solve, SKFAC = KFAC⁻¹ and one-sample KFAC exactness."""
    if args.model:
        report = verify(
            *_reference_problem(args), fisher_types=args.fisher_types, progress=not args.quiet
        )
        where = f"{args.model} on {args.data}, batch {args.batch_size}"
    else:
        report = verify(
            batch_sizes=args.batch_sizes,
            fisher_types=args.fisher_types,
            seeds=args.seeds,
            progress=not args.quiet,
        )
        where = f"the zoo, batch sizes {args.batch_sizes}, seeds {args.seeds}"
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
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="folder for the CSV/JSON tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fisherlab`` command."""
    parser = argparse.ArgumentParser(
        prog="fisherlab", description="Curvature of neural networks: exact Fisher and friends."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exact = sub.add_parser("exact", help="exact per-layer Fisher blocks, summarised per layer")
    _add_problem_arguments(exact)
    exact.add_argument("--fisher-type", choices=FISHER_TYPES, default="true")
    exact.add_argument("--mc-samples", type=int, default=1)
    exact.add_argument("--backend", choices=BACKENDS, default="auto")
    exact.set_defaults(func=cmd_exact)

    comp = sub.add_parser("compare", help="approximations vs the exact Fisher, per layer")
    _add_problem_arguments(comp)
    comp.add_argument("--fisher-type", choices=FISHER_TYPES, default="true")
    comp.add_argument("--mc-samples", type=int, default=1)
    comp.add_argument("--damping", type=float, default=1e-3)
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
    ver.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 3, 17, 128])
    ver.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
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
