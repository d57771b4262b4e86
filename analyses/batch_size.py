"""Batch-size sweep: the exact batch block (TENGraD), KFAC and EKFAC from a batch vs the reference.

Data: fisherlab.analysis.batch_size_sweep; figure: fisherlab.plots.plot_batch_size.

Usage: ``python analyses/batch_size.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only batch_size``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("batch_size"))
