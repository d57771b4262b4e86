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

**Two running averages** (the builder, ``normalise="batch"``): ``average="grams"`` weights the
batches' factors (it holds every batch's rows, times ``√w_k``); ``average="rows"`` averages the
rows themselves, ``X̄ ← αX̄ + βX_b/√S_b``, ``Ȳ ← αȲ + βY_b/√ν_b`` (the paper's moving average,
the optimizer :class:`fisherlab.optim.SKFAC`): one batch's rows are held whatever the number of
batches, and the batches averaged must give rows of one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.assemble import SCALE_SHIFT_BLOCKS
from fisherlab.blocks.base import (
    BlockBuilder,
    CurvatureBlock,
    LayerStats,
    Options,
    WeightedSum,
    tensor_bytes,
)
from fisherlab.blocks.kfac import DAMPING_MODES, kron_inner_with_rows
from fisherlab.blocks.kronecker import KroneckerEigenbasis, damped_factor_solve, factored_shifts
from fisherlab.conventions import FisherlabError, check_int, check_positive_int
from fisherlab.linalg import symmetric_eigh

CONV_REDUCTIONS = ("sum", "subsample")
#: What a running average of the builder averages (:class:`SKFACBuilder`).
AVERAGES = ("grams", "rows")


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
        average: What the builder's weights act on: ``"grams"`` (the factors; every batch's
            rows held) or ``"rows"`` (the rows themselves, the SKFAC optimizer's moving
            average; ``normalise="batch"`` only; :class:`SKFACBuilder`).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv_reduction": CONV_REDUCTIONS,
        "damping_mode": DAMPING_MODES,
        "scale_shift": SCALE_SHIFT_BLOCKS,
        "average": AVERAGES,
    }
    conv_reduction: str = "sum"
    spatial_samples: int | None = None
    seed: int = 0
    damping_mode: str = "eigen"
    scale_shift: str = "diagonal"
    average: str = "grams"

    def validate(self) -> None:
        if self.spatial_samples is not None:
            check_positive_int("spatial_samples", self.spatial_samples)
        check_int("seed", self.seed)


class SKFACBuilder(BlockBuilder):
    r"""The factor rows under weighted updates: every batch's (``"grams"``) or their average.

    **``average="grams"``** (default; holds every batch's rows, memory checked before each
    batch is kept). The weights act on the factors: after ``S ← α S + β x_b`` the rows of batch
    ``k`` are held times ``√w_k``, so that ``Γ = Σ_k w_k Y_kᵀY_k / ν`` and
    ``Ω = Σ_k w_k X_kᵀX_k / Σ_k w_k S_k`` (``S_k`` rows of ``X_k``); per batch
    (``normalise="batch"``) the rows are first divided by ``√ν_b`` and ``√S_b`` and both factors
    by the mass ``Σ_k w_k``. ``old_weight = 0`` drops the rows held.

    **``average="rows"``** (``normalise="batch"`` only; the paper's moving average, the
    optimizer :class:`fisherlab.optim.SKFAC`). The weights act on the rows themselves:

    .. math::
        \bar X ← α \bar X + β X_b/\sqrt{S_b}, \qquad \bar Y ← α \bar Y + β Y_b/\sqrt{ν_b},
        \qquad W ← α W + β,

    and the block is ``Γ = ȲᵀȲ/W²``, ``Ω = X̄ᵀX̄/W²`` (the factors of the average rows
    ``Ȳ/W``, ``X̄/W``). With weights ``(0, 1)`` then ``(decay, 1 − decay)``, ``W = 1`` and
    ``X̄ ← decay·X̄ + (1 − decay)·X_b/√S_b``: for batches of one size (one ``ν_b`` and ``S_b``)
    this is the moving average of the raw rows, ``Ω = X̄_rawᵀX̄_raw/S`` and
    ``Γ = Ȳ_rawᵀȲ_raw/ν``. One batch's rows are held (no memory check: the batch is the
    caller's); a batch whose rows have another shape than those held can only start a new
    average (``old_weight = 0``, see :meth:`rows_fit`), else it is refused. (Weights
    ``(decay, 1 − decay)`` from the first call give the bias-corrected average ``X̄/W``.)

    Subsampled positions are drawn from the builder's generator (seeded by the ``seed`` option,
    saved in the state); :meth:`seed_positions` reseeds it.
    """

    state_names = ("X", "Y", "input_count", "mass", "held", "generator", "average_rows")

    def __init__(self, layer, options: SKFACOptions, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.average_rows = options.average == "rows"
        if self.average_rows and not self.per_batch:
            raise FisherlabError(
                f"the skfac builder of layer {layer.name!r}: average='rows' averages the rows of "
                "equally sized batches (the SKFAC optimizer's moving average) and needs "
                "normalise='batch'; a data set's block is average='grams'"
            )
        self.generator = torch.Generator().manual_seed(options.seed)
        self.parts: list[tuple[Tensor, Tensor]] = []
        #: ``average="rows"``: ``X̄`` (with the mass ``W``) and ``Ȳ``.
        self.rows_x, self.rows_y = WeightedSum(), WeightedSum()
        self.held = 0
        #: ``Σ_k w_k S_k`` (or the mass per batch) and ``Σ_k w_k``; ``None`` while unweighted.
        self.input_count: float | None = None
        self.mass = 0.0

    def seed_positions(self, seed: int) -> None:
        """Draw the next subsampled positions from a generator seeded with ``seed``.

        (The SKFAC optimizer seeds each statistics step's draw with its step count, so that a
        run resumed from its state draws the same positions.)
        """
        self.generator.manual_seed(check_int("seed", seed))

    def _expected_rows(self, stats: LayerStats) -> tuple[int, int]:
        """The number of rows ``(S_x, S_y)`` a batch gives (nothing is drawn)."""
        n, t = stats.A.shape[:2]
        o = self.options
        per = o.spatial_samples if t > 1 and o.conv_reduction == "subsample" else 1
        return n * (per or 1), stats.G.shape[0] * n * (per or 1)

    def rows_fit(self, stats: LayerStats) -> bool:
        """``average="rows"``: whether a batch's rows can be averaged with those held.

        False while nothing is held, or when the batch gives another number of rows (another
        batch size) or width (a bias frozen or unfrozen): then only ``old_weight = 0`` (a new
        average) is accepted.
        """
        held = self.rows_x.value
        if held is None:
            return False
        s_x, s_y = self._expected_rows(stats)
        width = self.layer.d_in + self.layer.has_bias
        return tuple(held.shape) == (s_x, width) and self.rows_y.value.shape[0] == s_y

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        o = self.options
        A, G = self.layer.kron_inputs(stats.A), stats.G
        held = self.rows_x.value
        if self.average_rows and old_weight != 0 and held is not None and not self.rows_fit(stats):
            raise FisherlabError(
                f"the skfac builder of layer {self.layer.name!r} averages rows (average='rows'): "
                f"the batch gives {self._expected_rows(stats)[0]} rows of width {A.shape[-1]}, "
                f"the rows held are {tuple(held.shape)}; start a new average with old_weight=0"
            )
        X, Y = skfac_rows(A, G, o.conv_reduction, o.spatial_samples, self.generator)
        n = A.shape[0]
        if self.average_rows:
            X, Y = X / math.sqrt(X.shape[0]), Y / math.sqrt(float(stats.normaliser))
            self.rows_x.add(X, old_weight, new_weight)
            self.rows_y.add(Y, old_weight, new_weight)
            self.held = n
            return
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
        if self.average_rows:
            self._require(self.rows_x.value is not None)
            return self.rows_x.value, self.rows_y.value
        self._require(bool(self.parts))
        if len(self.parts) > 1:  # kept as one part from now on
            self.parts = [
                (torch.cat([x for x, _ in self.parts]), torch.cat([y for _, y in self.parts]))
            ]
        return self.parts[0]

    def block(self, normaliser: float | None = None) -> SKFACBlock:
        X, Y = self._rows()
        if self.average_rows:  # the factors of the average rows X̄/W, Ȳ/W
            square = self.divisor(normaliser, self.rows_x.mass) ** 2
            return SKFACBlock(
                self.layer, X, Y, square, self.context.fisher_type, self.options,
                input_count=square,
            )  # fmt: skip
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
        self.parts, self.rows_x, self.rows_y = [], WeightedSum(), WeightedSum()
        return block

    def _state(self) -> dict[str, Tensor | None]:
        held = self.rows_x.value is not None if self.average_rows else bool(self.parts)
        X, Y = self._rows() if held else (None, None)
        count = (
            None
            if self.input_count is None
            else torch.tensor(self.input_count, dtype=torch.float64)
        )
        mass = self.rows_x.mass if self.average_rows else self.mass
        return {
            "X": X,
            "Y": Y,
            "input_count": count,
            "mass": torch.tensor(mass, dtype=torch.float64),
            "held": torch.tensor(self.held),
            "generator": self.generator.get_state(),
            "average_rows": torch.tensor(self.average_rows),
        }

    def _load(self, state) -> None:
        saved_rows = state.get("average_rows")
        if saved_rows is not None and bool(saved_rows) != self.average_rows:
            modes = {True: "'rows'", False: "'grams'"}
            raise FisherlabError(
                f"the skfac state of layer {self.layer.name!r} was saved with average="
                f"{modes[bool(saved_rows)]}, this builder has average={modes[self.average_rows]}"
            )
        X, Y = state.get("X"), state.get("Y")
        width = self.layer.d_in + self.layer.has_bias
        if X is not None:
            self._check_shape("X", X, (X.shape[0], width))
        if Y is not None:
            self._check_shape("Y", Y, (Y.shape[0], self.layer.d_out))
        mass = 0.0 if state.get("mass") is None else float(state["mass"])
        if self.average_rows:
            self.rows_x, self.rows_y = WeightedSum(), WeightedSum()
            self.rows_x.value, self.rows_y.value = X, Y
            self.rows_x.mass = self.rows_y.mass = mass
        else:
            self.parts = [(X, Y)] if X is not None else []
            self.mass = mass
        count = state.get("input_count")
        self.input_count = None if count is None else float(count)
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
