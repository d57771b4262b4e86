r"""EKFAC: KFAC's eigenbasis with exact second moments (George et al., NeurIPS 2018).

With the Kronecker-factored eigenbasis ``Q = U_Γ ⊗ U_Ω`` of the KFAC factors,

.. math::
    F̂ = Q \,\mathrm{diag}(s)\, Q^\top, \qquad s = \frac1ν \sum_{n,r} (Q^\top j_{n,r})^2,

the best approximation of ``F`` (in Frobenius norm) among matrices diagonal in ``Q``; hence
``‖F − F̂_ekfac‖ ≤ ‖F − F̂_kfac‖`` and ``‖F − F̂_ekfac‖² = ‖F‖² − ‖s‖²``. The basis may come from
another batch (``basis=``), to study a stale basis with fresh scalings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock, tensor_bytes
from fisherlab.blocks.factors import sample_chunks
from fisherlab.conventions import FisherlabError


def kfe_scalings(
    A: Tensor, G: Tensor, u_gamma: Tensor, u_omega: Tensor, normaliser: float
) -> Tensor:
    """``s`` as ``[d_out, D]``: second moments of the gradient rows in the basis ``U_Γ ⊗ U_Ω``."""
    A_rot = A @ u_omega  # [N, T, D]
    G_rot = G @ u_gamma  # [R, N, T, d_out]
    if A.shape[1] == 1:  # one position: (g ⊗ a)² = g² ⊗ a², a single product
        return torch.einsum("rnd,ne->de", G_rot[:, :, 0] ** 2, A_rot[:, 0] ** 2) / normaliser
    s = A.new_zeros(u_gamma.shape[0], u_omega.shape[0])
    row = G.shape[0] * u_gamma.shape[0] * u_omega.shape[0]
    for chunk in sample_chunks(A.shape[0], row):
        rotated = torch.einsum("rntd,nte->rnde", G_rot[:, chunk], A_rot[chunk])
        s += (rotated**2).sum(dim=(0, 1))
    return s / normaliser


class EKFACBlock(CurvatureBlock):
    """``Q diag(s) Qᵀ`` with ``Q = U_Γ ⊗ U_Ω``; damping ``1/(s + λ)`` in that basis."""

    method = "ekfac"

    def __init__(
        self, layer, u_gamma: Tensor, u_omega: Tensor, scalings: Tensor, fisher_type, options
    ):
        super().__init__(layer, fisher_type, options)
        expected = self.kron_shape
        if (
            tuple(scalings.shape) != expected
            or u_gamma.shape != (expected[0],) * 2
            or u_omega.shape != (expected[1],) * 2
        ):
            raise FisherlabError(
                f"EKFAC basis of shapes {tuple(u_gamma.shape)} and {tuple(u_omega.shape)} does not "
                f"fit layer {layer.name!r} with [W | b] of shape {expected}"
            )
        self.u_gamma, self.u_omega, self.scalings = u_gamma, u_omega, scalings

    @property
    def basis(self) -> tuple[Tensor, Tensor]:
        """``(U_Γ, U_Ω)``, to pass as ``basis=`` to a later ``"ekfac"`` call."""
        return self.u_gamma, self.u_omega

    def _reference(self) -> Tensor:
        return self.scalings

    def _rotate(self, V: Tensor, weights: Tensor) -> Tensor:
        return self.u_gamma @ ((self.u_gamma.T @ V @ self.u_omega) * weights) @ self.u_omega.T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._rotate(V, self.scalings)

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._rotate(V, 1.0 / (self.scalings.clamp_min(0) + damping))

    def _eigvalsh(self) -> Tensor:
        return torch.sort(self.scalings.flatten()).values

    def _nbytes(self) -> int:
        return tensor_bytes(self.u_gamma, self.u_omega, self.scalings)
