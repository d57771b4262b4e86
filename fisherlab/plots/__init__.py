r"""Figures of approximation quality: each function takes computed data and returns a Figure.

The data come from :mod:`fisherlab.analysis` (or from :meth:`FigureData.load
<fisherlab.analysis.FigureData.load>`, to redraw without recomputing); the functions build a
``matplotlib.figure.Figure`` without pyplot, so they never change the user's backend and work
headless. Restyle a returned figure as usual (``fig.axes[0].set_title(...)``), or change the
shared look in one place: :func:`style` (seaborn ``whitegrid``/``paper`` and fisherlab's
rcParams) and :data:`METHOD_COLORS` (one colour per method, the same in every figure).

Example:
    >>> import fisherlab.analysis as an, fisherlab.plots as fp
    >>> p = an.figure_problem("mlp", quick=True)
    >>> (x, y), = an.figure_batches(p, 32)
    >>> fig = fp.plot_spectra(an.spectra(p.model, p.loss_fn, x, y))
    >>> len(fig.axes) == len(p.model) // 2
    True
"""

from matplotlib.figure import Figure

from fisherlab.analysis import FigureData
from fisherlab.plots.base import (
    FISHER_UNITS,
    METHOD_COLORS,
    METHOD_LABELS,
    METHOD_STYLES,
    RC,
    color,
    label,
    linestyle,
    marker,
    save_figure,
    style,
)
from fisherlab.plots.snapshots import (
    plot_block_heatmaps,
    plot_comparison,
    plot_directions,
    plot_frobenius,
    plot_kfe_correlation,
    plot_sample_correlations,
    plot_spectra,
)
from fisherlab.plots.trajectories import (
    plot_batch_size,
    plot_block_diagonal,
    plot_decomposition,
    plot_ekfac_protocol,
    plot_fisher_types,
    plot_fngd,
    plot_spatial,
)

PLOTS = {
    "comparison": plot_comparison,
    "heatmaps": plot_block_heatmaps,
    "frobenius": plot_frobenius,
    "spectra": plot_spectra,
    "sample_correlation": plot_sample_correlations,
    "kfe_correlation": plot_kfe_correlation,
    "directions": plot_directions,
    "decomposition": plot_decomposition,
    "ekfac_protocol": plot_ekfac_protocol,
    "fngd": plot_fngd,
    "block_diagonal": plot_block_diagonal,
    "batch_size": plot_batch_size,
    "spatial": plot_spatial,
    "fisher_types": plot_fisher_types,
}
"""The figure function of each :class:`~fisherlab.analysis.FigureData` name."""


def plot(data: FigureData) -> Figure:
    """The figure of any :class:`~fisherlab.analysis.FigureData`, by its name."""
    return PLOTS[data.name](data)


__all__ = [
    "FISHER_UNITS",
    "METHOD_COLORS",
    "METHOD_LABELS",
    "METHOD_STYLES",
    "PLOTS",
    "RC",
    "color",
    "label",
    "linestyle",
    "marker",
    "plot",
    "plot_batch_size",
    "plot_block_diagonal",
    "plot_block_heatmaps",
    "plot_comparison",
    "plot_decomposition",
    "plot_directions",
    "plot_ekfac_protocol",
    "plot_fisher_types",
    "plot_fngd",
    "plot_frobenius",
    "plot_kfe_correlation",
    "plot_sample_correlations",
    "plot_spatial",
    "plot_spectra",
    "save_figure",
    "style",
]
