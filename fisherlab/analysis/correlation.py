"""Per-sample gradient correlation (FNGD Fig. 3) and KFE decorrelation (EKFAC Fig. 3 left)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fisherlab.analysis.setup import (
    _capture,
    _layer_info,
    choose_layer,
)
from fisherlab.analysis.table import FigureData, matrix_rows
from fisherlab.blocks import build_block
from fisherlab.metrics import KFECorrelation, frobenius_error, kfe_correlation, sample_correlation
from fisherlab.problem import Problem


def _off_diagonal(c: Tensor) -> Tensor:
    mask = ~torch.eye(len(c), dtype=torch.bool, device=c.device)
    return c[mask]


def matrix_similarity(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of the off-diagonal entries of two equal-size matrices."""
    u, v = _off_diagonal(a).double(), _off_diagonal(b).double()
    u, v = u - u.mean(), v - v.mean()
    denom = (torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v)).item()
    return float(u @ v) / denom if denom > 0 else math.nan


def sample_correlations(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher_type: str = "empirical",
    sort_by_label: bool = True,
) -> FigureData:
    r"""Per-sample gradient correlation of every layer, and how alike the layers' matrices are.

    For each layer, the normalised Gram :math:`C = D^{-1/2} K D^{-1/2}` of the gradient rows
    (:func:`fisherlab.metrics.sample_correlation`; with ``"empirical"`` rows these are the
    per-sample gradients, ``N×N`` — the matrix FNGD's coefficients come from). Samples are
    sorted by label so that class structure shows.

    Returns:
        Tables ``correlation`` (wide rows ``layer, row, c0…``), ``similarity`` (every pair of
        layers: ``layer_a, layer_b, adjacent, pearson`` — Pearson correlation of off-diagonal
        entries — and ``rel_distance = ‖C_a−C_b‖_F/‖C_a‖_F``) and ``labels`` (``row, label``).
    """
    if sort_by_label:
        order = torch.sort(y, stable=True).indices
        x, y = x[order], y[order]
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    matrices = {name: sample_correlation(lc) for name, lc in cap.items()}
    names = list(matrices)
    similarity = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            similarity.append(
                {
                    "layer_a": a,
                    "layer_b": b,
                    "adjacent": abs(i - j) == 1,
                    "pearson": matrix_similarity(matrices[a], matrices[b]),
                    "rel_distance": frobenius_error(matrices[a], matrices[b]),
                }
            )
    labels = [{"row": i, "label": int(v)} for i, v in enumerate(y.tolist())]
    meta = {
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "rows_per_sample": cap[names[0]].G.shape[0],
        "layers": [_layer_info(cap, name) for name in names],
    }
    tables = {
        "correlation": matrix_rows(matrices, key="layer"),
        "similarity": similarity,
        "labels": labels,
    }
    return FigureData("sample_correlation", tables, meta)


# ------------------------------------------------------------------- 5. KFE decorrelation
def kfe_decorrelation(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    layer: str | None = None,
    max_params: int = 200,
    fisher_type: str | None = None,
    floor: float = 1e-10,
) -> FigureData:
    r"""Correlation of the exact block in the parameter basis and in the KFE (EKFAC Fig. 3 left).

    The exact block ``F`` (Kronecker order ``vec_r([W | b])``) and ``QᵀFQ`` with EKFAC's
    Kronecker-factored eigenbasis ``Q = U_Γ ⊗ U_Ω`` of the same batch, each turned into a
    correlation matrix (:func:`fisherlab.metrics.kfe_correlation`). KFE coordinates are sorted
    by decreasing EKFAC scaling ``s``. The summary statistic is the mean absolute off-diagonal
    correlation over the coordinates whose variance exceeds ``floor`` times the largest (the
    others carry no gradient, and their correlation is rounding noise).

    Returns:
        Tables ``correlation`` (wide rows ``basis, row, c0…`` for the chosen layer, at most
        ``max_params`` coordinates of each basis; NaN for coordinates below ``floor``, counted
        in ``meta["masked"]``) and ``summary`` (``layer, P, basis,
        mean_abs_offdiag, offdiag_energy, coordinates``) for every layer. ``offdiag_energy`` is
        the energy-weighted decorrelation ``‖offdiag(M)‖²_F/‖F‖²_F`` of ``M = F`` (parameter
        basis) or ``M = QᵀFQ`` (KFE): the squared relative Frobenius error of the diagonal
        approximation in that basis — of ``diag`` and of EKFAC respectively.
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    chosen = layer if layer is not None else choose_layer(cap, max_params)
    summary, matrices, masked = [], {}, {}
    for name in cap:
        exact = build_block("exact", cap, name)
        ekfac = build_block("ekfac", cap, name)
        corr = kfe_correlation(exact.matrix, ekfac)  # the KFE ordered by decreasing scaling
        order = torch.argsort(ekfac.scalings.flatten(), descending=True, stable=True)
        in_kfe = corr.kfe
        f_sq = float((exact.matrix**2).sum())
        variances = {  # the diagonals of F and of QᵀFQ (= EKFAC's scalings)
            "parameter": exact.matrix.diagonal(),
            "kfe": ekfac.scalings.flatten()[order],
        }
        for basis, c in (("parameter", corr.parameter_basis), ("kfe", in_kfe)):
            v = variances[basis]
            keep = v > floor * v.max()
            summary.append(
                {
                    "layer": name,
                    "P": exact.size,
                    "basis": basis,
                    "mean_abs_offdiag": KFECorrelation.off_diagonal(c[keep][:, keep]),
                    "offdiag_energy": 1.0 - float((v**2).sum()) / f_sq,
                    "coordinates": int(keep.sum()),
                }
            )
        if name == chosen:
            shown = min(exact.size, max_params)
            for basis, c in (("parameter", corr.parameter_basis), ("kfe", in_kfe)):
                v = variances[basis]
                null = (v <= floor * v.max())[:shown]
                m = c[:shown, :shown].clone()
                m[null, :] = math.nan
                m[:, null] = math.nan
                matrices[basis] = m
                masked[basis] = int(null.sum())
    meta = {
        **_layer_info(cap, chosen),
        "shown": len(matrices["kfe"]),
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "floor": floor,
        "masked": masked,
    }
    tables = {"correlation": matrix_rows(matrices, key="basis"), "summary": summary}
    return FigureData("kfe_correlation", tables, meta)
