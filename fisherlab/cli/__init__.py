"""The ``fisherlab`` command line: one module per subcommand, one error handler.

* ``exact`` (:mod:`~fisherlab.cli.exact`): the exact per-layer Fisher blocks, summarised;
* ``compare`` (:mod:`~fisherlab.cli.compare`): every approximation against the exact Fisher of the
  training data, per layer;
* ``verify`` (:mod:`~fisherlab.cli.verify`): the facts the approximations rest on;
* ``figures`` (:mod:`~fisherlab.cli.figures`): the approximation-quality figures;
* ``train``, ``compare-optimizers``, ``curves`` (:mod:`~fisherlab.cli.train`,
  :mod:`~fisherlab.cli.compare_optimizers`, :mod:`~fisherlab.cli.curves`): optimizers head to head.

Every subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``. Errors in the
arguments, fisherlab's own errors (:class:`~fisherlab.conventions.FisherlabError`) and files that
cannot be written or read (``OSError``: a full disk, a read-only folder) are one line,
``fisherlab: error: …``, with exit status 2 (:func:`main`); fisherlab's own warnings
(:class:`~fisherlab.conventions.FisherlabWarning`) are one line ``fisherlab: warning: …``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fisherlab.cli import compare, compare_optimizers, curves, exact, figures, train, verify
from fisherlab.cli.common import OneLineParser, run_reporting_errors

SUBCOMMANDS = (exact, compare, verify, figures, train, compare_optimizers, curves)
"""The subcommand modules, in the order of ``fisherlab --help``."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fisherlab`` command."""
    parser = OneLineParser(
        prog="fisherlab", description="Curvature of neural networks: exact Fisher and friends."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherlab`` console command: the one error handler."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.func, args)


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
