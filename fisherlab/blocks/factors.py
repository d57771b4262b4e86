r"""Kronecker factors and per-sample gradient rows from captured ``Ã`` and ``G``.

The one place where KFAC-type factors are computed (used by ``kfac``, ``ekfac``, ``skfac`` and
the optimizers). With ``A: [N, T, D]`` and ``G: [R, N, T, d_out]``:

* ``"expand"`` (KFC; the convention of curvlinops and NNGeometry):
  :math:`Ω = \frac{1}{NT}\sum_{n,t} ã ã^\top`, :math:`Γ = \frac1ν \sum_{r,n,t} g g^\top`.
* ``"reduce"``: :math:`Ω = \frac1N \sum_n ā ā^\top` with the position mean ``ā``, and
  :math:`Γ = \frac1ν\sum_{r,n} ḡ ḡ^\top` with the position sum ``ḡ``.

For ``T = 1`` both are the KFAC factors, and ``Γ ⊗ Ω`` is exact for a single sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fisherlab.conventions import FisherlabError

KFAC_APPROX = ("expand", "reduce")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a clear error listing them."""
    if value not in choices:
        raise FisherlabError(f"{name}={value!r} is not valid; choose one of {choices}")
    return value


def reduce_positions(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``(ā, ḡ)``, ``[N, 1, D]`` and ``[R, N, 1, d_out]``: position mean of ``A``, sum of ``G``."""
    return A.mean(dim=1, keepdim=True), G.sum(dim=2, keepdim=True)


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


def sample_chunks(n: int, row_elems: int, budget_elems: int = 2**24) -> Iterator[slice]:
    """Slices of samples so that a chunk holds at most ``budget_elems`` elements."""
    step = max(1, budget_elems // max(row_elems, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def gradient_rows(A: Tensor, G: Tensor) -> Tensor:
    """Per-sample gradient rows ``G_{r,n}ᵀ Ã_n`` as ``[R, N, d_out, D]`` (Kronecker order)."""
    return torch.einsum("rntd,nte->rnde", G, A)


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a symmetric PSD matrix, in float64 when the input is float32.

    Eigenvalues are clamped at zero (PSD up to rounding). A failing decomposition is retried with
    a small jitter on the diagonal.
    """
    work = matrix.double() if matrix.dtype != torch.float64 else matrix
    work = (work + work.T) / 2
    if not bool(torch.isfinite(work).all()):
        raise FisherlabError(
            "cannot eigendecompose a matrix with non-finite entries (overflowing statistics)"
        )
    try:
        values, vectors = torch.linalg.eigh(work)
    except RuntimeError:  # pragma: no cover - LAPACK convergence failure
        jitter = 1e-12 * work.diagonal().abs().max().clamp_min(1.0)
        values, vectors = torch.linalg.eigh(work + jitter * torch.eye(len(work), dtype=work.dtype))
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)
