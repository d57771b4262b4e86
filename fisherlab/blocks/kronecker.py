r"""The one Kronecker-eigenbasis kernel: rotate into ``Q = U_Γ ⊗ U_Ω``, scale, rotate back.

KFAC (``Γ ⊗ Ω``), EKFAC (KFAC's basis with its own scalings) and SKFAC (``Γ ⊗ Ω`` from factor
rows, with low-rank eigenvectors) apply functions of their blocks through this kernel. For
``V: [k, d_out, D]`` in Kronecker order (``vec_r``: ``(U_Γ ⊗ U_Ω)ᵀ vec_r(V) = vec_r(U_Γᵀ V U_Ω)``),

.. math::
    Q\,\mathrm{diag}(w)\,Q^\top v \;=\; U_Γ \big( (U_Γ^\top V U_Ω) \odot w \big) U_Ω^\top,

with ``w: [k_Γ, k_Ω]``. The eigenvectors may be square (orthogonal) or have fewer orthonormal
columns than rows (``k < d``: SKFAC's non-zero eigenpairs of a factor of low rank); then ``Q``
spans a subspace and :meth:`KroneckerEigenbasis.damped_solve` adds the complement's ``v/λ``:

.. math::
    (Γ⊗Ω + λI)^{-1} v = \frac{v}{λ} + Q\Big[\frac{1}{γω^\top + λ} - \frac1λ\Big] Q^\top v
    \qquad (\text{for square } Q \text{ simply } Q\,\frac{1}{γω^\top + λ}\,Q^\top v).

Factored Tikhonov damping (Martens & Grosse 2015, §6.3) replaces ``Γ⊗Ω + λI`` by
``(Γ + \frac{\sqrt λ}{π} I) ⊗ (Ω + π\sqrt λ I)`` with
:math:`π = \sqrt{(\operatorname{tr}Ω/D)/(\operatorname{tr}Γ/d_{out})}`: :func:`factored_shifts`
gives the two shifts (one place for every block and optimizer that uses them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.linalg import symmetric_eigh


def factored_pi(gamma_mean_eig: Tensor | float, omega_mean_eig: Tensor | float) -> Tensor:
    """π of factored Tikhonov damping, ``√(mean eig Ω / mean eig Γ)`` (1 if undefined).

    A 0-dim float64 tensor on the inputs' device, computed without a host synchronisation.
    """
    gamma = torch.as_tensor(gamma_mean_eig, dtype=torch.float64)
    omega = torch.as_tensor(omega_mean_eig, dtype=torch.float64, device=gamma.device)
    ratio = omega / gamma
    ok = (gamma > 0) & torch.isfinite(ratio) & (ratio > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio)).sqrt()


def factored_shifts(
    gamma_mean_eig: Tensor | float, omega_mean_eig: Tensor | float, damping: float
) -> tuple[Tensor, Tensor]:
    """``(√λ/π, π√λ)``: the shifts of ``Γ`` and ``Ω`` under factored Tikhonov damping.

    Args:
        gamma_mean_eig: ``tr Γ / d_out`` (the mean eigenvalue of ``Γ``).
        omega_mean_eig: ``tr Ω / D``.
        damping: ``λ > 0``.

    Returns:
        Two 0-dim float64 tensors; their product is ``λ``.
    """
    pi = factored_pi(gamma_mean_eig, omega_mean_eig)
    root = math.sqrt(damping)
    return root / pi, pi * root


@dataclass(frozen=True)
class KroneckerEigenbasis:
    r"""``Q = U_Γ ⊗ U_Ω`` and, when known, the factors' eigenvalues.

    Attributes:
        u_gamma: Orthonormal columns ``[d_out, k_Γ]`` (``k_Γ = d_out`` for a full basis).
        u_omega: Orthonormal columns ``[D, k_Ω]``.
        values_gamma: Eigenvalues of ``Γ`` ``[k_Γ]`` (``None`` for a basis given without them,
            e.g. EKFAC's ``basis=``).
        values_omega: Eigenvalues of ``Ω`` ``[k_Ω]``.
    """

    u_gamma: Tensor
    u_omega: Tensor
    values_gamma: Tensor | None = None
    values_omega: Tensor | None = None

    @classmethod
    def of_factors(
        cls, gamma: Tensor, omega: Tensor, dtype: torch.dtype | None = None
    ) -> KroneckerEigenbasis:
        """The eigenbasis of ``Γ ⊗ Ω`` from the factors' symmetric eigen-decompositions.

        ``dtype``: the dtype :func:`~fisherlab.linalg.symmetric_eigh` computes in.
        """
        (lg, ug), (lo, uo) = symmetric_eigh(gamma, dtype), symmetric_eigh(omega, dtype)
        return cls(ug, uo, lg, lo)

    @property
    def complete(self) -> bool:
        """Whether ``Q`` is square (an orthogonal basis of the whole space)."""
        return (
            self.u_gamma.shape[0] == self.u_gamma.shape[1]
            and self.u_omega.shape[0] == self.u_omega.shape[1]
        )

    @property
    def eig_gamma(self) -> tuple[Tensor, Tensor]:
        """``(λ_Γ, U_Γ)``."""
        return self.values_gamma, self.u_gamma

    @property
    def eig_omega(self) -> tuple[Tensor, Tensor]:
        """``(λ_Ω, U_Ω)``."""
        return self.values_omega, self.u_omega

    def products(self) -> Tensor:
        """``λ_Γ λ_Ωᵀ`` ``[k_Γ, k_Ω]``: the eigenvalues of ``Γ ⊗ Ω`` on ``Q``."""
        return torch.outer(self.values_gamma, self.values_omega)

    def rotate(self, V: Tensor) -> Tensor:
        """``Qᵀ v``: ``U_Γᵀ V U_Ω``, ``[k, d_out, D]`` → ``[k, k_Γ, k_Ω]``."""
        return self.u_gamma.T @ V @ self.u_omega

    def rotate_back(self, C: Tensor) -> Tensor:
        """``Q c``: ``U_Γ C U_Ωᵀ``, ``[k, k_Γ, k_Ω]`` → ``[k, d_out, D]``."""
        return self.u_gamma @ C @ self.u_omega.T

    def apply(self, V: Tensor, weights: Tensor) -> Tensor:
        """``Q diag(w) Qᵀ v`` for ``V: [k, d_out, D]`` and ``weights: [k_Γ, k_Ω]``."""
        return self.rotate_back(self.rotate(V) * weights)

    def damped_solve(self, V: Tensor, damping: float) -> Tensor:
        """``(Γ ⊗ Ω + λI)⁻¹ v`` (module docstring), exact in the basis; needs the eigenvalues."""
        scale = 1.0 / (self.products() + damping)
        if self.complete:
            return self.apply(V, scale)
        return V / damping + self.apply(V, scale - 1.0 / damping)

    def eigvalsh(self) -> Tensor:
        """All ``d_out·D`` eigenvalues of ``Γ ⊗ Ω``, ascending (zeros for a low-rank basis)."""
        lg, lo = self.values_gamma, self.values_omega
        lg = torch.cat([lg.new_zeros(self.u_gamma.shape[0] - len(lg)), lg])
        lo = torch.cat([lo.new_zeros(self.u_omega.shape[0] - len(lo)), lo])
        return torch.sort(torch.outer(lg, lo).flatten()).values


def damped_factor_solve(values: Tensor, vectors: Tensor, shift: Tensor, V: Tensor) -> Tensor:
    """``(M + cI)⁻¹`` applied to the rows' side ``d`` of ``V: [..., d, m]`` (``M = U diag(σ) Uᵀ``).

    ``U: [d, k]`` may have ``k < d`` orthonormal columns (``M`` of rank ``k``): then
    ``(M + cI)⁻¹ = I/c + U diag(1/(σ + c) − 1/c) Uᵀ`` (Sherman–Morrison–Woodbury).
    """
    return V / shift + vectors @ (
        (vectors.T @ V) * (1 / (values + shift) - 1 / shift).unsqueeze(-1)
    )


__all__ = [
    "KroneckerEigenbasis",
    "damped_factor_solve",
    "factored_pi",
    "factored_shifts",
]
