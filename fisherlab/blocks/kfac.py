r"""KFAC: the Kronecker-factored block ``F̂ = Γ ⊗ Ω`` (Martens & Grosse 2015; KFC for conv).

Damping is applied exactly in the Kronecker-factored eigenbasis,
:math:`(F̂ + λI)^{-1} = (U_Γ ⊗ U_Ω)\,\mathrm{diag}(1/(λ_Γ λ_Ω^\top + λ))\,(U_Γ ⊗ U_Ω)^\top`, or,
with ``damping_mode="factored"``, as factored Tikhonov damping
:math:`(Γ + \frac{\sqrt λ}{π} I)^{-1} ⊗ (Ω + π\sqrt λ I)^{-1}` with
:math:`π = \sqrt{(\operatorname{tr}Ω / D) / (\operatorname{tr}Γ / d_{out})}`.

Over a data set the factors are those of all its samples (:class:`KroneckerSums`): one pass,
memory ``d_out² + D²``; a running average keeps the weighted average of batches' factors
(:class:`KFACBuilder`). The eigenbasis and the solve are the shared kernel of
:mod:`fisherlab.blocks.kronecker`. At-scale Frobenius terms: ``‖Γ⊗Ω‖² = ‖Γ‖²‖Ω‖²`` and
``Σ_rows jᵀ(Γ⊗Ω)j = Σ_{n,r} ⟨G_{rn}ΓG_{rn}ᵀ, Ã_nΩÃ_nᵀ⟩`` (``T×T`` per sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.assemble import SCALE_SHIFT_BLOCKS
from fisherlab.blocks.base import (
    BlockBuilder,
    CurvatureBlock,
    LayerStats,
    Options,
    check_damping,
    tensor_bytes,
)
from fisherlab.blocks.factors import KFAC_APPROX, KroneckerSums
from fisherlab.blocks.kronecker import KroneckerEigenbasis, factored_pi, factored_shifts
from fisherlab.linalg import damped_inverse, sample_chunks

DAMPING_MODES = ("eigen", "factored")


def factored_inverses(
    gamma: Tensor, omega: Tensor, damping: float, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(Γ + √λ/π I)⁻¹`` and ``(Ω + π√λ I)⁻¹``, factored damping's two inverses (Cholesky).

    The shifts are :func:`~fisherlab.blocks.kronecker.factored_shifts` of the factors' mean
    eigenvalues (their traces over their sizes).
    """
    shift_gamma, shift_omega = factored_shifts(
        gamma.diagonal().mean(), omega.diagonal().mean(), damping
    )
    return damped_inverse(gamma, shift_gamma, dtype), damped_inverse(omega, shift_omega, dtype)


def kron_inner_with_rows(A: Tensor, G: Tensor, gamma: Tensor, omega: Tensor) -> float:
    """``Σ_{n,r} ⟨G_{rn} Γ G_{rn}ᵀ, Ã_n Ω Ã_nᵀ⟩ = Σ_rows jᵀ (Γ⊗Ω) j``, in chunks of samples."""
    total = 0.0
    t = A.shape[1]
    for chunk in sample_chunks(A.shape[0], G.shape[0] * t * t):
        a_part = torch.einsum("ntd,de,nse->nts", A[chunk], omega, A[chunk])
        g_part = torch.einsum("rntd,de,rnse->rnts", G[:, chunk], gamma, G[:, chunk])
        total += float((g_part * a_part.unsqueeze(0)).sum())
    return total


@dataclass(frozen=True)
class KFACOptions(Options):
    """Options of ``kfac``.

    Attributes:
        kfac_approx: ``"expand"`` (KFC) or ``"reduce"`` factors for layers with ``T > 1``.
        damping_mode: ``"eigen"`` (exact damping in the eigenbasis) or ``"factored"``.
        scale_shift: The block of a scale-and-shift layer (BatchNorm, LayerNorm,
            GroupNorm): ``"diagonal"`` or ``"full"`` (:mod:`fisherlab.blocks.scale_shift`).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "kfac_approx": KFAC_APPROX,
        "damping_mode": DAMPING_MODES,
        "scale_shift": SCALE_SHIFT_BLOCKS,
    }
    kfac_approx: str = "expand"
    damping_mode: str = "eigen"
    scale_shift: str = "diagonal"


class KFACBuilder(BlockBuilder):
    """Weighted sums of the factors (:class:`~fisherlab.blocks.factors.KroneckerSums`).

    The block is ``Γ ⊗ Ω`` of the state: over a data set (``normalise="data"``, weights
    ``(1, 1)``) the factors of all its samples; as a running average (``"batch"``) the
    weighted average of the batches' own factors (see
    :class:`~fisherlab.blocks.base.BlockBuilder`).
    """

    state_names = KroneckerSums.STATE_NAMES

    def __init__(self, layer, options: KFACOptions, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.sums = KroneckerSums(options.kfac_approx, self.per_batch)

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        A = self.layer.kron_inputs(stats.A)
        self.sums.add(A, stats.G, old_weight, new_weight, stats.normaliser)

    def factors(
        self, normaliser: float | None = None, shared: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(Γ, Ω)`` of the state (``normaliser``: as :meth:`block`).

        ``shared``: as :meth:`~fisherlab.blocks.factors.KroneckerSums.factors` (a running
        average of mass 1 gives its sums, which the next :meth:`add` changes in place).
        """
        self._require(not self.sums.empty)
        if self.per_batch:
            self.divisor(normaliser, self.sums.count)  # refuses a normaliser
            return self.sums.factors(shared=shared)
        return self.sums.factors(self.divisor(normaliser, 0.0), self.context.all_reduce)

    def block(self, normaliser: float | None = None) -> KronBlock:
        gamma, omega = self.factors(normaliser)
        return KronBlock(self.layer, gamma, omega, self.context.fisher_type, self.options)

    def _state(self) -> dict[str, Tensor | None]:
        return self.sums.state()

    def _load(self, state) -> None:
        d_out, d = self.layer.d_out, self.layer.d_in + self.layer.has_bias
        self._check_shape("gg", state.get("gg"), (d_out, d_out))
        self._check_shape("aa", state.get("aa"), (d, d))
        self.sums.load(state)


class KronBlock(CurvatureBlock):
    r"""``Γ ⊗ Ω`` given the factors (the ``kfac`` block; the optimizers' KFAC uses it too).

    Its eigenbasis (:meth:`eigenbasis`) and factored damping's inverses
    (:meth:`inverse_factors`) are computed once and kept; an optimizer may compute them
    elsewhere (e.g. one rank each) and pass them in.

    Args:
        layer: The layer.
        gamma: ``Γ``, ``[d_out, d_out]``.
        omega: ``Ω``, ``[D, D]``.
        fisher_type: The Fisher type of the statistics.
        options: :class:`KFACOptions` (or a mapping of them).
        eigenbasis: The factors' eigenbasis, if computed already.
        inverse_factors: ``(λ, (Γ + √λ/π I)⁻¹, (Ω + π√λ I)⁻¹)``, if computed already.
        eigen_dtype: The dtype of the factors' eigen-decompositions and inverses (default:
            float64 for float32 factors).
    """

    method = "kfac"
    Options: ClassVar = KFACOptions
    Builder = KFACBuilder

    def __init__(
        self,
        layer,
        gamma: Tensor,
        omega: Tensor,
        fisher_type: str,
        options,
        eigenbasis: KroneckerEigenbasis | None = None,
        inverse_factors: tuple[float, Tensor, Tensor] | None = None,
        eigen_dtype: torch.dtype | None = None,
    ):
        super().__init__(layer, fisher_type, options)
        self.gamma, self.omega = gamma, omega
        self.eigen_dtype = eigen_dtype
        self._eigenbasis = eigenbasis
        self._inverse_factors = inverse_factors

    def _reference(self) -> Tensor:
        return self.gamma

    def eigenbasis(self) -> KroneckerEigenbasis:
        """The eigenbasis ``U_Γ ⊗ U_Ω`` with the factors' eigenvalues (computed once)."""
        if self._eigenbasis is None:
            self._eigenbasis = KroneckerEigenbasis.of_factors(
                self.gamma, self.omega, self.eigen_dtype
            )
        return self._eigenbasis

    @property
    def eig_gamma(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of ``Γ``."""
        return self.eigenbasis().eig_gamma

    @property
    def eig_omega(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of ``Ω``."""
        return self.eigenbasis().eig_omega

    def inverse_factors(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(Γ + √λ/π I)⁻¹`` and ``(Ω + π√λ I)⁻¹`` (:func:`factored_inverses`), kept per ``λ``.

        A factored solve is then two products, ``Γ⁻¹ V Ω⁻¹``.
        """
        damping = check_damping(damping)
        if self._inverse_factors is None or self._inverse_factors[0] != damping:
            inverses = factored_inverses(self.gamma, self.omega, damping, self.eigen_dtype)
            self._inverse_factors = (damping, *inverses)
        return self._inverse_factors[1], self._inverse_factors[2]

    def _matmat(self, V: Tensor) -> Tensor:
        return self.gamma @ V @ self.omega

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        if self.options.damping_mode == "factored":
            inverse_gamma, inverse_omega = self.inverse_factors(damping)
            return inverse_gamma @ V @ inverse_omega
        return self.eigenbasis().damped_solve(V, damping)

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return self.eigenbasis().eigvalsh()

    def _nbytes(self) -> int:
        held = [self.gamma, self.omega]
        if self._eigenbasis is not None:
            basis = self._eigenbasis
            held += [basis.u_gamma, basis.u_omega, basis.values_gamma, basis.values_omega]
        if self._inverse_factors is not None:
            held += list(self._inverse_factors[1:])
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        return torch.kron(self.gamma, self.omega)

    def norm_sq(self) -> float:
        return float((self.gamma**2).sum() * (self.omega**2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return kron_inner_with_rows(self.layer.kron_inputs(A), G, self.gamma, self.omega)


__all__ = [
    "DAMPING_MODES",
    "KFACBuilder",
    "KFACOptions",
    "KronBlock",
    "factored_inverses",
    "factored_pi",
    "kron_inner_with_rows",
]
