r"""The diagonal of the Fisher block, :math:`\mathrm{diag}(F) = \frac1ν \sum_{n,r} j_{n,r}^2`.

Over a data set the squares are summed batch by batch (memory ``P``); a running average averages
the batches' own diagonals. At-scale Frobenius terms:
``‖diag F‖²`` and ``Σ_rows jᵀ D j = ⟨d, Σ_rows j²⟩``.
"""

from __future__ import annotations

from torch import Tensor

from fisherlab.blocks.base import (
    BlockBuilder,
    CurvatureBlock,
    LayerStats,
    WeightedSum,
    tensor_bytes,
)
from fisherlab.blocks.factors import gradient_rows
from fisherlab.layers import Layer
from fisherlab.linalg import sample_chunks


def squared_rows_sum(A: Tensor, G: Tensor, layer: Layer | None = None) -> Tensor:
    """``Σ_{n,r} j²`` as ``[d_out, D]`` (Kronecker order), in chunks of samples.

    ``layer`` gives the rows (any layer type); ``None``: ``A`` is ``Ã`` of a Kronecker layer.
    """
    if layer is None:
        rows_of, shape = gradient_rows, (G.shape[-1], A.shape[-1])
    else:
        rows_of, shape = layer.gradient_rows, (layer.d_out, layer.d_in + layer.has_bias)
    out = G.new_zeros(shape)
    for chunk in sample_chunks(A.shape[0], G.shape[0] * out.numel()):
        out += (rows_of(A[chunk], G[:, chunk]) ** 2).sum(dim=(0, 1))
    return out


class DiagBuilder(BlockBuilder):
    """Weighted sums of squared rows (``Σ j²``, or ``Σ j²/ν_b`` per batch)."""

    state_names = ("sum", "sum_mass")

    def __init__(self, layer, options, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.sum = WeightedSum()

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        part = squared_rows_sum(stats.A, stats.G, self.layer)
        if self.per_batch:
            part = part / stats.normaliser
        self.sum.add(part, old_weight, new_weight)

    def block(self, normaliser: float | None = None) -> DiagBlock:
        self._require(self.sum.value is not None)
        if self.per_batch:
            diagonal = self.sum.value / self.divisor(normaliser, self.sum.mass)
        else:
            diagonal = self.context.all_reduce(self.sum.value) / self.divisor(normaliser, 0.0)
        return DiagBlock(self.layer, diagonal, self.context.fisher_type, self.options)

    def _state(self) -> dict[str, Tensor | None]:
        return self.sum.state("sum")

    def _load(self, state) -> None:
        self._check_shape(
            "sum", state.get("sum"), (self.layer.d_out, self.layer.d_in + self.layer.has_bias)
        )
        self.sum.load(state, "sum")


class DiagBlock(CurvatureBlock):
    """``diag(F)``; damping ``1/(d + λ)``."""

    method = "diag"
    Builder = DiagBuilder

    def __init__(self, layer, diagonal: Tensor, fisher_type, options=None):
        super().__init__(layer, fisher_type, options or {})
        self.diagonal = diagonal

    def _reference(self) -> Tensor:
        return self.diagonal

    def _matmat(self, V: Tensor) -> Tensor:
        return V * self.diagonal

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return V / (self.diagonal + damping)

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return self.diagonal.flatten().sort().values

    def _nbytes(self) -> int:
        return tensor_bytes(self.diagonal)

    def norm_sq(self) -> float:
        return float((self.diagonal**2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        return float((self.diagonal * squared_rows_sum(A, G, self.layer)).sum())
