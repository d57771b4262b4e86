"""Where each approximation's error comes from along training: structural, estimation, staleness.

New in this field (no paper figure). Data: fisherlab.analysis.error_decomposition; figure:
fisherlab.plots.plot_decomposition.

Usage: ``python analyses/decomposition.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only decomposition``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("decomposition"))
