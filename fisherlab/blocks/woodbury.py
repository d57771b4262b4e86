r"""Woodbury: the exact Fisher block, never formed (TENGraD, Soori et al. 2021).

With ``F = (1/ν) JᵀJ`` and the Gram ``K = JJᵀ`` (``M×M``, ``M = R·N`` rows),

.. math::
    (F + λI)^{-1} v = \frac1λ \left(v - J^\top (νλ I + K)^{-1} J v\right).

``K`` comes from covariance factors, :math:`K_{(r,n),(s,m)} = \sum_{t,t'} (Ã_nÃ_m^\top)_{tt'}
(G_{r,n}G_{s,m}^\top)_{tt'}` — for ``T = 1`` simply ``(ÃÃᵀ) ∘ (GGᵀ)`` — or, when that is cheaper
for a convolution, from explicit per-sample gradients (``JJᵀ``); ``gram_route`` records which.
``Jv`` and ``Jᵀu`` are computed from ``Ã`` and ``G`` without forming ``J``.

**Accuracy.** The subtraction ``v − Jᵀw`` cancels when ``‖F‖ ≫ λ``: one Woodbury solve has a
relative error of about ``ε·‖F‖/λ``. While ``M < P``, ``F`` is singular and that is
``ε·cond(F + λI)``, the best any solver achieves. With ``M ≥ P``, ``F`` may be well conditioned,
so the solve is refined iteratively in float64 with the block's own product
(``x ← x + S(v − (F + λI)x)``), which brings the error down to ``ε·cond(F + λI)``.

**Over a data set** the block holds ``Ã`` and ``G`` of every sample and the ``M×M`` Gram: memory
grows with ``N`` (quadratically through the Gram). The memory is estimated before anything is
allocated and refused beyond ``max_bytes``, with the size and alternatives (``exact`` when ``P``
is small, the empirical Fisher, a sample of the data).

``conv_gram="reduce_sum"`` replaces ``Ã`` by its position mean and ``G`` by its position sum
before everything else: the block is then an approximation (the one other libraries use),
exact only for ``T = 1``.

**Layers without Kronecker structure** (scale-and-shift: BatchNorm, LayerNorm, GroupNorm) have
no covariance factors: their Gram, ``Jv`` and ``Jᵀu`` go through the adapter's gradient rows
(the ``"gradients"`` route, always). Kronecker layers whose capture is compact (an Embedding's
token indices) are expanded to ``Ã`` (:meth:`fisherlab.layers.Layer.kron_inputs`) when added.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, LayerStats, Options, tensor_bytes
from fisherlab.blocks.factors import gradient_rows, reduce_positions
from fisherlab.conventions import check_damping, check_memory
from fisherlab.layers import Layer
from fisherlab.linalg import sample_chunks, symmetric_eigh, symmetric_gram

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


RowsFn = Callable[[Tensor, Tensor], Tensor]


def cross_gram(
    A1: Tensor,
    G1: Tensor,
    A2: Tensor,
    G2: Tensor,
    route: str = "auto",
    rows_of: RowsFn = gradient_rows,
) -> Tensor:
    """``J₁J₂ᵀ`` as ``[R₁·N₁, R₂·N₂]`` for the rows of two captures (rows ordered ``r·N + n``).

    ``(J₁J₂ᵀ)_{(r,n),(s,m)} = Σ_{t,t'} (Ã_n Ã_mᵀ)_{tt'} (G_{rn} G_{sm}ᵀ)_{tt'}``; the positions of
    the two captures may differ in number (e.g. a reduced capture against a full one).
    ``rows_of`` gives the gradient rows of the ``"gradients"`` route (a layer adapter's for a
    layer without Kronecker structure).
    """
    r1, n1, t1, d_out = G1.shape
    r2, n2, t2, _ = G2.shape
    if route == "auto":
        route = choose_gram_route(A1, G1) if t1 == t2 else "covariance"
    if route == "gradients":
        rows1 = rows_of(A1, G1).reshape(r1 * n1, -1)
        rows2 = rows_of(A2, G2).reshape(r2 * n2, -1)
        return rows1 @ rows2.T
    if t1 == 1 and t2 == 1:
        aa = A1[:, 0] @ A2[:, 0].T  # [N1, N2]
        gg = G1[:, :, 0].reshape(r1 * n1, d_out) @ G2[:, :, 0].reshape(r2 * n2, d_out).T
        return gg * aa.repeat(r1, r2)
    out = A1.new_empty(r1, n1, r2, n2)
    for chunk in sample_chunks(n1, r1 * r2 * n2 * t1 * t2):
        aa = torch.einsum("ntd,mud->nmtu", A1[chunk], A2)  # [c, N2, T1, T2]
        gg = torch.einsum("rntd,smud->rnsmtu", G1[:, chunk], G2)  # [R1, c, R2, N2, T1, T2]
        out[:, chunk] = (gg * aa.unsqueeze(0).unsqueeze(2)).sum(dim=(-1, -2))
    return out.reshape(r1 * n1, r2 * n2)


def gram(A: Tensor, G: Tensor, route: str, rows_of: RowsFn = gradient_rows) -> Tensor:
    """``K = JJᵀ`` as ``[R·N, R·N]`` (rows ordered ``r·N + n``)."""
    if route == "gradients":
        rows = rows_of(A, G).reshape(G.shape[0] * G.shape[1], -1)
        return rows @ rows.T
    return cross_gram(A, G, A, G, route)


def layer_rows_of(layer: Layer) -> RowsFn:
    """The gradient rows of a layer's statistics (``Ã`` for Kronecker layers, else as captured)."""
    return gradient_rows if layer.kronecker else layer.gradient_rows


def layer_statistics(layer: Layer, A: Tensor) -> Tensor:
    """A capture's ``A`` as the Gram routes read it: ``Ã`` for a Kronecker layer."""
    return layer.kron_inputs(A) if layer.kronecker else A


def layer_route(layer: Layer, A: Tensor, G: Tensor, route: str = "auto") -> str:
    """The Gram route of a layer: ``"gradients"`` without Kronecker structure, else by count."""
    return choose_gram_route(A, G, route) if layer.kronecker else "gradients"


def layer_gram(layer: Layer, A: Tensor, G: Tensor) -> Tensor:
    """``K = JJᵀ`` of one capture of a layer (any layer type), by the cheaper route."""
    A = layer_statistics(layer, A)
    return gram(A, G, layer_route(layer, A, G), layer_rows_of(layer))


def layer_cross_gram(layer: Layer, A1: Tensor, G1: Tensor, A2: Tensor, G2: Tensor) -> Tensor:
    """``J₁J₂ᵀ`` of two captures of a layer (any layer type)."""
    A1, A2 = layer_statistics(layer, A1), layer_statistics(layer, A2)
    route = "auto" if layer.kronecker else "gradients"
    return cross_gram(A1, G1, A2, G2, route, layer_rows_of(layer))


@dataclass(frozen=True)
class WoodburyOptions(Options):
    """Options of ``woodbury``.

    Attributes:
        conv_gram: ``"exact"`` or ``"reduce_sum"`` (an approximation for ``T > 1``).
        gram_route: ``"auto"`` (by counting), ``"covariance"`` or ``"gradients"``.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv_gram": CONV_GRAMS,
        "gram_route": GRAM_ROUTES,
    }
    conv_gram: str = "exact"
    gram_route: str = "auto"


_HINT = (
    "use method 'exact' (a dense P×P block, memory independent of N) or 'kfac'/'ekfac', "
    "fisher_type='empirical' (one row per sample), conv_gram='reduce_sum', or a sample of "
    "the data; or raise max_bytes="
)


class WoodburyBuilder(BlockBuilder):
    """Holds the rows of every batch (memory checked before each batch is kept).

    The weights act on the rows: batch ``k``'s ``G`` is held times ``√w_k`` (times ``1/√ν_b``
    per batch), so that the block is ``Σ_k w_k J_kᵀJ_k / ν`` (or over the mass ``Σ_k w_k``);
    ``old_weight = 0`` drops the rows held. The block's natural-gradient shortcut
    (:meth:`WoodburyBlock.coefficients`, ``g = Jᵀ1/ν``) needs the rows as captured: for it,
    keep ``normalise="data"``, add one batch with ``(0, 1)`` and take ``block(ν_b)``.
    """

    state_names = ("A", "G", "held", "positions", "mass")

    def __init__(self, layer, options: WoodburyOptions, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.held = 0
        self.positions = 1
        self.mass = 0.0

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        A, G = layer_statistics(self.layer, stats.A), stats.G
        self.positions = A.shape[1]
        if old_weight == 0:
            self.parts, self.held = [], 0
        if self.options.conv_gram == "reduce_sum":
            A, G = reduce_positions(A, G)
        self._check_rows_memory(
            f"the Woodbury Gram of layer {self.layer.name!r} ({{m}}×{{m}}) and the rows of {{n}} "
            "samples",
            self.held + A.shape[0],
            (A[0].numel() + G[:, 0].numel()) * G.element_size(),
            G.shape[0],
            G.element_size(),
            _HINT,
        )
        if old_weight not in (0, 1):
            self.parts = [(a, g * math.sqrt(old_weight)) for a, g in self.parts]
        weight = new_weight * self.batch_scale(stats)
        if weight != 1:
            G = G * math.sqrt(weight)
        self.mass = old_weight * self.mass + new_weight
        self.parts.append((A, G))
        self.held += A.shape[0]

    def _rows(self) -> tuple[Tensor, Tensor]:
        self._require(bool(self.parts))
        if len(self.parts) > 1:  # kept as one part from now on
            A = torch.cat([a for a, _ in self.parts], dim=0)
            G = torch.cat([g for _, g in self.parts], dim=1)
            self.parts = [(A, G)]
        return self.parts[0]

    def block(self, normaliser: float | None = None) -> WoodburyBlock:
        A, G = self._rows()
        A, G = self.context.all_gather(A, 0), self.context.all_gather(G, 1)
        rows = G.shape[0] * G.shape[1]
        route = layer_route(self.layer, A, G, self.options.gram_route)
        extra = rows * self.layer.num_params if route == "gradients" else 0
        check_memory(
            f"the Woodbury Gram of layer {self.layer.name!r} ({rows}×{rows}"
            + (f", and {rows}×{self.layer.num_params} gradient rows" if extra else "")
            + ")",
            (rows * rows * 2 + extra) * A.element_size(),
            self.context.max_bytes,
            _HINT,
        )
        options = WoodburyOptions(self.options.conv_gram, route)
        normaliser = self.divisor(normaliser, self.mass)
        block = WoodburyBlock(self.layer, A, G, normaliser, self.context.fisher_type, options)
        block.source_positions = self.positions
        return block

    def finish(self, normaliser: float, num_samples: int) -> WoodburyBlock:
        block = self.block(normaliser)
        self.parts = []
        return block

    def _state(self) -> dict[str, Tensor | None]:
        A, G = self._rows() if self.parts else (None, None)
        return {
            "A": A,
            "G": G,
            "held": torch.tensor(self.held),
            "positions": torch.tensor(self.positions),
            "mass": torch.tensor(self.mass, dtype=torch.float64),
        }

    def _load(self, state) -> None:
        self.parts = [(state["A"], state["G"])] if state.get("A") is not None else []
        self.held = 0 if state.get("held") is None else int(state["held"])
        self.positions = 1 if state.get("positions") is None else int(state["positions"])
        self.mass = 0.0 if state.get("mass") is None else float(state["mass"])


class WoodburyBlock(CurvatureBlock):
    """The exact block ``(1/ν) JᵀJ`` held as ``Ã``, ``G`` and the ``M×M`` Gram."""

    method = "woodbury"
    Options: ClassVar = WoodburyOptions
    Builder = WoodburyBuilder

    #: Refinement steps at most (each squares the relative error while it is below one).
    refinement_steps: int = 3
    #: Positions per sample of the captured rows before ``conv_gram="reduce_sum"`` reduced them.
    source_positions: int = 1

    def __init__(self, layer, A: Tensor, G: Tensor, normaliser: float, fisher_type, options=None):
        super().__init__(layer, fisher_type, options or {})
        self.A, self.G, self.normaliser = A, G, normaliser
        self.gram_route = layer_route(layer, A, G, self.options.gram_route)
        self._rows_of = layer_rows_of(layer)

    def _reference(self) -> Tensor:
        return self.A

    @property
    def is_exact(self) -> bool:
        return self.options.conv_gram == "exact" or self.source_positions == 1

    @property
    def rows(self) -> int:
        """``M = R·N``, the number of rows of ``J``."""
        return self.G.shape[0] * self.G.shape[1]

    @cached_property
    def gram(self) -> Tensor:
        """``K = JJᵀ``, ``[M, M]``."""
        return gram(self.A, self.G, self.gram_route, self._rows_of)

    @cached_property
    def gram_eig(self) -> tuple[Tensor, Tensor]:
        """Eigen-decomposition of ``K`` (computed in float64 for float32 statistics)."""
        return symmetric_eigh(self.gram)

    @cached_property
    def _precise(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``Ã``, ``G`` and the Gram's eigen-decomposition in float64 (for refinement)."""
        if self.A.dtype == torch.float64:
            return (self.A, self.G, *self.gram_eig)
        A, G = self.A.double(), self.G.double()
        return (A, G, *symmetric_eigh(gram(A, G, self.gram_route, self._rows_of)))

    def _jv(self, A: Tensor, G: Tensor, V: Tensor) -> Tensor:
        if not self.layer.kronecker:  # through the adapter's rows [R, N, d_out, D]
            return torch.einsum("rnde,kde->krn", self._rows_of(A, G), V).reshape(V.shape[0], -1)
        va = torch.einsum("kde,nte->kntd", V, A)
        return torch.einsum("rntd,kntd->krn", G, va).reshape(V.shape[0], -1)

    def _jtu(self, A: Tensor, G: Tensor, U: Tensor) -> Tensor:
        r, n = G.shape[:2]
        if not self.layer.kronecker:
            return torch.einsum("krn,rnde->kde", U.reshape(-1, r, n), self._rows_of(A, G))
        gu = torch.einsum("krn,rntd->kntd", U.reshape(-1, r, n), G)
        return torch.einsum("kntd,nte->kde", gu, A)

    def jv(self, V: Tensor) -> Tensor:
        """``J v`` for ``V: [k, d_out, D]`` as ``[k, M]``, without forming ``J``."""
        return self._jv(self.A, self.G, V)

    def jtu(self, U: Tensor) -> Tensor:
        """``Jᵀ u`` for ``U: [k, M]`` as ``[k, d_out, D]``, without forming ``J``."""
        return self._jtu(self.A, self.G, U)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.jtu(self.jv(V)) / self.normaliser

    def _woodbury(self, A, G, kappa, q, V: Tensor, damping: float) -> Tensor:
        u = self._jv(A, G, V)  # [k, M]
        w = ((u @ q) / (self.normaliser * damping + kappa)) @ q.T
        return (V - self._jtu(A, G, w)) / damping

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        if self.rows < self.size:  # F singular: one solve is within ε·cond(F + λI) already
            kappa, q = self.gram_eig
            return self._woodbury(self.A, self.G, kappa, q, V, damping)
        A, G, kappa, q = self._precise
        target = V.to(A.dtype)
        x = self._woodbury(A, G, kappa, q, target, damping)
        previous = None
        for _ in range(self.refinement_steps):
            residual = target - (self._jtu(A, G, self._jv(A, G, x)) / self.normaliser + damping * x)
            size = float(residual.abs().max())
            if size == 0 or (previous is not None and size > previous / 2):
                break
            x = x + self._woodbury(A, G, kappa, q, residual, damping)
            previous = size
        return x.to(V.dtype)

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        itemsize = self.A.element_size()
        if "gram_eig" in self.__dict__:
            values = self.gram_eig[0]
        elif self.size < self.rows:  # the P×P block is the smaller matrix
            check_memory(
                f"the eigenvalues of the woodbury block of layer {self.layer.name!r} "
                f"(a dense {self.size}×{self.size} matrix, twice)",
                2 * self.size**2 * itemsize,
                max_bytes,
                "raise max_bytes=",
            )
            dense = self._dense_kron()
            work = dense.double() if dense.dtype == torch.float32 else dense
            return torch.linalg.eigvalsh(work).clamp_min(0).to(dense.dtype)
        else:
            check_memory(
                f"the eigenvalues of the woodbury block of layer {self.layer.name!r} "
                f"(its {self.rows}×{self.rows} Gram, twice)",
                2 * self.rows**2 * itemsize,
                max_bytes,
                "raise max_bytes=",
            )
            values = torch.linalg.eigvalsh(self.gram.double()).clamp_min(0).to(self.gram.dtype)
        values = values / self.normaliser
        if len(values) >= self.size:
            return values[-self.size :]
        return torch.cat([values.new_zeros(self.size - len(values)), values])

    def _nbytes(self) -> int:
        held = [self.A, self.G, self.__dict__.get("gram")]
        held += list(self.__dict__.get("gram_eig", ()))
        if "_cholesky" in self.__dict__:
            held.append(self.__dict__["_cholesky"][1])
        if "_precise" in self.__dict__ and self.A.dtype != torch.float64:
            held += list(self.__dict__["_precise"])
        return tensor_bytes(*held)

    def _dense_kron(self) -> Tensor:
        rows = self._rows_of(self.A, self.G).reshape(self.rows, -1)
        return symmetric_gram(rows) / self.normaliser

    def norm_sq(self) -> float:
        return float((self.gram**2).sum()) / self.normaliser**2

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        cross = cross_gram(
            layer_statistics(self.layer, A), G, self.A, self.G, self.gram_route, self._rows_of
        )
        return float((cross**2).sum()) / self.normaliser

    # ---------------------------------------------------- the natural gradient of the batch
    def _gram_factor(self, damping: float) -> Tensor:
        """Cholesky factor of ``νλI + K`` (float64 for float32 statistics), kept per ``λ``."""
        cached = self.__dict__.get("_cholesky")
        if cached is not None and cached[0] == damping:
            return cached[1]
        system = self.gram.to(torch.float64, copy=True)  # shifted in place: no identity
        system.diagonal().add_(self.normaliser * damping)
        chol, info = torch.linalg.cholesky_ex(system)
        # λ > 0 makes it positive definite unless the Gram overflowed: then NaN, which every
        # solve carries into its result (no host synchronisation to test ``info``)
        chol = torch.where(info == 0, chol, torch.nan)
        self._cholesky = (damping, chol)
        return chol

    def _gram_solve(self, rhs: Tensor, damping: float) -> Tensor:
        """``(νλI + K)⁻¹ rhs`` for ``rhs: [M, k]``, in the statistics' dtype."""
        chol = self._gram_factor(damping)
        return torch.cholesky_solve(rhs.to(chol.dtype), chol).to(self.gram.dtype)

    def coefficients(self, damping: float) -> Tensor:
        """``w = (νλI + K)⁻¹ 1`` (Cholesky, float64 for float32 statistics), ``[M]``.

        For the empirical Fisher the batch gradient is ``g = Jᵀ1/ν``, so ``Jg = K1/ν`` and
        ``(F + λI)⁻¹ g = Jᵀ w``: the natural gradient is a weighted sum of per-sample gradients
        (TENGraD, FNGD) and needs no ``Jv``.
        """
        ones = torch.ones(self.rows, 1, dtype=self.gram.dtype, device=self.gram.device)
        return self._gram_solve(ones, damping).squeeze(1)

    def solve_once(self, v: Tensor, damping: float) -> Tensor:
        """``(F̂ + λI)⁻¹ v`` by one Woodbury solve with a Cholesky factor, no refinement.

        ``(v − Jᵀ(νλI + K)⁻¹Jv)/λ``: one ``M×M`` Cholesky (shared with :meth:`coefficients`
        at the same ``λ``) instead of :meth:`solve`'s eigen-decomposition and refinement; the
        relative error is about ``ε·‖F̂‖/λ`` (the optimizers' path).
        """
        damping = check_damping(damping)
        kron, vector = self._to_kron(v)
        w = self._gram_solve(self.jv(kron).T, damping).T
        step = self.jtu(w).sub_(kron).div_(-damping)  # (v − Jᵀw)/λ, in place
        return self._to_param(step, vector)

    def weighted_gradient(self, weights: Tensor) -> Tensor:
        """``Jᵀ w`` in parameter order: ``[P]`` for weights ``[M]``, ``[P, k]`` for ``[k, M]``."""
        vector = weights.ndim == 1
        return self._to_param(self.jtu(weights.reshape(-1, self.rows)), vector=vector)

    def natural_gradient(self, damping: float) -> Tensor:
        """``(F + λI)⁻¹ g = Jᵀ(νλI + K)⁻¹1`` for the batch gradient ``g = Jᵀ1/ν`` (empirical)."""
        return self.weighted_gradient(self.coefficients(damping))
