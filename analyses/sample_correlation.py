"""Per-sample gradient correlation matrices per layer, and how alike adjacent layers' are.

Reproduces the FNGD paper's Fig. 3. Data: fisherlab.analysis.sample_correlations; figure:
fisherlab.plots.plot_sample_correlations.

Usage: ``python analyses/sample_correlation.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only sample_correlation``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("sample_correlation"))
