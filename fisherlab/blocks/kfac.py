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

from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, Options, tensor_bytes
from fisherlab.blocks.factors import KFAC_APPROX, KroneckerSums
from fisherlab.linalg import sample_chunks, symmetric_eigh

DAMPING_MODES = ("eigen", "factored")


def factored_pi(gamma_mean_eig: float, omega_mean_eig: float) -> float:
    """π of factored Tikhonov damping, ``√(mean eig Ω / mean eig Γ)`` (1 if undefined)."""
    ratio = omega_mean_eig / gamma_mean_eig if gamma_mean_eig > 0 else 0.0
    return math.sqrt(ratio) if ratio > 0 and math.isfinite(ratio) else 1.0


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
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "kfac_approx": KFAC_APPROX,
        "damping_mode": DAMPING_MODES,
    }
    kfac_approx: str = "expand"
    damping_mode: str = "eigen"


class KFACBuilder(BlockBuilder):
    """Sums of the factors over the data set."""

    def __init__(self, layer, options: KFACOptions, context):
        super().__init__(layer, options, context)
        self.sums = KroneckerSums(options.kfac_approx)

    def add(self, A: Tensor, G: Tensor, pass_index: int) -> None:
        self.sums.add(A, G)

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
    ):
        super().__init__(layer, fisher_type, options)
        self.gamma, self.omega = gamma, omega
        # eigen-decompositions computed earlier (e.g. by an optimizer's inverse update)
        if eig_gamma is not None:
            self.__dict__["eig_gamma"] = eig_gamma
        if eig_omega is not None:
            self.__dict__["eig_omega"] = eig_omega

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

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        (lg, ug), (lo, uo) = self.eig_gamma, self.eig_omega
        if self.options.damping_mode == "factored":
            pi = factored_pi(
                float(self.gamma.diagonal().mean()), float(self.omega.diagonal().mean())
            )
            root = math.sqrt(damping)
            scale = 1.0 / torch.outer(lg + root / pi, lo + pi * root)
        else:
            scale = 1.0 / (torch.outer(lg, lo) + damping)
        return ug @ ((ug.T @ V @ uo) * scale) @ uo.T

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return torch.sort(torch.outer(self.eig_gamma[0], self.eig_omega[0]).flatten()).values

    def _nbytes(self) -> int:
        held = [self.gamma, self.omega]
        for name in ("eig_gamma", "eig_omega"):
            if name in self.__dict__:
                held += list(self.__dict__[name])
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        return torch.kron(self.gamma, self.omega)

    def norm_sq(self) -> float:
        return float((self.gamma**2).sum() * (self.omega**2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return kron_inner_with_rows(A, G, self.gamma, self.omega)
