"""What the subcommands share: the one-line argument parser, argument types, reference problems."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fisherlab import data, models
from fisherlab.conventions import FisherlabError, FisherlabWarning
from fisherlab.problem import Problem

INTERRUPTED = 130
"""Exit status after Ctrl-C (the shell's convention for SIGINT)."""

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def run_reporting_errors(
    func: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """``func(args)`` with user errors as one line on stderr and exit status 2.

    Errors: :class:`~fisherlab.conventions.FisherlabError` (bad input, refused settings) and
    ``OSError`` (a file that cannot be read or written: a full disk, a read-only folder).
    fisherlab's own warnings (:class:`~fisherlab.conventions.FisherlabWarning`) are one line
    ``fisherlab: warning: …``; other warnings keep Python's format.
    """
    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FisherlabWarning):
            print(f"fisherlab: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return func(args)
    except FisherlabError as err:
        print(f"fisherlab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the command reads or writes: the disk, not the code
        where = f" {err.filename}" if err.filename else ""
        print(f"fisherlab: error: cannot access{where}: {err.strerror or err}", file=sys.stderr)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: …``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(text: str, low: int, what: str) -> int:
    """``text`` as an integer ``≥ low``, else a one-line usage error saying it must be ``what``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (else a one-line usage error)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer ≥ 0 (seeds, counts that may be zero)."""
    return _int_at_least(text, 0, "an integer >= 0")


def seed(text: str) -> int:
    """An argparse type: a seed, an integer in ``[0, 2³²)``."""
    value = nonnegative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be a seed in [0, 2**32), got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number ≥ 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in ``[0, 1)`` (momentum, a held-out share)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def accuracy(text: str) -> float:
    """An argparse type: an accuracy in ``(0, 1]``."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1], got {text}")
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


def option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as JSON when it parses (numbers, booleans, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def figure_format(text: str) -> str:
    """A figure format matplotlib can write (checked before anything is written)."""
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    if text not in supported:
        raise argparse.ArgumentTypeError(
            f"figure format {text!r} is not supported; choose from {sorted(supported)}"
        )
    return text


def model_spec(text: str) -> str:
    """An argparse type: a registered model name, or a factory path with a colon."""
    if text in models.MODELS or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; choose from {sorted(models.MODELS)} or give "
        "package.module:factory"
    )


def user_model(spec: str, checkpoint: str | None = None) -> torch.nn.Module:
    """A registered model (seeded by the caller) or a user's factory, with a checkpoint loaded.

    The checkpoint (a state dict saved by ``torch.save``, or a dict holding one under
    ``state_dict``/``model_state_dict``/``model``) must fit the model: the first missing,
    unexpected or mis-shaped entry is named in a one-line error.
    """
    from fisherlab.analysis import checkpoints

    model = models.build(spec) if spec in models.MODELS else checkpoints.build_model(spec)
    if checkpoint is not None:
        ((_, _, state, source),) = checkpoints.read_checkpoints([checkpoint])
        checkpoints.check_fits(model, state, source)
        model.load_state_dict(state)
    return model


def problem_from_args(args: argparse.Namespace, fisher_type: str | None = None) -> Problem:
    """The ``--model`` (seeded) on ``--samples`` training images, in ``--batch-size`` batches.

    Raises:
        FisherlabError: When ``--samples`` exceeds the training set (never clipped silently).
    """
    dtype = DTYPES[args.dtype]
    split = data.load(args.data, seed=args.seed, dtype=dtype)
    if args.samples is not None and args.samples > len(split.x_train):
        raise FisherlabError(
            f"--samples {args.samples} exceeds the {len(split.x_train):,} training samples of "
            f"{args.data}"
        )
    torch.manual_seed(args.seed)
    model = user_model(args.model, getattr(args, "checkpoint", None)).to(dtype).eval()
    n = len(split.x_train) if args.samples is None else args.samples
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


def where(args: argparse.Namespace, problem: Problem) -> str:
    """One line saying which model, data and samples a reference problem holds."""
    samples = problem.num_samples if problem.num_samples is not None else problem.num_samples_hint
    return (
        f"{args.model} on {args.data}: {samples} training samples in batches of "
        f"{args.batch_size}, {args.dtype}"
    )


def add_problem_arguments(p: argparse.ArgumentParser, model_default: str | None = "mlp") -> None:
    """The options of the reference problem (:func:`problem_from_args`)."""
    p.add_argument(
        "--model",
        type=model_spec,
        default=model_default,
        help=f"one of {sorted(models.MODELS)}, or your own: package.module:factory or "
        "path/to/file.py:factory (called without arguments)",
    )
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
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="results", help="folder for the CSV/JSON tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
