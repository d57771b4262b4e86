r"""Woodbury: the exact Fisher block, never formed (TENGraD, Soori et al. 2021).

With ``F = (1/ν) JᵀJ`` and the Gram ``K = JJᵀ`` (``M×M``, ``M = R·N`` rows),

.. math::
    (F + λI)^{-1} v = \frac1λ \left(v - J^\top (νλ I + K)^{-1} J v\right).

``K`` comes from covariance factors, :math:`K_{(r,n),(s,m)} = \sum_{t,t'} (Ã_nÃ_m^\top)_{tt'}
(G_{r,n}G_{s,m}^\top)_{tt'}` — for ``T = 1`` simply ``(ÃÃᵀ) ∘ (GGᵀ)`` — or, when that is cheaper
for a convolution, from explicit per-sample gradients (``JJᵀ``); ``gram_route`` records which.
``Jv`` and ``Jᵀu`` are computed from ``Ã`` and ``G`` without forming ``J``.

``conv_gram="reduce_sum"`` replaces ``Ã`` by its position mean and ``G`` by its position sum
before everything else: the block is then an approximation (the one other libraries use),
exact only for ``T = 1``.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock, tensor_bytes
from fisherlab.blocks.factors import gradient_rows, sample_chunks, symmetric_eigh
from fisherlab.exact import symmetric_gram

GRAM_ROUTES = ("auto", "covariance", "gradients")
CONV_GRAMS = ("exact", "reduce_sum")


def gram_costs(A: Tensor, G: Tensor) -> dict[str, float]:
    """Multiply-adds of the two exact Gram routes for ``A: [N,T,D]``, ``G: [R,N,T,d_out]``."""
    r, n, t, d_out = G.shape
    d = A.shape[-1]
    m = r * n
    return {
        "covariance": n * n * t * t * d + m * m * t * t * (d_out + 1),
        "gradients": m * t * d * d_out + m * m * d * d_out,
    }


def choose_gram_route(A: Tensor, G: Tensor, route: str = "auto") -> str:
    """The cheaper exact route by counting (``"covariance"`` for ``T = 1`` always)."""
    if route != "auto":
        return route
    costs = gram_costs(A, G)
    return min(costs, key=costs.get)


def gram(A: Tensor, G: Tensor, route: str) -> Tensor:
    """``K = JJᵀ`` as ``[R·N, R·N]`` (rows ordered ``r·N + n``)."""
    r, n, t, d_out = G.shape
    if route == "gradients":
        rows = gradient_rows(A, G).reshape(r * n, -1)
        return rows @ rows.T
    if t == 1:
        aa = A[:, 0] @ A[:, 0].T  # [N, N]
        g = G[:, :, 0].reshape(r * n, d_out)
        return (g @ g.T) * aa.repeat(r, r)
    out = A.new_empty(r, n, r, n)
    for chunk in sample_chunks(n, r * r * n * t * t):
        aa = torch.einsum("ntd,mud->nmtu", A[chunk], A)  # [c, N, T, T]
        gg = torch.einsum("rntd,smud->rnsmtu", G[:, chunk], G)  # [R, c, R, N, T, T]
        out[:, chunk] = (gg * aa.unsqueeze(0).unsqueeze(2)).sum(dim=(-1, -2))
    return out.reshape(r * n, r * n)


class WoodburyBlock(CurvatureBlock):
    """The exact block ``(1/ν) JᵀJ`` held as ``Ã``, ``G`` and the ``M×M`` Gram."""

    method = "woodbury"

    def __init__(self, layer, A: Tensor, G: Tensor, normaliser: float, fisher_type, options):
        super().__init__(layer, fisher_type, options)
        self.A, self.G, self.normaliser = A, G, normaliser
        self.gram_route = choose_gram_route(A, G, options.get("gram_route", "auto"))

    def _reference(self) -> Tensor:
        return self.A

    @property
    def rows(self) -> int:
        """``M = R·N``, the number of rows of ``J``."""
        return self.G.shape[0] * self.G.shape[1]

    @cached_property
    def gram(self) -> Tensor:
        """``K = JJᵀ``, ``[M, M]``."""
        return gram(self.A, self.G, self.gram_route)

    @cached_property
    def gram_eig(self) -> tuple[Tensor, Tensor]:
        """Eigen-decomposition of ``K`` (float64 for float32 statistics)."""
        return symmetric_eigh(self.gram)

    def jv(self, V: Tensor) -> Tensor:
        """``J v`` for ``V: [k, d_out, D]`` as ``[k, M]``, without forming ``J``."""
        va = torch.einsum("kde,nte->kntd", V, self.A)
        return torch.einsum("rntd,kntd->krn", self.G, va).reshape(V.shape[0], -1)

    def jtu(self, U: Tensor) -> Tensor:
        """``Jᵀ u`` for ``U: [k, M]`` as ``[k, d_out, D]``, without forming ``J``."""
        r, n = self.G.shape[:2]
        gu = torch.einsum("krn,rntd->kntd", U.reshape(-1, r, n), self.G)
        return torch.einsum("kntd,nte->kde", gu, self.A)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.jtu(self.jv(V)) / self.normaliser

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        kappa, q = self.gram_eig
        u = self.jv(V)  # [k, M]
        w = ((u @ q) / (self.normaliser * damping + kappa)) @ q.T
        return (V - self.jtu(w)) / damping

    def _eigvalsh(self) -> Tensor:
        if "gram_eig" in self.__dict__:
            values = self.gram_eig[0]
        elif self.size < self.rows:  # the P×P block is the smaller matrix
            return torch.linalg.eigvalsh(self._dense_kron()).clamp_min(0)
        else:
            values = torch.linalg.eigvalsh(self.gram.double()).clamp_min(0).to(self.gram.dtype)
        values = values / self.normaliser
        if len(values) >= self.size:
            return values[-self.size :]
        return torch.cat([values.new_zeros(self.size - len(values)), values])

    def _nbytes(self) -> int:
        held = [self.A, self.G, self.__dict__.get("gram")]
        held += list(self.__dict__.get("gram_eig", ()))
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        rows = gradient_rows(self.A, self.G).reshape(self.rows, -1)
        return symmetric_gram(rows) / self.normaliser

    # ---------------------------------------------------- the natural gradient of the batch
    def coefficients(self, damping: float) -> Tensor:
        """``w = (νλI + K)⁻¹ 1`` (Cholesky, float64 for float32 statistics), ``[M]``.

        For the empirical Fisher the batch gradient is ``g = Jᵀ1/ν``, so ``Jg = K1/ν`` and
        ``(F + λI)⁻¹ g = Jᵀ w``: the natural gradient is a weighted sum of per-sample gradients
        (TENGraD, FNGD) and needs no ``Jv``.
        """
        k = self.gram
        work = k.double() if k.dtype != torch.float64 else k
        system = work + self.normaliser * damping * torch.eye(
            len(work), dtype=work.dtype, device=work.device
        )
        chol, info = torch.linalg.cholesky_ex(system)
        ones = torch.ones(len(work), 1, dtype=work.dtype, device=work.device)
        if int(info) != 0:  # pragma: no cover - λ > 0 makes the system positive definite
            return torch.linalg.solve(system, ones).squeeze(1).to(k.dtype)
        return torch.cholesky_solve(ones, chol).squeeze(1).to(k.dtype)

    def weighted_gradient(self, weights: Tensor) -> Tensor:
        """``Jᵀ w`` in parameter order, ``[P]``, for weights ``[M]`` over the rows."""
        return self._to_param(self.jtu(weights.unsqueeze(0)), vector=True)

    def natural_gradient(self, damping: float) -> Tensor:
        """``(F + λI)⁻¹ g = Jᵀ(νλI + K)⁻¹1`` for the batch gradient ``g = Jᵀ1/ν`` (empirical)."""
        return self.weighted_gradient(self.coefficients(damping))
