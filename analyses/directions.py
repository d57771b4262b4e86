"""Direction quality: cosine of each method's damped natural gradient to the exact one vs damping.

Data: fisherlab.analysis.direction_quality_vs_damping; figure: fisherlab.plots.plot_directions.

Usage: ``python analyses/directions.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only directions``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("directions"))
