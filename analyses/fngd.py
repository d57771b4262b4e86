"""A test of FNGD's hypothesis: coefficients from epoch 0 reused in later epochs.

Cosine of the shared-coefficient direction and of the plain gradient to the fresh natural
gradient. Data: fisherlab.analysis.coefficient_sharing; figure: fisherlab.plots.plot_fngd.

Usage: ``python analyses/fngd.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only fngd``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("fngd"))
