r"""How close an approximation is to the exact Fisher: errors, spectra, directions, correlations.

Two kinds of functions:

* on dense matrices or blocks (small layers): :func:`frobenius_error`, :func:`spectrum`,
  :func:`spectrum_distance`, :func:`direction_quality`, :func:`correlation_matrix`,
  :func:`kfe_correlation`;
* **at scale**, from the captured statistics and the ``M×M`` Gram ``K = JJᵀ`` only
  (:func:`frobenius_at_scale`), never forming a ``P×P`` matrix:

  .. math::
      \|F - F̂\|_F^2 = \|F\|_F^2 - \tfrac{2}{ν}\sum_{\text{rows } j} j^\top F̂ j + \|F̂\|_F^2,
      \qquad \|F\|_F^2 = \|K\|_F^2/ν^2,

  where each block supplies its own two terms (KFAC:
  :math:`\sum_{n,r}\langle G_{rn}ΓG_{rn}^\top, Ã_nΩÃ_n^\top\rangle` and
  :math:`\|Γ\|^2\|Ω\|^2`; EKFAC: :math:`\langle s, \sum (Q^\top j)^2\rangle` and
  :math:`\|s\|^2`; …). Over a data set (a :class:`~fisherlab.problem.Problem`) ``‖K‖²`` comes
  from blocks of the Gram over pairs of batches (:func:`fisher_norms_sq`, memory of one pair)
  and ``⟨F, F̂⟩`` from one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock
from fisherlab.blocks.ekfac import EKFACBlock
from fisherlab.blocks.woodbury import layer_cross_gram, layer_gram
from fisherlab.capture import LayerCapture, cached_captures, captures
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, check_memory
from fisherlab.problem import Problem


# --------------------------------------------------------------------------------- dense
def frobenius_error(exact: Tensor, approx: Tensor, relative: bool = True) -> float:
    """``‖F − F̂‖_F``, divided by ``‖F‖_F`` when ``relative``."""
    error = torch.linalg.matrix_norm(exact - approx).item()
    if not relative:
        return error
    norm = torch.linalg.matrix_norm(exact).item()
    return error / norm if norm > 0 else (0.0 if error == 0 else math.inf)


def spectrum(
    block: CurvatureBlock | Tensor,
    k: int | None = None,
    dense_limit: int = 4096,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tensor:
    """Eigenvalues, descending: all of them, or the top ``k``.

    A dense tensor or a block with its own cheap ``eigvalsh`` gives exact values; ``k`` with an
    ``exact`` block larger than ``dense_limit`` uses Lanczos (scipy ``eigsh``) through the
    block's linear operator. ``max_bytes`` bounds any dense matrix formed on the way (a dense
    tensor's eigen-decomposition needs a second copy of it).
    """
    if isinstance(block, Tensor):  # PSD up to rounding, as the blocks' own eigvalsh
        check_memory(
            f"the spectrum of a {tuple(block.shape)} matrix (a working copy)",
            block.numel() * block.element_size(),
            max_bytes,
            "pass a block and k= for the top eigenvalues, or raise max_bytes=",
        )
        values = torch.linalg.eigvalsh(block).clamp_min(0).flip(0)
        return values if k is None else values[:k]
    structured = not (block.method == "exact" and block.size > dense_limit)
    if structured or k is None:
        values = block.eigvalsh(max_bytes).flip(0)
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
    return direction_agreement(approx.solve(gradient, damping), exact.solve(gradient, damping))


def direction_agreement(d_hat: Tensor, d: Tensor) -> DirectionQuality:
    """Relative error ``‖d̂ − d‖/‖d‖`` and cosine of a direction ``d̂`` against ``d``."""
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
    return correlation_matrix(layer_gram(layer.layer, layer.A, layer.G))


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
    """``‖F‖²_F = ‖K‖²_F / ν²`` from the Gram of one capture's rows."""
    k = layer_gram(layer.layer, layer.A, layer.G)
    return float((k**2).sum()) / normaliser**2


def fisher_norms_sq(problem: Problem, names: Sequence[str] | None = None) -> dict[str, float]:
    """``‖F‖²_F`` per layer of a problem's data, from blocks of the Gram over pairs of batches.

    ``‖K‖² = Σ_b ‖K_bb‖² + 2 Σ_{c<b} ‖K_bc‖²`` with ``K_bc = J_b J_cᵀ``: memory of one pair of
    batches. Captures are replayed from memory when the data's fit (else recomputed per pair).

    Raises:
        FisherlabError: for data sharded over ranks (pairs would cross ranks).
    """
    if problem.sharded:
        raise FisherlabError(
            "the at-scale Frobenius norm needs every pair of batches, which sharded data "
            "spreads over ranks; compute it on one process"
        )
    names = list(problem.layers) if names is None else list(names)
    totals = dict.fromkeys(names, 0.0)
    with cached_captures(problem):
        for b, first in enumerate(captures(problem, "‖F‖ over pairs of batches")):
            for c, second in enumerate(captures(problem, quiet=True)):
                if c > b:
                    break
                for name in names:
                    x, y = first[name], second[name]
                    k = layer_cross_gram(x.layer, x.A, x.G, y.A, y.G)
                    totals[name] += (1.0 if b == c else 2.0) * float((k**2).sum())
    return {name: total / problem.normaliser**2 for name, total in totals.items()}


def frobenius_at_scale(
    block: CurvatureBlock,
    reference: LayerCapture | Problem,
    normaliser: float | None = None,
    fisher_sq: float | None = None,
) -> tuple[float, float]:
    """``(‖F − F̂‖_F, ‖F‖_F)`` without forming ``F`` or ``F̂`` (module docstring).

    ``‖F − F̂‖² = ‖F‖² − 2⟨F, F̂⟩ + ‖F̂‖²``: the block supplies ``‖F̂‖²``
    (:meth:`~fisherlab.blocks.base.CurvatureBlock.norm_sq`) and ``⟨F, F̂⟩`` from the reference's
    rows (:meth:`~fisherlab.blocks.base.CurvatureBlock.inner_with_rows`), whatever data the block
    was built from (another batch, a stale basis). The subtraction leaves an error of order
    ``√ε·‖F‖``.

    Args:
        block: Any curvature block.
        reference: The exact Fisher's rows: one layer's capture (with ``normaliser``), or a
            :class:`~fisherlab.problem.Problem` (the Fisher of its data; the block's layer).
        normaliser: ``ν`` of a captured reference.
        fisher_sq: ``‖F‖²`` if already known.
    """
    if isinstance(reference, Problem):
        name = block.layer.name
        with cached_captures(reference):
            f_sq = fisher_norms_sq(reference, [name])[name] if fisher_sq is None else fisher_sq
            inner = sum(
                block.inner_with_rows(cap[name].A, cap[name].G)
                for cap in captures(reference, "⟨F, F̂⟩")
            )
        nu = reference.normaliser
    else:
        if normaliser is None:
            raise FisherlabError("frobenius_at_scale of a captured reference needs normaliser=")
        nu = normaliser
        f_sq = fisher_norm_sq(reference, nu) if fisher_sq is None else fisher_sq
        inner = block.inner_with_rows(reference.A, reference.G)
    err_sq = f_sq - 2 * inner / nu + block.norm_sq()
    return math.sqrt(max(err_sq, 0.0)), math.sqrt(f_sq)


# ------------------------------------------------------------------------------- controls
@dataclass(frozen=True)
class ScaleControls:
    r"""An approximation's error before and after matching its scale to the exact block's.

    With :math:`α^* = ⟨F, F̂⟩/\|F̂\|_F^2` (the scalar minimising :math:`\|F − αF̂\|_F`) and
    :math:`τ = \operatorname{tr}F/\operatorname{tr}F̂` (a scalar an optimizer can track), all
    relative to :math:`\|F\|_F`:

    Attributes:
        relative: :math:`\|F − F̂\|/\|F\|`.
        optimal_scalar: :math:`α^*`.
        scaled: :math:`\|F − α^*F̂\|/\|F\|` (shape error; at most 1, since ``α = 0`` gives 1).
        trace_ratio: :math:`τ`.
        trace_matched: :math:`\|F − τF̂\|/\|F\|`.
    """

    relative: float
    optimal_scalar: float
    scaled: float
    trace_ratio: float
    trace_matched: float

    def columns(self, prefix: str = "rel_frobenius") -> dict[str, float]:
        """Table columns ``{prefix}, {prefix}_scaled, {prefix}_trace, alpha, trace_ratio``."""
        return {
            prefix: self.relative,
            f"{prefix}_scaled": self.scaled,
            f"{prefix}_trace": self.trace_matched,
            "alpha": self.optimal_scalar,
            "trace_ratio": self.trace_ratio,
        }


def scale_controls_from_terms(
    fisher_sq: float, inner: float, approx_sq: float, trace: float, approx_trace: float
) -> ScaleControls:
    r""":class:`ScaleControls` from :math:`\|F\|^2`, :math:`⟨F,F̂⟩`, :math:`\|F̂\|^2` and traces.

    :math:`\|F − cF̂\|^2 = \|F\|^2 − 2c⟨F,F̂⟩ + c^2\|F̂\|^2` for any scalar ``c``; at ``c = α*``
    it is :math:`\|F\|^2 − ⟨F,F̂⟩^2/\|F̂\|^2`. The at-scale route (:func:`frobenius_at_scale`)
    supplies the same three terms without forming a matrix.
    """
    norm = math.sqrt(max(fisher_sq, 0.0))

    def rel(c: float) -> float:
        err_sq = fisher_sq - 2 * c * inner + c * c * approx_sq
        err = math.sqrt(max(err_sq, 0.0))
        return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)

    alpha = inner / approx_sq if approx_sq > 0 else 0.0
    tau = trace / approx_trace if approx_trace != 0 else 0.0
    return ScaleControls(rel(1.0), alpha, rel(alpha), tau, rel(tau))


def scale_controls(exact: Tensor, approx: Tensor) -> ScaleControls:
    """:class:`ScaleControls` of a dense approximation ``approx`` of a dense ``exact``."""
    e, a = exact.double(), approx.double()
    return scale_controls_from_terms(
        float((e * e).sum()),
        float((e * a).sum()),
        float((a * a).sum()),
        float(e.trace()),
        float(a.trace()),
    )


def whitened_inverse_error(exact: Tensor, approx: Tensor, damping: float) -> float:
    r"""Root-mean-square whitened error of a damped inverse, one the identity cannot win.

    .. math::
        e = \frac{1}{\sqrt P}\,\|(F+λI)^{1/2}(F̂+λI)^{-1}(F+λI)^{1/2} − I\|_F ,

    zero exactly when ``F̂ = F``; for ``F̂ = 0`` it is ``‖F‖_F/(λ√P)`` (the identity is not
    rewarded at small damping, unlike the relative error of the inverses). Its square is
    :math:`\frac1P\operatorname{tr}[(M−I)^2]` with :math:`M = (F̂+λI)^{-1}(F+λI)`, i.e. the mean
    squared error of the preconditioned curvature's eigenvalues from 1.

    Args:
        exact: ``F``, ``[P, P]`` symmetric PSD.
        approx: ``F̂``, ``[P, P]`` symmetric PSD.
        damping: ``λ > 0``.
    """
    if damping <= 0:
        raise FisherlabError(f"the whitened error needs damping > 0, got {damping}")
    e, a = exact.double(), approx.double()
    eye = torch.eye(len(e), dtype=e.dtype, device=e.device)
    values, vectors = torch.linalg.eigh(e + damping * eye)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    whitened = root @ torch.linalg.solve(a + damping * eye, root)
    whitened = (whitened + whitened.T) / 2
    return float(torch.linalg.matrix_norm(whitened - eye)) / math.sqrt(len(e))


def effective_sample_count(squared_norms: Tensor) -> float:
    r"""``n_eff = (Σ_n ‖j_n‖²)² / Σ_n ‖j_n‖⁴`` of per-sample squared gradient norms.

    The number of samples that carry the trace of the empirical Fisher: ``N`` when every
    per-sample gradient has the same norm, 1 when one sample carries it all.
    """
    s = squared_norms.double()
    total = float(s.sum())
    fourth = float((s * s).sum())
    return total * total / fourth if fourth > 0 else 0.0
