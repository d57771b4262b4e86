r"""The diagonal of the Fisher block, :math:`\mathrm{diag}(F) = \frac1ν \sum_{n,r} j_{n,r}^2`."""

from __future__ import annotations

from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock, tensor_bytes
from fisherlab.blocks.factors import gradient_rows, sample_chunks


def fisher_diagonal(A: Tensor, G: Tensor, normaliser: float) -> Tensor:
    """``diag(F)`` as ``[d_out, D]`` (Kronecker order), in chunks of samples."""
    out = A.new_zeros(G.shape[-1], A.shape[-1])
    for chunk in sample_chunks(A.shape[0], G.shape[0] * out.numel()):
        out += (gradient_rows(A[chunk], G[:, chunk]) ** 2).sum(dim=(0, 1))
    return out / normaliser


class DiagBlock(CurvatureBlock):
    """``diag(F)``; damping ``1/(d + λ)``."""

    method = "diag"

    def __init__(self, layer, diagonal: Tensor, fisher_type, options):
        super().__init__(layer, fisher_type, options)
        self.diagonal = diagonal

    def _reference(self) -> Tensor:
        return self.diagonal

    def _matmat(self, V: Tensor) -> Tensor:
        return V * self.diagonal

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return V / (self.diagonal + damping)

    def _eigvalsh(self) -> Tensor:
        return self.diagonal.flatten().sort().values

    def _nbytes(self) -> int:
        return tensor_bytes(self.diagonal)
