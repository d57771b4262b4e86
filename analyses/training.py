"""KFAC and EKFAC with a basis recomputed every k steps, against the exact block, during SGD.

Reproduces the EKFAC paper's Fig. 3 (right: Frobenius error between basis recomputations) and
Fig. 5c (spectrum distance). Data: fisherlab.analysis.training_errors; figure:
fisherlab.plots.plot_training.

Usage: ``python analyses/training.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only training``).
"""

import sys

from fisherlab.figures_cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("training"))
