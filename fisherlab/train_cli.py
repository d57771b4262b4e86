"""The ``train``, ``compare-optimizers`` and ``curves`` subcommands of ``fisherlab``.

``fisherlab train`` trains one model with one optimizer (or a learning-rate/damping grid with
``--grid``) and logs every epoch; ``fisherlab compare-optimizers --config FILE`` runs a set of
optimizers with several seeds and draws the figures; ``fisherlab curves runs/…`` draws the curves
and the time-to-target table of finished runs. See :mod:`fisherlab.experiments`.

:func:`add_parsers` registers the subcommands on an ``argparse`` sub-parser set; :func:`main`
runs them on their own (``python -m fisherlab.train_cli train --optimizer kfac``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fisherlab import datasets
from fisherlab import experiments as ex
from fisherlab.conventions import FisherlabError
from fisherlab.report import format_table, save_table

INTERRUPTED = 130
"""Exit status after Ctrl-C (the shell's convention for SIGINT)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: …``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as JSON when it parses (numbers, booleans, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _format(text: str) -> str:
    """A figure format matplotlib can write (checked before anything is written)."""
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    if text not in supported:
        raise argparse.ArgumentTypeError(
            f"figure format {text!r} is not supported; choose from {sorted(supported)}"
        )
    return text


def dump_json(value: Any) -> str:
    """JSON with two-space indents; lists of numbers and dicts of plain values on one line."""
    text = json.dumps(value, indent=2)

    def one_line(match: re.Match) -> str:
        return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"

    def one_line_dict(match: re.Match) -> str:
        return "{" + ", ".join(item.strip() for item in match.group(1).split(",")) + "}"

    text = re.sub(r"\[\s+([-+.\deE,\s]*?)\s+\]", one_line, text)
    scalars = r'(?:"[\w-]+": (?:[-+.\deE]+|\[[^\[\]{}]*\]|null|true|false),?\s+)+'
    return re.sub(r"\{\s+(" + scalars + r")\}", one_line_dict, text) + "\n"


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
    )


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    keys = ("epoch", "train_loss", "test_loss", "test_accuracy", "time_s", "step_time_s")
    print(format_table([{k: r[k] for k in keys} for r in rows]))


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model with one optimizer (``--grid``: every learning rate × damping)."""
    cfg = _config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / cfg.label.replace(" ", "-")
    try:
        if args.grid:
            lrs, dampings = ex.grid_values(cfg.optimizer)
            g = ex.grid_search(
                cfg,
                args.grid_lr or lrs,
                args.grid_damping or dampings,
                seeds=args.grid_seeds,
                select=args.select,
                out=out,
                progress=not args.quiet,
            )
            print(
                f"grid search of {cfg.optimizer} on {cfg.model}/{cfg.data}: {len(g.points)} points"
            )
            print(format_table([{k: v for k, v in p.items() if k != "runs"} for p in g.points]))
            print(f"per-epoch best ({g.select}):")
            print(format_table(g.per_epoch))
            best = ", ".join(f"{k} {v:g}" for k, v in g.best.items() if v is not None)
            print(f"best at the last epoch: {best}; tables in {out}/grid.csv, grid-per-epoch.csv")
            return 0
        result = ex.train(cfg, out, progress=not args.quiet, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: the finished epochs are logged in {out}", file=sys.stderr)
        return INTERRUPTED
    _print_rows(result.rows)
    print(f"{result.config.label}: {result.status}; logs in {out}/log.csv, log.json, config.json")
    return 0 if result.status == "finished" else 1


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the optimizers of a config file with several seeds, then draw the figures."""
    experiment = ex.load_experiment(args.config)
    out = Path(args.out or experiment.get("out") or "runs/compare")
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
            Path(args.config).write_text(dump_json(experiment))
            print(f"wrote the tuned learning rates and dampings into {args.config}")
    figures = args.figures or experiment.get("figures")
    target = args.target if args.target is not None else experiment.get("target_accuracy")
    if figures:
        table, written = ex.write_curves(runs, figures, target, args.formats)
        print(ex.markdown_table(table))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    """Curves and the time-to-target table of finished runs."""
    folders = ex.find_runs(args.runs)
    runs = []
    for folder in folders:
        run = ex.load_run(folder)
        if run.config.tag == "grid" and not args.include_grid:
            continue
        if run.status not in ("finished", "diverged", "failed"):
            print(f"skipping {folder}: status {run.status}", file=sys.stderr)
            continue
        runs.append(run)
    if not runs:
        raise FisherlabError(f"no finished runs under {', '.join(args.runs)}")
    table, written = ex.write_curves(runs, args.out, args.target, args.formats)
    print(ex.markdown_table(table))
    print(f"{len(runs)} runs; wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``, ``compare-optimizers`` and ``curves`` on ``subparsers``."""
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
    tr.add_argument("--data", choices=datasets.DATASETS, default="digits")
    tr.add_argument("--data-dir", help="folder of the local files (IDX or CIFAR-10 batches)")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, help="learning rate (default: tuned on digits)")
    tr.add_argument("--damping", type=float, help="damping λ (default: tuned on digits)")
    tr.add_argument("--momentum", type=float, default=0.9)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--fisher-type", choices=("empirical", "mc"), default="empirical")
    tr.add_argument(
        "--option",
        type=_option,
        action="append",
        metavar="KEY=VALUE",
        help="further optimizer argument, e.g. inv_update_freq=20 (repeatable)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    tr.add_argument("--train-subset", type=int, help="use the first N training samples")
    tr.add_argument("--test-subset", type=int, help="use the first N test samples")
    tr.add_argument(
        "--no-eval-train",
        action="store_true",
        help="log the running mini-batch loss instead of evaluating the training set",
    )
    tr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    tr.add_argument("--out", help="run folder (default runs/<optimizer>-<model>-<data>-seed-S)")
    tr.add_argument(
        "--overwrite", action="store_true", help="replace an ended run in --out (else refused)"
    )
    tr.add_argument("--grid", action="store_true", help="grid search over lr × damping")
    tr.add_argument("--grid-lr", type=float, nargs="+", help="learning rates of the grid")
    tr.add_argument("--grid-damping", type=float, nargs="+", help="dampings of the grid")
    tr.add_argument("--grid-seeds", type=int, nargs="+", default=[0])
    tr.add_argument("--select", choices=sorted(ex.SELECT_CRITERIA), default="train_loss")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_guarded(cmd_train))

    cmp = subparsers.add_parser(
        "compare-optimizers",
        help="run several optimizers with several seeds from a config file",
        description="Run every optimizer of a JSON config (see configs/digits.json) with every "
        "seed, reuse finished runs, then draw the curves and the time-to-target table.",
    )
    cmp.add_argument("--config", required=True, help="JSON experiment file")
    cmp.add_argument("--out", help="runs folder (default: the config's 'out')")
    cmp.add_argument("--figures", help="figures folder (default: the config's 'figures')")
    cmp.add_argument("--target", type=float, help="test accuracy of the time-to-target table")
    cmp.add_argument(
        "--formats", nargs="+", type=_format, default=["png", "pdf"], help="figure formats"
    )
    cmp.add_argument("--optimizers", nargs="+", choices=ex.OPTIMIZER_NAMES, help="only these")
    cmp.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    cmp.add_argument("--grid", action="store_true", help="tune lr and damping first")
    cmp.add_argument(
        "--update-config", action="store_true", help="with --grid: write the choice to --config"
    )
    cmp.add_argument("--force", action="store_true", help="rerun finished runs")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=_guarded(cmd_compare))

    cur = subparsers.add_parser(
        "curves",
        help="loss/accuracy curves and a time-to-target table of finished runs",
        description="Draw loss vs epoch, loss vs wall-clock and accuracy vs wall-clock (mean and "
        "min-max over seeds) and the time-to-target table of the runs at or below RUNS.",
    )
    cur.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    cur.add_argument("--out", default="figures", help="figures folder")
    cur.add_argument("--target", type=float, help="test accuracy (default: per data set)")
    cur.add_argument("--formats", nargs="+", type=_format, default=["png", "pdf"])
    cur.add_argument("--include-grid", action="store_true", help="also the grid-search runs")
    cur.set_defaults(func=_guarded(cmd_curves))


def _guarded(func):
    """Report fisherlab's errors as one line and exit status 2 (as ``fisherlab.cli`` does)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except FisherlabError as err:
            print(f"fisherlab: error: {err}", file=sys.stderr)
            return 2

    run.__name__, run.__doc__ = func.__name__, func.__doc__
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these subcommands on its own (before they are part of ``fisherlab``)."""
    parser = OneLineParser(prog="fisherlab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
