r"""KFAC: the Kronecker-factored block ``F̂ = Γ ⊗ Ω`` (Martens & Grosse 2015; KFC for conv).

Damping is applied exactly in the Kronecker-factored eigenbasis,
:math:`(F̂ + λI)^{-1} = (U_Γ ⊗ U_Ω)\,\mathrm{diag}(1/(λ_Γ λ_Ω^\top + λ))\,(U_Γ ⊗ U_Ω)^\top`, or,
with ``damping_mode="factored"``, as factored Tikhonov damping
:math:`(Γ + \frac{\sqrt λ}{π} I)^{-1} ⊗ (Ω + π\sqrt λ I)^{-1}` with
:math:`π = \sqrt{(\operatorname{tr}Ω / D) / (\operatorname{tr}Γ / d_{out})}`.

Over a data set the factors are those of all its samples (:class:`KroneckerSums`): one pass,
memory ``d_out² + D²``. At-scale Frobenius terms: ``‖Γ⊗Ω‖² = ‖Γ‖²‖Ω‖²`` and
``Σ_rows jᵀ(Γ⊗Ω)j = Σ_{n,r} ⟨G_{rn}ΓG_{rn}ᵀ, Ã_nΩÃ_nᵀ⟩`` (``T×T`` per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.assemble import SCALE_SHIFT_BLOCKS
from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, Options, tensor_bytes
from fisherlab.blocks.factors import KFAC_APPROX, KroneckerSums
from fisherlab.linalg import damped_inverse, sample_chunks, symmetric_eigh

DAMPING_MODES = ("eigen", "factored")


def factored_pi(gamma_mean_eig: Tensor | float, omega_mean_eig: Tensor | float) -> Tensor:
    """π of factored Tikhonov damping, ``√(mean eig Ω / mean eig Γ)`` (1 if undefined).

    A 0-dim tensor on the inputs' device, computed without a host synchronisation.
    """
    gamma = torch.as_tensor(gamma_mean_eig, dtype=torch.float64)
    omega = torch.as_tensor(omega_mean_eig, dtype=torch.float64, device=gamma.device)
    ratio = omega / gamma
    ok = (gamma > 0) & torch.isfinite(ratio) & (ratio > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio)).sqrt()


def factored_inverses(
    gamma: Tensor, omega: Tensor, damping: float, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(Γ + √λ/π I)⁻¹`` and ``(Ω + π√λ I)⁻¹``, factored damping's two inverses (Cholesky)."""
    pi = factored_pi(gamma.diagonal().mean(), omega.diagonal().mean())
    root = math.sqrt(damping)
    return damped_inverse(gamma, root / pi, dtype), damped_inverse(omega, pi * root, dtype)


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
    """Sums of the factors over the data set."""

    def __init__(self, layer, options: KFACOptions, context):
        super().__init__(layer, options, context)
        self.sums = KroneckerSums(options.kfac_approx)

    def add(self, A: Tensor, G: Tensor, pass_index: int) -> None:
        self.sums.add(self.layer.kron_inputs(A), G)

    def finish(self, normaliser: float, num_samples: int) -> KronBlock:
        gamma, omega = self.sums.factors(normaliser, self.context.all_reduce)
        return KronBlock(self.layer, gamma, omega, self.context.fisher_type, self.options)


class KronBlock(CurvatureBlock):
    """``Γ ⊗ Ω`` given the factors (the ``kfac`` block; the optimizers' KFAC uses it too)."""

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
        eig_gamma: tuple[Tensor, Tensor] | None = None,
        eig_omega: tuple[Tensor, Tensor] | None = None,
        inverses: tuple[float, Tensor, Tensor] | None = None,
    ):
        super().__init__(layer, fisher_type, options)
        self.gamma, self.omega = gamma, omega
        # computed earlier (e.g. by an optimizer's inverse update)
        if eig_gamma is not None:
            self.__dict__["eig_gamma"] = eig_gamma
        if eig_omega is not None:
            self.__dict__["eig_omega"] = eig_omega
        self._inverses = inverses

    def _reference(self) -> Tensor:
        return self.gamma

    @cached_property
    def eig_gamma(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of ``Γ``."""
        return symmetric_eigh(self.gamma)

    @cached_property
    def eig_omega(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of ``Ω``."""
        return symmetric_eigh(self.omega)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.gamma @ V @ self.omega

    def factored_inverses(self, damping: float) -> tuple[Tensor, Tensor]:
        """Factored damping's two inverses (:func:`factored_inverses`), kept per ``λ``.

        A solve is then two products, ``Γ⁻¹ V Ω⁻¹``.
        """
        if self._inverses is None or self._inverses[0] != damping:
            self._inverses = (damping, *factored_inverses(self.gamma, self.omega, damping))
        return self._inverses[1], self._inverses[2]

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        if self.options.damping_mode == "factored":
            inverse_gamma, inverse_omega = self.factored_inverses(damping)
            return inverse_gamma @ V @ inverse_omega
        (lg, ug), (lo, uo) = self.eig_gamma, self.eig_omega
        return ug @ ((ug.T @ V @ uo) / (torch.outer(lg, lo) + damping)) @ uo.T

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return torch.sort(torch.outer(self.eig_gamma[0], self.eig_omega[0]).flatten()).values

    def _nbytes(self) -> int:
        held = [self.gamma, self.omega]
        for name in ("eig_gamma", "eig_omega"):
            if name in self.__dict__:
                held += list(self.__dict__[name])
        if self._inverses is not None:
            held += list(self._inverses[1:])
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        return torch.kron(self.gamma, self.omega)

    def norm_sq(self) -> float:
        return float((self.gamma**2).sum() * (self.omega**2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return kron_inner_with_rows(self.layer.kron_inputs(A), G, self.gamma, self.omega)
