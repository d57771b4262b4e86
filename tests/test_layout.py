"""The package's layout: the library's core loads no application (figures, experiments, plots)."""

import subprocess
import sys


def test_import_fisherlab_loads_no_plotting_library():
    code = (
        "import sys, fisherlab as fl; "
        "print(sorted(m for m in ('matplotlib', 'seaborn', 'fisherlab.plots', "
        "'fisherlab.analysis', 'fisherlab.experiments') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_applications_are_reachable_as_attributes():
    import fisherlab as fl

    assert fl.plots.__name__ == "fisherlab.plots"
    assert fl.analysis.__name__ == "fisherlab.analysis"
