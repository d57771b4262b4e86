"""Gradient correlation in the parameter basis vs in the Kronecker-factored eigenbasis.

Reproduces the EKFAC paper's Fig. 3 (left). Data: fisherlab.analysis.kfe_decorrelation; figure:
fisherlab.plots.plot_kfe_correlation.

Usage: ``python analyses/kfe_correlation.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only kfe_correlation``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("kfe_correlation"))
