"""The numbers behind fisherlab's figures: how close each approximation is to the exact Fisher.

Every function here takes a model, a loss and data, computes, and returns a :class:`FigureData`
(named tables of plain rows plus settings); :mod:`fisherlab.plots` turns it into a figure, and
:meth:`FigureData.save` / :meth:`FigureData.load` keep it next to the figure as CSV, so that a
figure can be restyled or regenerated without recomputing. The exact reference is always the
library's exact block: :class:`~fisherlab.blocks.exact.ExactBlock` where a dense matrix is
needed, and the ``woodbury`` block (the same matrix, never formed) where its Gram suffices.

* :func:`block_heatmaps`: damped inverse blocks ``(F̂+λI)⁻¹`` of one layer (TENGraD Fig. 6);
* :func:`frobenius_errors`: ``‖F̂−F‖_F/‖F‖_F`` per layer and method, over models × batches;
* :func:`spectra`: sorted eigenvalues of ``F`` and of every ``F̂``, per layer;
* :func:`sample_correlations`: per-sample gradient correlation per layer (FNGD Fig. 3);
* :func:`kfe_decorrelation`: correlation of ``F`` in the parameter basis and in the KFE
  (EKFAC Fig. 3 left);
* :func:`direction_quality_vs_damping`: cosine of ``(F̂+λI)⁻¹g`` to ``(F+λI)⁻¹g`` against ``λ``.

:func:`figure_problem` builds the embedded default: a small model on the digits data, trained
for one epoch of SGD so that the curvature is not that of the initialisation; a
:class:`FigureSource` names other data (local files, a sample, mean-pooled) and larger models.

Example:
    >>> import fisherlab.analysis as an
    >>> p = an.figure_problem("mlp", quick=True)
    >>> (x, y), = an.figure_batches(p, 16)
    >>> data = an.frobenius_errors([p.model], p.loss_fn, [(x, y)], methods=["kfac", "ekfac"])
    >>> e = {(r["layer"], r["method"]): r["rel_frobenius"] for r in data.rows("errors")}
    >>> all(e[layer, "ekfac"] <= e[layer, "kfac"] for layer, _ in e)
    True
"""

from fisherlab.analysis import claims
from fisherlab.analysis.checkpoints import build_model, load_factory, load_trajectory
from fisherlab.analysis.correlation import kfe_decorrelation, matrix_similarity, sample_correlations
from fisherlab.analysis.decomposition import DECOMPOSITION_METHODS, TERMS, error_decomposition
from fisherlab.analysis.directions import direction_quality_vs_damping
from fisherlab.analysis.ekfac_protocol import EKFAC_SERIES, ekfac_protocol
from fisherlab.analysis.fngd import coefficient_sharing
from fisherlab.analysis.frobenius import frobenius_errors
from fisherlab.analysis.heatmaps import block_heatmaps
from fisherlab.analysis.setup import (
    APPROXIMATIONS,
    CONV_EXTRA,
    HEATMAP_METHODS,
    SIZES,
    FigureProblem,
    FigureSource,
    choose_layer,
    default_methods,
    exact_reference,
    exact_spectrum,
    figure_batches,
    figure_model,
    figure_problem,
    train_sgd,
)
from fisherlab.analysis.spectra import spectra
from fisherlab.analysis.sweeps import (
    BATCH_METHODS,
    FISHER_TYPES,
    batch_size_sweep,
    fisher_type_comparison,
    spatial_sweep,
)
from fisherlab.analysis.table import FigureData, matrix_rows, rows_to_matrices
from fisherlab.analysis.tengrad import block_diagonal_error
from fisherlab.analysis.trajectory import (
    Checkpoint,
    Trajectory,
    reference_problem,
    train_trajectory,
    training_state,
)

__all__ = [
    "APPROXIMATIONS",
    "BATCH_METHODS",
    "CONV_EXTRA",
    "DECOMPOSITION_METHODS",
    "EKFAC_SERIES",
    "FISHER_TYPES",
    "HEATMAP_METHODS",
    "SIZES",
    "TERMS",
    "Checkpoint",
    "FigureData",
    "FigureProblem",
    "FigureSource",
    "Trajectory",
    "batch_size_sweep",
    "block_diagonal_error",
    "block_heatmaps",
    "build_model",
    "choose_layer",
    "claims",
    "coefficient_sharing",
    "default_methods",
    "direction_quality_vs_damping",
    "ekfac_protocol",
    "error_decomposition",
    "exact_reference",
    "exact_spectrum",
    "figure_batches",
    "figure_model",
    "figure_problem",
    "fisher_type_comparison",
    "frobenius_errors",
    "kfe_decorrelation",
    "load_factory",
    "load_trajectory",
    "matrix_rows",
    "matrix_similarity",
    "reference_problem",
    "rows_to_matrices",
    "sample_correlations",
    "spatial_sweep",
    "spectra",
    "train_sgd",
    "train_trajectory",
    "training_state",
]
