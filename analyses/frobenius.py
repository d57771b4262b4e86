"""Relative Frobenius error of every block approximation, per layer, over seeds and batches.

Data: fisherlab.analysis.frobenius_errors (at-scale formulas of fisherlab.metrics); figure:
fisherlab.plots.plot_frobenius.

Usage: ``python analyses/frobenius.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only frobenius``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("frobenius"))
