"""``fisherlab exact``: the exact per-layer Fisher blocks of a reference model, summarised."""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from fisherlab.cli.common import add_problem_arguments, positive_int, problem_from_args, where
from fisherlab.conventions import FISHER_TYPES
from fisherlab.exact import BACKENDS, exact_blocks
from fisherlab.files import check_output_folder
from fisherlab.layers import Layer
from fisherlab.report import format_table, save_table


def _largest_eigenvalue(block: torch.Tensor, dense_limit: int = 2048) -> float:
    """λ_max of a symmetric PSD block: dense for small blocks, LOBPCG for large ones."""
    if block.shape[0] <= dense_limit:
        return float(torch.linalg.eigvalsh(block)[-1])
    torch.manual_seed(0)
    values, _ = torch.lobpcg(block, k=1, niter=200, tol=1e-8)
    return float(values[0])


def block_summary(name: str, layer: Layer, block: torch.Tensor) -> dict:
    """One row of the per-layer table: size, trace, norms and the largest eigenvalue."""
    trace = float(block.diagonal().sum())
    return {
        "layer": name,
        "type": layer.kind,
        "weight": "x".join(str(s) for s in layer.weight.shape),
        "bias": layer.has_bias,
        "P": block.shape[0],
        "trace": trace,
        "frobenius": float(torch.linalg.matrix_norm(block)),
        "lambda_max": _largest_eigenvalue(block),
        "mean_diag": trace / block.shape[0],
    }


def run(args: argparse.Namespace) -> int:
    """Exact per-layer Fisher blocks of a reference model over the training data."""
    check_output_folder(args.out)
    problem = problem_from_args(args)
    start = time.perf_counter()
    blocks = exact_blocks(problem, backend=args.backend)
    seconds = time.perf_counter() - start
    rows = [
        block_summary(name, problem.layers[name], block)
        for name, block in tqdm(blocks.items(), desc="summarising blocks", disable=args.quiet)
    ]
    print(
        f"exact {blocks.fisher_type} Fisher of {where(args, problem)}, backend "
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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``exact``."""
    p = subparsers.add_parser("exact", help="exact per-layer Fisher blocks, summarised per layer")
    add_problem_arguments(p)
    p.add_argument("--fisher-type", choices=FISHER_TYPES, default="true")
    p.add_argument("--mc-samples", type=positive_int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.set_defaults(func=run)
