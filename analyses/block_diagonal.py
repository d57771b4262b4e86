"""The block-diagonal approximation: blocks of (F+λI)⁻¹ vs inverses of the blocks.

TENGraD's comparison with exact NGD, on the trained network's empirical Fisher. Data:
fisherlab.analysis.block_diagonal_error; figure: fisherlab.plots.plot_block_diagonal.

Usage: ``python analyses/block_diagonal.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only block_diagonal``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("block_diagonal"))
