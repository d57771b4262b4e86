"""SKFAC: error against the spatial samples s' (subsampling), reduce-sum and expand (convolutions).

Data: fisherlab.analysis.spatial_sweep; figure: fisherlab.plots.plot_spatial (CNN only).

Usage: ``python analyses/spatial.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only spatial``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("spatial"))
