"""``fisherlab train``: one model, one optimizer (or a grid), logged every epoch.

See :mod:`fisherlab.experiments`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fisherlab import data
from fisherlab import experiments as ex
from fisherlab.cli.common import (
    INTERRUPTED,
    fraction,
    nonnegative_float,
    nonnegative_int,
    option,
    positive_float,
    positive_int,
    seed,
)
from fisherlab.conventions import FisherlabError
from fisherlab.files import check_output_folder
from fisherlab.report import format_table


def _config_from_args(args: argparse.Namespace) -> ex.RunConfig:
    return ex.RunConfig(
        optimizer=args.optimizer,
        model=args.model,
        data=args.data,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        damping=args.damping,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        fisher_type=args.fisher_type,
        optimizer_options=dict(args.option or []),
        seed=args.seed,
        device=args.device,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        eval_train=not args.no_eval_train,
        threads=args.threads,
        relative_damping=args.relative_damping,
        validation=args.validation,
        scale_samples=args.scale_samples,
    )


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    keys = (
        "epoch", "train_loss", "val_loss", "test_loss", "test_accuracy", "time_s", "step_time_s",
        "lambda_max", "damping_ratio", "direction_cosine",
    )  # fmt: skip
    shown = [k for k in keys if any(r.get(k) is not None for r in rows)]
    print(format_table([{k: r.get(k) for k in shown} for r in rows]))


def run(args: argparse.Namespace) -> int:
    """Train one model with one optimizer (``--grid``: every learning rate × damping)."""
    cfg = _config_from_args(args)
    cfg.resolved()  # every setting checked before any work
    if cfg.optimizer in ex.FIRST_ORDER:
        given = [f for f in ("damping", "relative_damping", "grid_damping") if getattr(args, f)]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise FisherlabError(f"{cfg.optimizer} has no damping: {flags} would be ignored")
    out = Path(args.out) if args.out else Path("runs") / cfg.label.replace(" ", "-")
    check_output_folder(out)
    try:
        if args.grid:
            lrs, dampings, relative = ex.grid_values(cfg.optimizer)
            g = ex.grid_search(
                cfg,
                args.grid_lr or lrs,
                args.grid_damping or dampings,
                seeds=args.grid_seeds,
                select=args.select,
                out=out,
                progress=not args.quiet,
                relative=args.relative_damping if args.grid_damping else relative,
                validation=args.validation or 0.1,
                extend=args.grid_extend,
            )
            print(
                f"grid search of {cfg.optimizer} on {cfg.model}/{cfg.data}: {len(g.points)} points"
            )
            print(format_table([{k: v for k, v in p.items() if k != "runs"} for p in g.points]))
            print(f"per-epoch best ({g.select}):")
            print(format_table(g.per_epoch))
            best = ", ".join(f"{k} {v:g}" for k, v in g.best.items() if v is not None)
            best += " (damping as λ/λ_max)" if g.relative else ""
            if g.extended:
                print(f"grid extended beyond its edges: {', '.join(g.extended)}")
            if g.edge:
                print(f"the best point lies ON THE EDGE of the grid: {', '.join(g.edge)}")
            print(f"best at the last epoch: {best}; tables in {out}/grid.csv, grid-per-epoch.csv")
            return 0
        result = ex.train(cfg, out, progress=not args.quiet, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: the finished epochs are logged in {out}", file=sys.stderr)
        return INTERRUPTED
    _print_rows(result.rows)
    print(f"{result.config.label}: {result.status}; logs in {out}/log.csv, log.json, config.json")
    if any(row.get("skipped_steps") for row in result.rows):
        print(f"{result.config.label}: {result.note}", file=sys.stderr)
    return 0 if result.status == "finished" else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    tr = subparsers.add_parser(
        "train",
        help="train a model with one optimizer and log every epoch",
        description="Train a model with one optimizer; logs per epoch go to OUT/log.csv and "
        "OUT/log.json, the config to OUT/config.json. Ctrl-C keeps the finished epochs.",
    )
    tr.add_argument("--optimizer", choices=ex.OPTIMIZER_NAMES, default="kfac")
    tr.add_argument(
        "--model",
        default="mlp",
        help="mlp, cnn, 3c1f, or path/to/file.py:factory (called with input_shape=, "
        "num_classes= when it accepts them)",
    )
    tr.add_argument("--data", choices=list(data.DATASETS), default="digits")
    tr.add_argument("--data-dir", help="folder of the local files (IDX or CIFAR-10 batches)")
    tr.add_argument("--epochs", type=positive_int, default=10)
    tr.add_argument("--batch-size", type=positive_int, default=64)
    tr.add_argument("--lr", type=positive_float, help="learning rate (default: tuned on digits)")
    tr.add_argument("--damping", type=positive_float, help="damping λ (default: tuned on digits)")
    tr.add_argument(
        "--relative-damping",
        action="store_true",
        help="read --damping (and --grid-damping) as λ/λ_max, λ_max the largest eigenvalue of "
        "the Fisher at initialisation",
    )
    tr.add_argument(
        "--validation",
        type=fraction,
        default=0.0,
        help="share of the training set held out for validation (--grid: 0.1 when not given)",
    )
    tr.add_argument(
        "--scale-samples",
        type=nonnegative_int,
        default=256,
        help="training samples λ_max is measured on after every epoch (0: not measured)",
    )
    tr.add_argument("--momentum", type=fraction, default=0.9)
    tr.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    tr.add_argument("--fisher-type", choices=("empirical", "mc"), default="empirical")
    tr.add_argument(
        "--option",
        type=option,
        action="append",
        metavar="KEY=VALUE",
        help="further optimizer argument, e.g. inv_update_freq=20 (repeatable)",
    )
    tr.add_argument("--seed", type=seed, default=0)
    tr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    tr.add_argument(
        "--train-subset", type=positive_int, help="use the first N training samples (N <= the set)"
    )
    tr.add_argument("--test-subset", type=positive_int, help="use the first N test samples")
    tr.add_argument(
        "--no-eval-train",
        action="store_true",
        help="log the running mini-batch loss instead of evaluating the training set",
    )
    tr.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    tr.add_argument("--out", help="run folder (default runs/<optimizer>-<model>-<data>-seed-S)")
    tr.add_argument(
        "--overwrite", action="store_true", help="replace an ended run in --out (else refused)"
    )
    tr.add_argument("--grid", action="store_true", help="grid search over lr × damping")
    tr.add_argument("--grid-lr", type=positive_float, nargs="+", help="learning rates of the grid")
    tr.add_argument("--grid-damping", type=positive_float, nargs="+", help="dampings of the grid")
    tr.add_argument("--grid-seeds", type=seed, nargs="+", default=[0])
    tr.add_argument(
        "--grid-extend",
        type=nonnegative_int,
        default=2,
        help="extend the grid past an edge holding the best point, at most this often",
    )
    tr.add_argument("--select", choices=list(ex.SELECT_CRITERIA), default="val_loss")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=run)
