"""Eigenspectra: sorted eigenvalues of the exact block and of each approximation, per layer.

Data: fisherlab.analysis.spectra; figure: fisherlab.plots.plot_spectra.

Usage: ``python analyses/spectra.py --out figures/`` (options: ``--model mlp|cnn|all``,
``--seed``, ``--quick``, ``--quiet``, ``--from-data``, ``--threads``;
the same as ``fisherlab figures --only spectra``).
"""

import sys

from fisherlab.cli.figures import script_main

if __name__ == "__main__":
    sys.exit(script_main("spectra"))
