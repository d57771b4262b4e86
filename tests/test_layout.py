"""The package's layout: the library's core loads no application (figures, experiments, plots)."""

import ast
import subprocess
import sys
from pathlib import Path


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


# ------------------------------------------------------------------ import graph
PACKAGE = Path(__file__).resolve().parents[1] / "fisherlab"
#: The applications and the command line (``__main__`` runs it): the core imports none of them.
APPLICATIONS = {"analysis", "plots", "experiments", "cli", "__main__"}
PARTS = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}


def _imported_parts(node: ast.AST) -> list[str]:
    """The package parts (``fisherlab.<part>``) an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        return []
    bits = [name.split(".") for name in names]
    return [b[1] for b in bits if b[0] == "fisherlab" and len(b) > 1 and b[1] in PARTS]


def _imports() -> dict[str, set[str]]:
    """``{part: parts it imports}`` over every import, lazy ones included."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            graph.setdefault(part, set()).update(set(_imported_parts(node)) - {part})
    return graph


def test_no_import_cycle_between_the_package_parts():
    graph = _imports()
    cycles = {tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())}
    assert not cycles


def test_the_core_imports_no_application():
    offending = {
        part: sorted(deps & APPLICATIONS)
        for part, deps in _imports().items()
        if part not in APPLICATIONS and deps & APPLICATIONS
    }
    assert not offending
