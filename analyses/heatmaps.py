"""Block heatmaps: the exact damped inverse Fisher block next to woodbury, kfac, ekfac, skfac.

Reproduces the TENGraD paper's Fig. 6 (exact NGD block vs TENGraD vs KFAC), with EKFAC and SKFAC
added and the difference maps below. Data: fisherlab.analysis.block_heatmaps; figure:
fisherlab.plots.plot_block_heatmaps.

Usage: ``python analyses/heatmaps.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only heatmaps``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("heatmaps"))
