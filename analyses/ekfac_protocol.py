"""KFAC, EKFAC and EKFAC-ra with a KFE basis fixed at step 0, against the training set's Fisher.

Reproduces the EKFAC paper's Fig. 3 (right) and Fig. 5c under its protocol (empirical Fisher,
basis fixed, trained to a low loss). Data: fisherlab.analysis.ekfac_protocol; figure:
fisherlab.plots.plot_ekfac_protocol.

Usage: ``python analyses/ekfac_protocol.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only ekfac_protocol``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("ekfac_protocol"))
