r"""KFAC: the Kronecker-factored block ``F̂ = Γ ⊗ Ω`` (Martens & Grosse 2015; KFC for conv).

Damping is applied exactly in the Kronecker-factored eigenbasis,
:math:`(F̂ + λI)^{-1} = (U_Γ ⊗ U_Ω)\,\mathrm{diag}(1/(λ_Γ λ_Ω^\top + λ))\,(U_Γ ⊗ U_Ω)^\top`, or,
with ``damping_mode="factored"``, as factored Tikhonov damping
:math:`(Γ + \frac{\sqrt λ}{π} I)^{-1} ⊗ (Ω + π\sqrt λ I)^{-1}` with
:math:`π = \sqrt{(\operatorname{tr}Ω / D) / (\operatorname{tr}Γ / d_{out})}`.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock, tensor_bytes
from fisherlab.blocks.factors import symmetric_eigh

DAMPING_MODES = ("eigen", "factored")


def factored_pi(gamma_mean_eig: float, omega_mean_eig: float) -> float:
    """π of factored Tikhonov damping, ``√(mean eig Ω / mean eig Γ)`` (1 if undefined)."""
    ratio = omega_mean_eig / gamma_mean_eig if gamma_mean_eig > 0 else 0.0
    return math.sqrt(ratio) if ratio > 0 and math.isfinite(ratio) else 1.0


class KronBlock(CurvatureBlock):
    """``Γ ⊗ Ω`` given the factors (shared by ``kfac`` and the dense view of ``skfac``)."""

    method = "kfac"

    def __init__(
        self,
        layer,
        gamma: Tensor,
        omega: Tensor,
        fisher_type: str,
        options: dict,
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
        if self.options.get("damping_mode", "eigen") == "factored":
            pi = factored_pi(
                float(self.gamma.diagonal().mean()), float(self.omega.diagonal().mean())
            )
            root = math.sqrt(damping)
            scale = 1.0 / torch.outer(lg + root / pi, lo + pi * root)
        else:
            scale = 1.0 / (torch.outer(lg, lo) + damping)
        return ug @ ((ug.T @ V @ uo) * scale) @ uo.T

    def _eigvalsh(self) -> Tensor:
        return torch.sort(torch.outer(self.eig_gamma[0], self.eig_omega[0]).flatten()).values

    def _nbytes(self) -> int:
        held = [self.gamma, self.omega]
        for name in ("eig_gamma", "eig_omega"):
            if name in self.__dict__:
                held += list(self.__dict__[name])
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        return torch.kron(self.gamma, self.omega)
