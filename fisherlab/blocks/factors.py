r"""Kronecker factors and per-sample gradient rows from captured ``Ã`` and ``G``.

The one place where KFAC-type factors are computed (used by ``kfac``, ``ekfac``, ``skfac`` and
the optimizers). With ``A: [N, T, D]`` and ``G: [R, N, T, d_out]``:

* ``"expand"`` (KFC; the convention of curvlinops and NNGeometry):
  :math:`Ω = \frac{1}{NT}\sum_{n,t} ã ã^\top`, :math:`Γ = \frac1ν \sum_{r,n,t} g g^\top`.
* ``"reduce"``: :math:`Ω = \frac1N \sum_n ā ā^\top` with the position mean ``ā``, and
  :math:`Γ = \frac1ν\sum_{r,n} ḡ ḡ^\top` with the position sum ``ḡ``.

For ``T = 1`` both are the KFAC factors, and ``Γ ⊗ Ω`` is exact for a single sample. Over a data
set the sums run over all batches (:class:`KroneckerSums`): ``N`` and ``ν`` are those of the data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KFAC_APPROX = ("expand", "reduce")


def reduce_positions(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``(ā, ḡ)``, ``[N, 1, D]`` and ``[R, N, 1, d_out]``: position mean of ``A``, sum of ``G``."""
    return A.mean(dim=1, keepdim=True), G.sum(dim=2, keepdim=True)


def _factor_rows(A: Tensor, G: Tensor, approx: str) -> tuple[Tensor, Tensor]:
    if approx == "reduce":
        A, G = reduce_positions(A, G)
    return A.reshape(-1, A.shape[-1]), G.reshape(-1, G.shape[-1])


def input_factor(A: Tensor, approx: str = "expand") -> Tensor:
    """``Ω`` (``D×D``) from homogeneous inputs ``A: [N, T, D]``."""
    if approx == "reduce":
        A = A.mean(dim=1, keepdim=True)
    rows = A.reshape(-1, A.shape[-1])
    return rows.T @ rows / rows.shape[0]


def gradient_factor(G: Tensor, normaliser: float, approx: str = "expand") -> Tensor:
    """``Γ`` (``d_out×d_out``) from output-gradient rows ``G: [R, N, T, d_out]``."""
    if approx == "reduce":
        G = G.sum(dim=2, keepdim=True)
    rows = G.reshape(-1, G.shape[-1])
    return rows.T @ rows / normaliser


class KroneckerSums:
    """Unnormalised sums of KFAC's factors over batches: ``Σ ããᵀ`` (and its count), ``Σ ggᵀ``.

    Args:
        approx: ``"expand"`` or ``"reduce"``.
    """

    def __init__(self, approx: str):
        self.approx = approx
        self.aa: Tensor | None = None
        self.gg: Tensor | None = None
        self.count = 0

    def add(self, A: Tensor, G: Tensor) -> None:
        """Add a batch's ``A [N_b, T, D]`` and ``G [R, N_b, T, d_out]``."""
        a, g = _factor_rows(A, G, self.approx)
        aa, gg = a.T @ a, g.T @ g
        self.aa = aa if self.aa is None else self.aa.add_(aa)
        self.gg = gg if self.gg is None else self.gg.add_(gg)
        self.count += a.shape[0]

    def factors(
        self, normaliser: float, all_reduce: Callable[[Tensor], Tensor] = lambda t: t
    ) -> tuple[Tensor, Tensor]:
        """``(Γ, Ω)`` of everything added (on every rank), ``Γ = Σggᵀ/ν`` and ``Ω = Σããᵀ/count``."""
        count = all_reduce(torch.tensor([float(self.count)], dtype=torch.float64)).item()
        return all_reduce(self.gg) / normaliser, all_reduce(self.aa) / count


def gradient_rows(A: Tensor, G: Tensor) -> Tensor:
    """Per-sample gradient rows ``G_{r,n}ᵀ Ã_n`` as ``[R, N, d_out, D]`` (Kronecker order)."""
    return torch.einsum("rntd,nte->rnde", G, A)
