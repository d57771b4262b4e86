r"""The diagonal of the Fisher block, :math:`\mathrm{diag}(F) = \frac1ν \sum_{n,r} j_{n,r}^2`.

Over a data set the squares are summed batch by batch (memory ``P``). At-scale Frobenius terms:
``‖diag F‖²`` and ``Σ_rows jᵀ D j = ⟨d, Σ_rows j²⟩``.
"""

from __future__ import annotations

from torch import Tensor

from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, tensor_bytes
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
    """Sums of squared rows over the data set."""

    def __init__(self, layer, options, context):
        super().__init__(layer, options, context)
        self.sum: Tensor | None = None

    def add(self, A: Tensor, G: Tensor, pass_index: int) -> None:
        part = squared_rows_sum(A, G, self.layer)
        self.sum = part if self.sum is None else self.sum.add_(part)

    def finish(self, normaliser: float, num_samples: int) -> DiagBlock:
        diagonal = self.context.all_reduce(self.sum) / normaliser
        return DiagBlock(self.layer, diagonal, self.context.fisher_type, self.options)


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
