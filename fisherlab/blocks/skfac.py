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
from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, LayerStats, Options, tensor_bytes
from fisherlab.blocks.kfac import DAMPING_MODES, kron_inner_with_rows
from fisherlab.blocks.kronecker import KroneckerEigenbasis, damped_factor_solve, factored_shifts
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
    r"""Holds the factor rows of every batch (memory checked before each batch is kept).

    The weights act on the rows: after ``S ← α S + β x_b`` the rows of batch ``k`` are held
    times ``√w_k``, so that ``Γ = Σ_k w_k Y_kᵀY_k / ν`` and ``Ω = Σ_k w_k X_kᵀX_k / Σ_k w_k S_k``
    (``S_k`` rows of ``X_k``); per batch (``normalise="batch"``) the rows are first divided by
    ``√ν_b`` and ``√S_b`` and both factors by the mass ``Σ_k w_k``. ``old_weight = 0`` drops the
    rows held. (The paper's optimizer averages the rows themselves instead; its step is
    :class:`fisherlab.optim.SKFAC`.)
    """

    state_names = ("X", "Y", "input_count", "mass", "held", "generator")

    def __init__(self, layer, options: SKFACOptions, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.held = 0
        #: ``Σ_k w_k S_k`` (or the mass per batch) and ``Σ_k w_k``; ``None`` while unweighted.
        self.input_count: float | None = None
        self.mass = 0.0

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        o = self.options
        A, G = self.layer.kron_inputs(stats.A), stats.G
        X, Y = skfac_rows(A, G, o.conv_reduction, o.spatial_samples, self.generator)
        n = A.shape[0]
        if old_weight == 0:
            self.parts, self.held, self.input_count, self.mass = [], 0, 0.0, 0.0
        weighted = self.per_batch or old_weight != 1 or new_weight != 1
        if weighted and self.input_count is None:  # the count of the unweighted rows so far
            self.input_count = float(sum(x.shape[0] for x, _ in self.parts))
        self._check_rows_memory(
            f"the SKFAC factor rows of layer {self.layer.name!r} ({{n}} samples)",
            self.held + n,
            (X.numel() + Y.numel()) * X.element_size() // n,
            0,
            X.element_size(),
            "use method 'kfac' (the same matrix from d×d factors), fewer spatial_samples, or a "
            "sample of the data; or raise max_bytes=",
        )
        if weighted:
            count = X.shape[0]
            if self.per_batch:
                X, Y, count = X / math.sqrt(count), Y / math.sqrt(stats.normaliser), 1
            if old_weight != 1:
                self.parts = [(x * math.sqrt(old_weight), y * math.sqrt(old_weight))
                              for x, y in self.parts]  # fmt: skip
            if new_weight != 1:
                X, Y = X * math.sqrt(new_weight), Y * math.sqrt(new_weight)
            self.input_count = old_weight * self.input_count + new_weight * count
        self.mass = old_weight * self.mass + new_weight
        self.parts.append((X, Y))
        self.held += n

    def _rows(self) -> tuple[Tensor, Tensor]:
        self._require(bool(self.parts))
        if len(self.parts) > 1:  # kept as one part from now on
            self.parts = [
                (torch.cat([x for x, _ in self.parts]), torch.cat([y for _, y in self.parts]))
            ]
        return self.parts[0]

    def block(self, normaliser: float | None = None) -> SKFACBlock:
        X, Y = self._rows()
        X, Y = self.context.all_gather(X, 0), self.context.all_gather(Y, 0)
        count = self.input_count
        if count is not None and not self.per_batch:
            count = self.context.all_reduce(torch.tensor([count], dtype=torch.float64)).item()
        return SKFACBlock(
            self.layer,
            X,
            Y,
            self.divisor(normaliser, self.mass),
            self.context.fisher_type,
            self.options,
            input_count=count,
        )

    def finish(self, normaliser: float, num_samples: int) -> SKFACBlock:
        block = self.block(normaliser)
        self.parts = []
        return block

    def _state(self) -> dict[str, Tensor | None]:
        X, Y = self._rows() if self.parts else (None, None)
        count = (
            None
            if self.input_count is None
            else torch.tensor(self.input_count, dtype=torch.float64)
        )
        return {
            "X": X,
            "Y": Y,
            "input_count": count,
            "mass": torch.tensor(self.mass, dtype=torch.float64),
            "held": torch.tensor(self.held),
            "generator": self.generator.get_state(),
        }

    def _load(self, state) -> None:
        self.parts = [(state["X"], state["Y"])] if state.get("X") is not None else []
        count = state.get("input_count")
        self.input_count = None if count is None else float(count)
        self.mass = 0.0 if state.get("mass") is None else float(state["mass"])
        self.held = 0 if state.get("held") is None else int(state["held"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


class SKFACBlock(CurvatureBlock):
    """``Γ ⊗ Ω`` from factor rows; solves by SMW without any ``d×d`` factorisation.

    ``Γ = YᵀY/ν`` and ``Ω = XᵀX/c`` (``c = input_count``, by default the rows of ``X``). The
    non-zero eigenpairs of each factor (:meth:`eigenbasis`, from the ``S×S`` Gram when it is
    smaller) go through the Kronecker-eigenbasis kernel with the complement's ``v/λ``.
    """

    method = "skfac"
    Options: ClassVar = SKFACOptions
    Builder = SKFACBuilder

    def __init__(
        self,
        layer,
        X: Tensor,
        Y: Tensor,
        normaliser: float,
        fisher_type,
        options=None,
        input_count: float | None = None,
    ):
        super().__init__(layer, fisher_type, options or {})
        self.X, self.Y, self.normaliser = X, Y, normaliser
        self.input_count = X.shape[0] if input_count is None else input_count

    def _reference(self) -> Tensor:
        return self.X

    @cached_property
    def _eigenbasis(self) -> KroneckerEigenbasis:
        (lg, ug), (lo, uo) = (
            low_rank_eigh(self.Y, self.normaliser),
            low_rank_eigh(self.X, self.input_count),
        )
        return KroneckerEigenbasis(ug, uo, lg, lo)

    def eigenbasis(self) -> KroneckerEigenbasis:
        """The non-zero eigenpairs of ``Γ`` and ``Ω`` (orthonormal ``[d, k]``, computed once)."""
        return self._eigenbasis

    @property
    def eig_gamma(self) -> tuple[Tensor, Tensor]:
        """Non-zero eigenpairs of ``Γ``."""
        return self._eigenbasis.eig_gamma

    @property
    def eig_omega(self) -> tuple[Tensor, Tensor]:
        """Non-zero eigenpairs of ``Ω``."""
        return self._eigenbasis.eig_omega

    def factors(self) -> tuple[Tensor, Tensor]:
        """The dense ``(Γ, Ω)`` (``d_out²`` and ``D²``)."""
        return self.Y.T @ self.Y / self.normaliser, self.X.T @ self.X / self.input_count

    def _matmat(self, V: Tensor) -> Tensor:
        gv = self.Y.T @ (self.Y @ V) / self.normaliser
        return (gv @ self.X.T) @ self.X / self.input_count

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        basis = self._eigenbasis
        if self.options.damping_mode == "factored":
            (lg, ug), (lo, uo) = basis.eig_gamma, basis.eig_omega
            shift_gamma, shift_omega = (
                s.to(lg.dtype)
                for s in factored_shifts(
                    (self.Y**2).sum() / (self.normaliser * self.Y.shape[1]),
                    (self.X**2).sum() / (self.input_count * self.X.shape[1]),
                    damping,
                )
            )
            left = damped_factor_solve(lg, ug, shift_gamma, V)
            return damped_factor_solve(lo, uo, shift_omega, left.mT).mT
        return basis.damped_solve(V, damping)

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return self._eigenbasis.eigvalsh()

    def _nbytes(self) -> int:
        held = [self.X, self.Y]
        if "_eigenbasis" in self.__dict__:
            b = self._eigenbasis
            held += [b.u_gamma, b.u_omega, b.values_gamma, b.values_omega]
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        return torch.kron(*self.factors())

    def norm_sq(self) -> float:
        gamma_sq = float((_gram_of_rows(self.Y) ** 2).sum()) / self.normaliser**2
        omega_sq = float((_gram_of_rows(self.X) ** 2).sum()) / self.input_count**2
        return gamma_sq * omega_sq

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return kron_inner_with_rows(self.layer.kron_inputs(A), G, *self.factors())
