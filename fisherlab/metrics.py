r"""How close an approximation is to the exact Fisher: errors, spectra, directions, correlations.

Two kinds of functions:

* on dense matrices or blocks (small layers): :func:`frobenius_error`, :func:`spectrum`,
  :func:`spectrum_distance`, :func:`direction_quality`, :func:`correlation_matrix`,
  :func:`kfe_correlation`;
* **at scale**, from the captured statistics and the ``M×M`` Gram ``K = JJᵀ`` only
  (:func:`frobenius_at_scale`), never forming a ``P×P`` matrix:

  .. math::
      \|F\|_F^2 = \|K\|_F^2/ν^2,\quad
      \|F - Γ⊗Ω\|_F^2 = \|F\|^2 - \tfrac{2}{ν}\sum_{n,r}\langle G_{rn}ΓG_{rn}^\top,
      Ã_nΩÃ_n^\top\rangle + \|Γ\|^2\|Ω\|^2,

  :math:`\|F - F̂_{ekfac}\|^2 = \|F\|^2 - \|s\|^2` and
  :math:`\|F - \mathrm{diag}F\|^2 = \|F\|^2 - \|\mathrm{diag}F\|^2`. Memory is
  ``O(M² + T² + d_in² + d_out²)`` plus one gradient-sized vector for ``ekfac``/``diag``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock
from fisherlab.blocks.diag import DiagBlock
from fisherlab.blocks.ekfac import EKFACBlock
from fisherlab.blocks.factors import sample_chunks
from fisherlab.blocks.kfac import KronBlock
from fisherlab.blocks.skfac import SKFACBlock
from fisherlab.blocks.woodbury import WoodburyBlock, choose_gram_route, gram
from fisherlab.capture import LayerCapture
from fisherlab.conventions import FisherlabError


# --------------------------------------------------------------------------------- dense
def frobenius_error(exact: Tensor, approx: Tensor, relative: bool = True) -> float:
    """``‖F − F̂‖_F``, divided by ``‖F‖_F`` when ``relative``."""
    error = torch.linalg.matrix_norm(exact - approx).item()
    if not relative:
        return error
    norm = torch.linalg.matrix_norm(exact).item()
    return error / norm if norm > 0 else (0.0 if error == 0 else math.inf)


def spectrum(
    block: CurvatureBlock | Tensor, k: int | None = None, dense_limit: int = 4096
) -> Tensor:
    """Eigenvalues, descending: all of them, or the top ``k``.

    A dense tensor or a block with its own cheap ``eigvalsh`` gives exact values; ``k`` with a
    block larger than ``dense_limit`` and no structured ``eigvalsh`` uses Lanczos (scipy
    ``eigsh``) through the block's linear operator.
    """
    if isinstance(block, Tensor):  # PSD up to rounding, as the blocks' own eigvalsh
        values = torch.linalg.eigvalsh(block).clamp_min(0).flip(0)
        return values if k is None else values[:k]
    structured = not (block.method == "exact" and block.size > dense_limit)
    if structured or k is None:
        values = block.eigvalsh().flip(0)
        return values if k is None else values[:k]
    top = eigsh(block.as_linear_operator(), k=k, which="LA", return_eigenvectors=False)
    return torch.as_tensor(np.sort(top)[::-1].copy(), dtype=block.dtype)


def spectrum_distance(exact: Tensor, approx: Tensor) -> float:
    """Relative distance of sorted spectra, ``‖λ(F) − λ(F̂)‖₂ / ‖λ(F)‖₂`` (both descending).

    Spectra of different lengths (top-k) are compared on their common leading part.
    """
    n = min(len(exact), len(approx))
    a, b = exact[:n].double(), approx[:n].double()
    norm = torch.linalg.vector_norm(a).item()
    diff = torch.linalg.vector_norm(a - b).item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


@dataclass(frozen=True)
class DirectionQuality:
    """How a preconditioned gradient ``(F̂+λI)⁻¹g`` compares with ``(F+λI)⁻¹g``."""

    relative_error: float
    cosine: float


def direction_quality(
    approx: CurvatureBlock, exact: CurvatureBlock, gradient: Tensor, damping: float
) -> DirectionQuality:
    """Relative error and cosine of the approximate natural gradient against the exact one."""
    d_hat, d = approx.solve(gradient, damping), exact.solve(gradient, damping)
    norm = torch.linalg.vector_norm(d).item()
    error = torch.linalg.vector_norm(d_hat - d).item()
    denom = norm * torch.linalg.vector_norm(d_hat).item()
    cosine = float(d_hat @ d) / denom if denom > 0 else math.nan
    return DirectionQuality(error / norm if norm > 0 else math.nan, cosine)


def correlation_matrix(matrix: Tensor) -> Tensor:
    """``C_ij = M_ij / √(M_ii M_jj)``.

    Rows and columns whose variance ``M_ii`` is zero up to rounding (below
    ``n·eps·max M_ii``) are set to zero rather than to correlations of rounding noise.
    """
    diag = matrix.diagonal().clamp_min(0)
    tiny = len(diag) * torch.finfo(matrix.dtype).eps * diag.max().clamp_min(0)
    scale = torch.where(diag > tiny, 1.0 / diag.sqrt(), torch.zeros_like(diag))
    return matrix * scale.unsqueeze(0) * scale.unsqueeze(1)


def sample_correlation(layer: LayerCapture) -> Tensor:
    """The normalised Gram ``K`` of a layer's gradient rows (``M×M``; ``N×N`` for empirical)."""
    A, G = layer.A, layer.G
    return correlation_matrix(gram(A, G, choose_gram_route(A, G)))


@dataclass(frozen=True)
class KFECorrelation:
    """Gradient correlation in the parameter basis and in the Kronecker-factored eigenbasis."""

    parameter_basis: Tensor
    kfe: Tensor

    @staticmethod
    def off_diagonal(c: Tensor) -> float:
        """Mean absolute off-diagonal correlation."""
        n = len(c)
        return float((c.abs().sum() - c.diagonal().abs().sum()) / max(n * n - n, 1))


def kfe_correlation(
    exact_kron: Tensor, ekfac: EKFACBlock, coordinates: int | None = None
) -> KFECorrelation:
    """Correlations of ``F`` (Kronecker order) in the parameter basis and in EKFAC's KFE.

    Args:
        exact_kron: The exact block in Kronecker order (e.g. ``ExactBlock.matrix``).
        ekfac: The EKFAC block whose basis ``U_Γ ⊗ U_Ω`` defines the KFE.
        coordinates: Keep this many coordinates of each basis (all if None): the parameter
            basis in its own order, the KFE ordered by decreasing scaling ``s`` (the most
            important directions first).
    """
    q = torch.kron(ekfac.u_gamma, ekfac.u_omega)
    order = torch.argsort(ekfac.scalings.flatten(), descending=True, stable=True)
    q = q[:, order]
    in_kfe = q.T @ exact_kron @ q
    keep = slice(None) if coordinates is None else slice(0, coordinates)
    return KFECorrelation(
        correlation_matrix(exact_kron)[keep, keep], correlation_matrix(in_kfe)[keep, keep]
    )


# ------------------------------------------------------------------------------- at scale
def fisher_norm_sq(layer: LayerCapture, normaliser: float) -> float:
    """``‖F‖²_F = ‖K‖²_F / ν²`` from the Gram of the captured rows."""
    A, G = layer.A, layer.G
    k = gram(A, G, choose_gram_route(A, G))
    return float((k**2).sum()) / normaliser**2


def _kron_inner(layer: LayerCapture, gamma: Tensor, omega: Tensor, normaliser: float) -> float:
    """``⟨F, Γ⊗Ω⟩ = (1/ν) Σ_{n,r} ⟨G_{rn} Γ G_{rn}ᵀ, Ã_n Ω Ã_nᵀ⟩`` (``T×T`` per sample)."""
    A, G = layer.A, layer.G
    total = 0.0
    t = A.shape[1]
    for chunk in sample_chunks(A.shape[0], G.shape[0] * t * t):
        a_part = torch.einsum("ntd,de,nse->nts", A[chunk], omega, A[chunk])
        g_part = torch.einsum("rntd,de,rnse->rnts", G[:, chunk], gamma, G[:, chunk])
        total += float((g_part * a_part.unsqueeze(0)).sum())
    return total / normaliser


def _cross_gram(A: Tensor, G: Tensor, A1: Tensor, G1: Tensor) -> Tensor:
    """``J J̃ᵀ`` for rows ``J`` from ``(A, G)`` and ``J̃`` from single-position ``(A1, G1)``."""
    r, n, t = G.shape[:3]
    out = A.new_empty(r, n, r, n)
    for chunk in sample_chunks(n, r * r * n * t):
        aa = torch.einsum("ntd,md->nmt", A[chunk], A1[:, 0])
        gg = torch.einsum("rntd,smd->rnsmt", G[:, chunk], G1[:, :, 0])
        out[:, chunk] = (gg * aa.unsqueeze(0).unsqueeze(2)).sum(dim=-1)
    return out.reshape(r * n, r * n)


def frobenius_at_scale(
    block: CurvatureBlock, layer: LayerCapture, normaliser: float, fisher_sq: float | None = None
) -> tuple[float, float]:
    """``(‖F − F̂‖_F, ‖F‖_F)`` without forming ``F`` or ``F̂`` (module docstring).

    Supported blocks: ``kfac``, ``ekfac``, ``skfac``, ``diag`` and ``woodbury`` (error zero when
    it is exact).
    """
    f_sq = fisher_norm_sq(layer, normaliser) if fisher_sq is None else fisher_sq
    if isinstance(block, KronBlock | SKFACBlock):
        if isinstance(block, SKFACBlock):
            gamma = block.Y.T @ block.Y / block.normaliser
            omega = block.X.T @ block.X / block.X.shape[0]
        else:
            gamma, omega = block.gamma, block.omega
        inner = _kron_inner(layer, gamma, omega, normaliser)
        approx_sq = float((gamma**2).sum() * (omega**2).sum())
        err_sq = f_sq - 2 * inner + approx_sq
    elif isinstance(block, EKFACBlock):
        err_sq = f_sq - float((block.scalings**2).sum())
    elif isinstance(block, DiagBlock):
        err_sq = f_sq - float((block.diagonal**2).sum())
    elif isinstance(block, WoodburyBlock):
        if block.options.get("conv_gram") == "reduce_sum" and layer.positions > 1:
            # ⟨F, F̃⟩ = ‖J J̃ᵀ‖² / ν², ‖F̃‖² = ‖K̃‖² / ν²
            cross = _cross_gram(layer.A, layer.G, block.A, block.G)
            inner = float((cross**2).sum()) / normaliser**2
            err_sq = f_sq - 2 * inner + float((block.gram**2).sum()) / normaliser**2
        else:
            err_sq = 0.0
    else:
        raise FisherlabError(f"no at-scale Frobenius error for method {block.method!r}")
    return math.sqrt(max(err_sq, 0.0)), math.sqrt(f_sq)
