r"""Kronecker factors and per-sample gradient rows from captured ``Ã`` and ``G``.

The one place where KFAC-type factors are computed (used by ``kfac``, ``ekfac``, ``skfac`` and
the optimizers). With ``A: [N, T, D]`` and ``G: [R, N, T, d_out]``:

* ``"expand"`` (KFC; the convention of curvlinops and NNGeometry):
  :math:`Ω = \frac{1}{NT}\sum_{n,t} ã ã^\top`, :math:`Γ = \frac1ν \sum_{r,n,t} g g^\top`.
* ``"reduce"``: :math:`Ω = \frac1N \sum_n ā ā^\top` with the position mean ``ā``, and
  :math:`Γ = \frac1ν\sum_{r,n} ḡ ḡ^\top` with the position sum ``ḡ``.

For ``T = 1`` both are the KFAC factors, and ``Γ ⊗ Ω`` is exact for a single sample. Over a data
set the sums run over all batches (:class:`KroneckerSums`): ``N`` and ``ν`` are those of the data;
in a running average each batch's own factors are averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fisherlab.blocks.base import WeightedSum
from fisherlab.linalg import outer_rows

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
    r"""Weighted sums of KFAC's factors over batches: ``Σ ããᵀ`` (with its row count), ``Σ ggᵀ``.

    ``add(A, G, old_weight, new_weight)`` updates each sum by ``S ← α S + β x_b``
    (:class:`~fisherlab.blocks.base.WeightedSum`). Unnormalised (``per_batch=False``):
    ``x_b`` is the batch's ``Σ ggᵀ``, ``Σ ããᵀ`` and its row count ``c_b``, and :meth:`factors`
    gives ``Γ = S_gg/ν``, ``Ω = S_aa/S_c``. Per batch (``per_batch=True``): ``x_b`` is the
    batch's own ``Γ_b = Σ ggᵀ/ν_b`` and ``Ω_b = Σ ããᵀ/c_b`` (as :func:`gradient_factor` and
    :func:`input_factor`), and :meth:`factors` divides both by the mass ``W = Σ_k w_k``.

    Args:
        approx: ``"expand"`` or ``"reduce"``.
        per_batch: Normalise each batch by its own ``ν_b`` and row count.
    """

    def __init__(self, approx: str, per_batch: bool = False):
        self.approx, self.per_batch = approx, per_batch
        self.aa, self.gg = WeightedSum(), WeightedSum()
        #: ``S_c = Σ_k w_k c_k`` (unnormalised) or the mass ``W`` (per batch).
        self.count = 0.0

    @property
    def empty(self) -> bool:
        """Whether nothing has been added (or everything was forgotten)."""
        return self.gg.value is None

    def add(
        self,
        A: Tensor,
        G: Tensor,
        old_weight: float = 1.0,
        new_weight: float = 1.0,
        normaliser: float = 1.0,
    ) -> None:
        """Add a batch's ``A [N_b, T, D]`` and ``G [R, N_b, T, d_out]`` (``ν_b = normaliser``)."""
        a, g = _factor_rows(A, G, self.approx)
        count = a.shape[0]
        scale_a, scale_g = (1.0, 1.0)
        if self.per_batch:  # folded into the products' weights: one pass over each sum
            scale_a, scale_g, count = 1.0 / count, 1.0 / normaliser, 1
        self.aa.add_gram(a, old_weight, new_weight, scale_a)
        self.gg.add_gram(g, old_weight, new_weight, scale_g)
        self.count = (0.0 if old_weight == 0 else old_weight * self.count) + new_weight * count

    def factors(
        self,
        normaliser: float | None = None,
        all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
        shared: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(Γ, Ω)`` of the state (sums all-reduced over ranks unless per batch).

        Unnormalised: ``Γ = S_gg/ν`` (``ν = normaliser``, the data's) and ``Ω = S_aa/S_c``;
        per batch: ``Γ = S_gg/W`` and ``Ω = S_aa/W``. The sums are left as they are.

        ``shared``: per batch with mass ``W = 1`` (the optimizers' running average), the sums
        themselves, without a copy; they change with the next :meth:`add`.
        """
        if self.per_batch:
            if shared and self.count == 1:
                return self.gg.value, self.aa.value
            return self.gg.value / self.count, self.aa.value / self.count
        count = all_reduce(torch.tensor([float(self.count)], dtype=torch.float64)).item()
        return all_reduce(self.gg.value) / normaliser, all_reduce(self.aa.value) / count

    def state(self) -> dict[str, Tensor | None]:
        """The sums as tensors (for a builder's ``state_dict``)."""
        return {
            **self.gg.state("gg"),
            **self.aa.state("aa"),
            "count": torch.tensor(self.count, dtype=torch.float64),
        }

    def load(self, state) -> None:
        """Restore from :meth:`state`."""
        self.gg.load(state, "gg")
        self.aa.load(state, "aa")
        self.count = 0.0 if state.get("count") is None else float(state["count"])

    #: The names of :meth:`state`.
    STATE_NAMES = ("gg", "gg_mass", "aa", "aa_mass", "count")


def gradient_rows(A: Tensor, G: Tensor) -> Tensor:
    """Per-sample gradient rows ``G_{r,n}ᵀ Ã_n`` as ``[R, N, d_out, D]`` (Kronecker order)."""
    return outer_rows(G, A)
