r"""The exact dense block ``F = (1/ν) JᵀJ``, from the captured rows ``j = vec_r(G_nᵀÃ_n)``.

Over a data set the sum ``Σ j jᵀ`` is accumulated batch by batch (memory ``P²``, independent of
``N``); a running average averages the batches' own ``(1/ν_b) Σ j jᵀ``. Two routes give the
same sum, chosen by counting:

* rows: per-sample gradient rows ``[R·N_b, P]`` and their Gram, ``R·N_b·P²/2`` multiply-adds;
* Kronecker sum, for one position per sample (``T = 1``): ``Σ_{n,r} j jᵀ = Σ_n Γ_n ⊗ ã_nã_nᵀ``
  with ``Γ_n = Σ_r g_{rn} g_{rn}ᵀ``, ``N_b·P²`` multiply-adds whatever ``R`` (the true Fisher has
  ``R = C`` rows per sample); for Kronecker layers whose capture holds ``Ã`` itself.

The rows are the layer adapter's (:meth:`fisherlab.layers.Layer.gradient_rows`): any layer type,
Kronecker-structured or not (scale-and-shift), or stored compactly (an Embedding's indices).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, LayerStats, tensor_bytes
from fisherlab.blocks.factors import gradient_rows
from fisherlab.conventions import check_memory
from fisherlab.layers import Layer
from fisherlab.linalg import (
    add_to_diagonal,
    gram_accumulate,
    mirror_upper,
    sample_chunks,
    squared_norm,
    symmetric_eigh,
)


class DenseSum:
    """``Σ_{n,r} j jᵀ`` accumulated in place over batches, by the cheaper route per batch.

    The Kronecker-sum route accumulates ``Σ_n vec(Γ_n) vec(ã_nã_nᵀ)ᵀ`` as ``[d_out², D²]``; the
    rows route the upper block triangle of ``[P, P]``; :meth:`result` combines them once.
    :meth:`scale_` and the ``weight`` of :meth:`add` give weighted sums ``S ← α S + β Σ j jᵀ``.
    ``layer`` gives the rows (``None``: ``A`` is ``Ã`` of a Kronecker layer).
    """

    def __init__(self, d_out: int, d: int, like: Tensor, layer: Layer | None = None):
        self.d_out, self.d, self.like, self.layer = d_out, d, like, layer
        self.kron: Tensor | None = None
        self.rows: Tensor | None = None

    @property
    def empty(self) -> bool:
        """Whether nothing is held."""
        return self.kron is None and self.rows is None

    def scale_(self, factor: float) -> None:
        """``S ← factor·S`` (``0`` releases the accumulators)."""
        if factor == 0:
            self.kron = self.rows = None
        elif factor != 1:
            for acc in (self.kron, self.rows):
                if acc is not None:
                    acc.mul_(factor)

    def add(self, A: Tensor, G: Tensor, weight: float = 1.0) -> None:
        """Add ``weight`` times a batch's ``Σ j jᵀ`` (``A [N, T, D]``, ``G [R, N, T, d_out]``)."""
        r, n, t, _ = G.shape
        d_out, d = self.d_out, self.d
        layer = self.layer
        kron_route = layer is None or (layer.kronecker and A.is_floating_point())
        if t == 1 and r > 2 and kron_route:
            if self.kron is None:
                self.kron = G.new_zeros(d_out * d_out, d * d)
            for chunk in sample_chunks(n, d_out * d_out + d * d):
                g = G[:, chunk, 0]  # [R, c, d_out]
                gg = torch.einsum("rni,rnj->nij", g, g).reshape(-1, d_out * d_out)
                a = A[chunk, 0] if layer is None else layer.kron_inputs(A[chunk])[:, 0]
                aa = (a.unsqueeze(2) * a.unsqueeze(1)).reshape(-1, d * d)
                if weight == 1:
                    self.kron.addmm_(gg.T, aa)
                else:
                    self.kron.addmm_(gg.T, aa, alpha=weight)
            return
        p = d_out * d
        if self.rows is None:
            self.rows = G.new_zeros(p, p)
        rows_of = gradient_rows if layer is None else layer.gradient_rows
        for chunk in sample_chunks(n, r * p):
            rows = rows_of(A[chunk], G[:, chunk]).reshape(-1, p)
            gram_accumulate(rows, self.rows, alpha=weight)

    def result(self, keep: bool = False) -> Tensor:
        """``Σ j jᵀ`` in Kronecker order, ``[P, P]``.

        The accumulators are consumed (one reordering copy at most), unless ``keep``: then the
        result is a new tensor and more batches may be added after.
        """
        d_out, d = self.d_out, self.d
        p = d_out * d
        kron, rows = self.kron, self.rows
        if not keep:
            self.kron, self.rows = None, None
        out = None
        if kron is not None:  # one reordering copy; the accumulator is released with it
            out = kron.reshape(d_out, d_out, d, d).permute(0, 2, 1, 3).reshape(p, p)
            del kron
        if rows is not None:
            rows = mirror_upper(rows)  # the upper triangle, which accumulates, is unchanged
            if out is None:
                out = rows.clone() if keep else rows
            else:
                out.add_(rows)
        return out if out is not None else self.like.new_zeros(p, p)


def dense_sum(A: Tensor, G: Tensor, layer: Layer | None = None) -> Tensor:
    """``Σ_{n,r} j jᵀ`` in Kronecker order, ``[P, P]``, by the cheaper route (module docstring).

    ``layer`` gives the rows (``None``: ``A`` is ``Ã`` of a Kronecker layer).
    """
    if layer is None:
        acc = DenseSum(G.shape[-1], A.shape[-1], A)
    else:
        acc = DenseSum(layer.d_out, layer.d_in + layer.has_bias, G, layer)
    acc.add(A, G)
    return acc.result()


class ExactBuilder(BlockBuilder):
    """Weighted sums ``Σ j jᵀ`` (checked against the budget before they are allocated)."""

    state_names = ("kron", "rows", "mass")

    def __init__(self, layer, options, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.sum: DenseSum | None = None
        self.mass = 0.0

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        A, G = stats.A, stats.G
        if self.sum is None:
            d = self.layer.d_in + self.layer.has_bias
            self.sum = DenseSum(self.layer.d_out, d, G, self.layer)
        if self.sum.empty:
            size = self.layer.num_params
            check_memory(
                f"the exact block of layer {self.layer.name!r} ({size}×{size}), twice at its peak",
                2 * size * size * G.element_size(),
                self.context.max_bytes,
                "use method 'woodbury' (the same matrix, never formed) or raise max_bytes=",
            )
        self.sum.scale_(old_weight)
        self.sum.add(A, G, new_weight * self.batch_scale(stats))
        self.mass = old_weight * self.mass + new_weight

    def _matrix(self, normaliser: float | None, keep: bool) -> Tensor:
        self._require(self.sum is not None and not self.sum.empty)
        if self.per_batch:
            return self.sum.result(keep).div_(self.divisor(normaliser, self.mass))
        return self.context.all_reduce(self.sum.result(keep)).div_(self.divisor(normaliser, 0.0))

    def block(self, normaliser: float | None = None) -> ExactBlock:
        matrix = self._matrix(normaliser, keep=True)
        return ExactBlock(self.layer, matrix, self.context.fisher_type, self.options)

    def finish(self, normaliser: float, num_samples: int) -> ExactBlock:
        matrix = self._matrix(normaliser, keep=False)  # no copy: the sums become the block
        return ExactBlock(self.layer, matrix, self.context.fisher_type, self.options)

    def _state(self) -> dict[str, Tensor | None]:
        kron, rows = (None, None) if self.sum is None else (self.sum.kron, self.sum.rows)
        return {"kron": kron, "rows": rows, "mass": torch.tensor(self.mass, dtype=torch.float64)}

    def _load(self, state) -> None:
        d_out, d = self.layer.d_out, self.layer.d_in + self.layer.has_bias
        self._check_shape("kron", state.get("kron"), (d_out * d_out, d * d))
        self._check_shape("rows", state.get("rows"), (d_out * d, d_out * d))
        like = next((t for t in (state.get("kron"), state.get("rows")) if t is not None), None)
        self.sum = None
        if like is not None:
            self.sum = DenseSum(d_out, d, like, self.layer)
            self.sum.kron, self.sum.rows = state.get("kron"), state.get("rows")
        self.mass = 0.0 if state.get("mass") is None else float(state["mass"])


class ExactBlock(CurvatureBlock):
    """Dense ``F``; solves and eigenvalues through its eigen-decomposition (float64 if needed)."""

    method = "exact"
    Builder = ExactBuilder

    def __init__(self, layer, dense_kron: Tensor, fisher_type, options=None):
        super().__init__(layer, fisher_type, options or {})
        self.matrix = dense_kron

    def _reference(self) -> Tensor:
        return self.matrix

    @property
    def is_exact(self) -> bool:
        return True

    @cached_property
    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of the block (Kronecker order)."""
        return symmetric_eigh(self.matrix)

    def _flat(self, V: Tensor) -> Tensor:
        return V.reshape(V.shape[0], -1)

    def _matmat(self, V: Tensor) -> Tensor:
        return (self._flat(V) @ self.matrix).reshape(V.shape)

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        if "eig" not in self.__dict__:  # one Cholesky factorisation costs a sixth of eigh
            work = self.matrix.double() if self.matrix.dtype == torch.float32 else self.matrix
            chol, info = torch.linalg.cholesky_ex(add_to_diagonal(work, damping))
            if int(info) == 0:
                flat = self._flat(V).T.to(work.dtype)
                return torch.cholesky_solve(flat, chol).T.to(V.dtype).reshape(V.shape)
        values, vectors = self.eig
        return (((self._flat(V) @ vectors) / (values + damping)) @ vectors.T).reshape(V.shape)

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        if "eig" in self.__dict__:
            return self.eig[0]
        work = self.matrix.double() if self.matrix.dtype == torch.float32 else self.matrix
        return torch.linalg.eigvalsh(work).clamp_min(0).to(self.matrix.dtype)

    def _nbytes(self) -> int:
        return tensor_bytes(self.matrix, *self.__dict__.get("eig", ()))

    def _dense_kron(self) -> Tensor:
        return self.matrix

    def norm_sq(self) -> float:
        return squared_norm(self.matrix)

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return float(torch.dot(self.matrix.reshape(-1), dense_sum(A, G, self.layer).reshape(-1)))
