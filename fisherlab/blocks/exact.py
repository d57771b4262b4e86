r"""The exact dense block ``F = (1/ν) JᵀJ``, from the captured rows ``j = vec_r(G_nᵀÃ_n)``."""

from __future__ import annotations

from functools import cached_property

from torch import Tensor

from fisherlab.blocks.base import CurvatureBlock, tensor_bytes
from fisherlab.blocks.factors import gradient_rows, symmetric_eigh
from fisherlab.exact import symmetric_gram


def dense_from_rows(A: Tensor, G: Tensor, normaliser: float) -> Tensor:
    """``(1/ν) JᵀJ`` in Kronecker order, ``[P, P]``."""
    rows = gradient_rows(A, G)
    return symmetric_gram(rows.reshape(rows.shape[0] * rows.shape[1], -1)) / normaliser


class ExactBlock(CurvatureBlock):
    """Dense ``F``; solves and eigenvalues through its eigen-decomposition (float64 if needed)."""

    method = "exact"

    def __init__(self, layer, dense_kron: Tensor, fisher_type, options):
        super().__init__(layer, fisher_type, options)
        self.matrix = dense_kron

    def _reference(self) -> Tensor:
        return self.matrix

    @cached_property
    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of the block (Kronecker order)."""
        return symmetric_eigh(self.matrix)

    def _flat(self, V: Tensor) -> Tensor:
        return V.reshape(V.shape[0], -1)

    def _matmat(self, V: Tensor) -> Tensor:
        return (self._flat(V) @ self.matrix).reshape(V.shape)

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        values, vectors = self.eig
        return (((self._flat(V) @ vectors) / (values + damping)) @ vectors.T).reshape(V.shape)

    def _eigvalsh(self) -> Tensor:
        return self.eig[0]

    def _nbytes(self) -> int:
        return tensor_bytes(self.matrix, *self.__dict__.get("eig", ()))

    def _dense_kron(self) -> Tensor:
        return self.matrix
