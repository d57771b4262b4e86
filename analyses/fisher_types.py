"""True vs Monte-Carlo vs empirical Fisher on the same checkpoints, and KFAC under each.

Data: fisherlab.analysis.fisher_type_comparison; figure: fisherlab.plots.plot_fisher_types.

Usage: ``python analyses/fisher_types.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only fisher_types``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("fisher_types"))
