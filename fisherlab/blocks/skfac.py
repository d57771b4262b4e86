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
``"expand"`` factors). The positions are drawn sample after sample from one generator, so a data
set split into batches draws what the concatenated batch draws.

**Over a data set** the block holds the factor rows of every sample (``N·s'`` rows of ``Ã`` and
``R·N·s'`` rows of ``G``): memory grows with ``N``; it is estimated before the rows are kept and
refused beyond ``max_bytes``. The dense factors (``kfac``) have the same matrix in ``d²``.
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
from fisherlab.blocks.kfac import DAMPING_MODES, factored_pi, kron_inner_with_rows
from fisherlab.conventions import FisherlabError, check_int, check_positive_int
from fisherlab.linalg import symmetric_eigh

CONV_REDUCTIONS = ("sum", "subsample")


def skfac_rows(
    A: Tensor,
    G: Tensor,
    reduction: str,
    spatial_samples: int | None,
    generator: torch.Generator | int,
) -> tuple[Tensor, Tensor]:
    """Factor rows ``X: [S_x, D]`` (``Ω = XᵀX/S_x``) and ``Y: [S_y, d_out]`` (``Γ = YᵀY/ν``).

    ``generator`` (or a seed for a fresh one) draws the subsampled positions, one sample after
    the other.
    """
    n, t = A.shape[:2]
    if t > 1 and reduction == "sum":
        A, G = A.mean(dim=1, keepdim=True), G.sum(dim=2, keepdim=True)
    elif t > 1:
        if spatial_samples is None or not 1 <= spatial_samples <= t:
            raise FisherlabError(
                f"conv_reduction='subsample' needs spatial_samples in [1, {t}] (the positions "
                f"per sample), got {spatial_samples!r}"
            )
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(generator)
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


def _gram_of_rows(rows: Tensor) -> Tensor:
    """``rowsᵀrows`` or ``rows rowsᵀ``, whichever is smaller (same non-zero spectrum)."""
    return rows.T @ rows if rows.shape[0] >= rows.shape[1] else rows @ rows.T


@dataclass(frozen=True)
class SKFACOptions(Options):
    """Options of ``skfac``.

    Attributes:
        conv_reduction: ``"sum"`` (reduce-sum) or ``"subsample"`` for layers with ``T > 1``.
        spatial_samples: Positions per sample for ``"subsample"``.
        seed: Seed of the subsampled positions.
        damping_mode: ``"eigen"`` (KFAC's damped inverse) or ``"factored"`` (as in the paper).
        scale_shift: The block of a scale-and-shift layer (BatchNorm, LayerNorm,
            GroupNorm): ``"diagonal"`` or ``"full"`` (:mod:`fisherlab.blocks.scale_shift`).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv_reduction": CONV_REDUCTIONS,
        "damping_mode": DAMPING_MODES,
        "scale_shift": SCALE_SHIFT_BLOCKS,
    }
    conv_reduction: str = "sum"
    spatial_samples: int | None = None
    seed: int = 0
    damping_mode: str = "eigen"
    scale_shift: str = "diagonal"

    def validate(self) -> None:
        if self.spatial_samples is not None:
            check_positive_int("spatial_samples", self.spatial_samples)
        check_int("seed", self.seed)


class SKFACBuilder(BlockBuilder):
    """Holds the factor rows of every sample (memory checked before each batch is kept)."""

    def __init__(self, layer, options: SKFACOptions, context):
        super().__init__(layer, options, context)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.held = 0

    def add(self, A: Tensor, G: Tensor, pass_index: int) -> None:
        o = self.options
        A = self.layer.kron_inputs(A)
        X, Y = skfac_rows(A, G, o.conv_reduction, o.spatial_samples, self.generator)
        n = A.shape[0]
        self._check_rows_memory(
            f"the SKFAC factor rows of layer {self.layer.name!r} ({{n}} samples)",
            self.held + n,
            (X.numel() + Y.numel()) * X.element_size() // n,
            0,
            X.element_size(),
            "use method 'kfac' (the same matrix from d×d factors), fewer spatial_samples, or a "
            "sample of the data; or raise max_bytes=",
        )
        self.parts.append((X, Y))
        self.held += n

    def finish(self, normaliser: float, num_samples: int) -> SKFACBlock:
        X = torch.cat([x for x, _ in self.parts]) if len(self.parts) > 1 else self.parts[0][0]
        Y = torch.cat([y for _, y in self.parts]) if len(self.parts) > 1 else self.parts[0][1]
        self.parts = []
        X, Y = self.context.all_gather(X, 0), self.context.all_gather(Y, 0)
        return SKFACBlock(self.layer, X, Y, normaliser, self.context.fisher_type, self.options)


class SKFACBlock(CurvatureBlock):
    """``Γ ⊗ Ω`` from factor rows; solves by SMW without any ``d×d`` factorisation."""

    method = "skfac"
    Options: ClassVar = SKFACOptions
    Builder = SKFACBuilder

    def __init__(self, layer, X: Tensor, Y: Tensor, normaliser: float, fisher_type, options=None):
        super().__init__(layer, fisher_type, options or {})
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

    def factors(self) -> tuple[Tensor, Tensor]:
        """The dense ``(Γ, Ω)`` (``d_out²`` and ``D²``)."""
        return self.Y.T @ self.Y / self.normaliser, self.X.T @ self.X / self.X.shape[0]

    def _matmat(self, V: Tensor) -> Tensor:
        gv = self.Y.T @ (self.Y @ V) / self.normaliser
        return (gv @ self.X.T) @ self.X / self.X.shape[0]

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        (lg, ug), (lo, uo) = self.eig_gamma, self.eig_omega
        if self.options.damping_mode == "factored":
            pi = factored_pi(
                (self.Y**2).sum() / (self.normaliser * self.Y.shape[1]),
                (self.X**2).sum() / (self.X.shape[0] * self.X.shape[1]),
            ).to(lg.dtype)
            cg, co = math.sqrt(damping) / pi, pi * math.sqrt(damping)
            left = V / cg + ug @ ((ug.T @ V) * (1 / (lg + cg) - 1 / cg).unsqueeze(-1))
            return left / co + ((left @ uo) * (1 / (lo + co) - 1 / co)) @ uo.T
        scale = 1.0 / (torch.outer(lg, lo) + damping) - 1.0 / damping
        return V / damping + ug @ ((ug.T @ V @ uo) * scale) @ uo.T

    def _eigvalsh(self, max_bytes: int) -> Tensor:
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
        return torch.kron(*self.factors())

    def norm_sq(self) -> float:
        gamma_sq = float((_gram_of_rows(self.Y) ** 2).sum()) / self.normaliser**2
        omega_sq = float((_gram_of_rows(self.X) ** 2).sum()) / self.X.shape[0] ** 2
        return gamma_sq * omega_sq

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return kron_inner_with_rows(self.layer.kron_inputs(A), G, *self.factors())
