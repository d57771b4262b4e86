r"""SKFAC: Kronecker factors held as their sample rows, inverted by Sherman–Morrison–Woodbury.

(Tang et al., CVPR 2021.) Each factor is a Gram of rows, ``Ω = XᵀX/n_x`` and ``Γ = YᵀY/ν``; when
a factor has fewer rows ``S`` than its dimension ``d``, its non-zero eigenpairs come from the
``S×S`` Gram (``XXᵀ = V Σ Vᵀ`` gives ``U = XᵀVΣ^{-1/2}``), so nothing of size ``d²`` is
factorised, and

.. math::
    (Γ⊗Ω + λI)^{-1}v = \frac{v}{λ} + (U_Γ⊗U_Ω)\Big[\frac{1}{γω^\top + λ} - \frac1λ\Big]
    (U_Γ⊗U_Ω)^\top v

(``damping_mode="eigen"``, equal to KFAC's damped inverse), or factored Tikhonov damping
``(Γ + √λ/π I)⁻¹ ⊗ (Ω + π√λ I)⁻¹`` with each factor inverted by SMW (``"factored"``).

Layers with ``T > 1`` positions (convolutions) reduce their rows first:
``conv_reduction="sum"`` (reduce-sum: position mean of ``Ã``, position sum of ``G``, the KFAC
``"reduce"`` factors) or ``"subsample"`` (``spatial_samples=s'`` positions per sample drawn with
``seed``, ``G`` rows rescaled by ``√(T/s')`` so that both factors are unbiased for the
``"expand"`` factors).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock, tensor_bytes
from fisherlab.blocks.factors import symmetric_eigh
from fisherlab.blocks.kfac import factored_pi
from fisherlab.conventions import FisherlabError

CONV_REDUCTIONS = ("sum", "subsample")


def skfac_rows(
    A: Tensor, G: Tensor, reduction: str, spatial_samples: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    """Factor rows ``X: [S_x, D]`` (``Ω = XᵀX/S_x``) and ``Y: [S_y, d_out]`` (``Γ = YᵀY/ν``)."""
    n, t = A.shape[:2]
    if t > 1 and reduction == "sum":
        A, G = A.mean(dim=1, keepdim=True), G.sum(dim=2, keepdim=True)
    elif t > 1:
        if spatial_samples is None or not 1 <= spatial_samples <= t:
            raise FisherlabError(
                f"conv_reduction='subsample' needs spatial_samples in [1, {t}] (the positions "
                f"per sample), got {spatial_samples!r}"
            )
        generator = torch.Generator().manual_seed(seed)
        picks = torch.stack(
            [torch.randperm(t, generator=generator)[:spatial_samples] for _ in range(n)]
        )
        picks = picks.to(A.device)
        A = torch.gather(A, 1, picks.unsqueeze(-1).expand(-1, -1, A.shape[-1]))
        index = picks.unsqueeze(0).unsqueeze(-1).expand(G.shape[0], -1, -1, G.shape[-1])
        G = torch.gather(G, 2, index) * math.sqrt(t / spatial_samples)
    return A.reshape(-1, A.shape[-1]), G.reshape(-1, G.shape[-1])


def low_rank_eigh(rows: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Non-zero eigenpairs of ``rowsᵀrows/scale``: by the ``S×S`` Gram when ``S < d``.

    Returns eigenvalues ``[k]`` and orthonormal eigenvectors ``[d, k]`` (``k ≤ min(S, d)``).
    """
    s, d = rows.shape
    if s >= d:
        return symmetric_eigh(rows.T @ rows / scale)
    sigma, v = symmetric_eigh(rows @ rows.T)
    keep = sigma > sigma.max() * s * torch.finfo(sigma.dtype).eps
    sigma, v = sigma[keep], v[:, keep]
    vectors = (rows.T @ v) / sigma.sqrt()
    return sigma / scale, vectors


class SKFACBlock(CurvatureBlock):
    """``Γ ⊗ Ω`` from factor rows; solves by SMW without any ``d×d`` factorisation."""

    method = "skfac"

    def __init__(self, layer, X: Tensor, Y: Tensor, normaliser: float, fisher_type, options):
        super().__init__(layer, fisher_type, options)
        self.X, self.Y, self.normaliser = X, Y, normaliser

    def _reference(self) -> Tensor:
        return self.X

    @cached_property
    def eig_gamma(self) -> tuple[Tensor, Tensor]:
        """Non-zero eigenpairs of ``Γ``."""
        return low_rank_eigh(self.Y, self.normaliser)

    @cached_property
    def eig_omega(self) -> tuple[Tensor, Tensor]:
        """Non-zero eigenpairs of ``Ω``."""
        return low_rank_eigh(self.X, self.X.shape[0])

    def _matmat(self, V: Tensor) -> Tensor:
        gv = self.Y.T @ (self.Y @ V) / self.normaliser
        return (gv @ self.X.T) @ self.X / self.X.shape[0]

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        (lg, ug), (lo, uo) = self.eig_gamma, self.eig_omega
        if self.options.get("damping_mode", "eigen") == "factored":
            pi = factored_pi(
                float((self.Y**2).sum()) / (self.normaliser * self.Y.shape[1]),
                float((self.X**2).sum()) / (self.X.shape[0] * self.X.shape[1]),
            )
            cg, co = math.sqrt(damping) / pi, pi * math.sqrt(damping)
            left = V / cg + ug @ ((ug.T @ V) * (1 / (lg + cg) - 1 / cg).unsqueeze(-1))
            return left / co + ((left @ uo) * (1 / (lo + co) - 1 / co)) @ uo.T
        scale = 1.0 / (torch.outer(lg, lo) + damping) - 1.0 / damping
        return V / damping + ug @ ((ug.T @ V @ uo) * scale) @ uo.T

    def _eigvalsh(self) -> Tensor:
        d_out, d = self.kron_shape
        lg, lo = self.eig_gamma[0], self.eig_omega[0]
        lg = torch.cat([lg.new_zeros(d_out - len(lg)), lg])
        lo = torch.cat([lo.new_zeros(d - len(lo)), lo])
        return torch.sort(torch.outer(lg, lo).flatten()).values

    def _nbytes(self) -> int:
        held = [self.X, self.Y]
        for name in ("eig_gamma", "eig_omega"):
            held += list(self.__dict__.get(name, ()))
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        gamma = self.Y.T @ self.Y / self.normaliser
        omega = self.X.T @ self.X / self.X.shape[0]
        return torch.kron(gamma, omega)
