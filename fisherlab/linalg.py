"""Linear algebra shared by every module: symmetric eigen-decompositions, Grams, chunking."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from fisherlab.conventions import FisherlabError

#: While positive, :func:`symmetric_eigh` skips its finiteness check (see :func:`deferred_checks`).
_DEFERRED = [0]


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Within the block, linear algebra skips its own finiteness checks (host synchronisations).

    For callers that test their results themselves: an optimizer step checks every direction
    and statistic in one synchronisation. Non-finite input then gives NaN results instead of
    an error.
    """
    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1


def symmetric_eigh(matrix: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``eigh`` of a symmetric PSD matrix, computed in ``dtype`` (default: float64 for float32).

    The matrix is symmetrised first and the eigenvalues are clamped at zero (PSD up to
    rounding). A failing decomposition is retried once with a small jitter on the diagonal,
    built on the matrix's own device.

    Returns:
        Eigenvalues (ascending) and eigenvectors, in the matrix's dtype.
    """
    work_dtype = dtype or (torch.float64 if matrix.dtype == torch.float32 else matrix.dtype)
    work = matrix.to(work_dtype)
    work = (work + work.T) / 2
    if not _DEFERRED[0] and not bool(torch.isfinite(work).all()):
        raise FisherlabError(
            "cannot eigendecompose a matrix with non-finite entries (overflowing statistics)"
        )
    try:
        values, vectors = torch.linalg.eigh(work)
    except RuntimeError:  # pragma: no cover - LAPACK convergence failure
        jitter = 1e-12 * work.diagonal().abs().max().clamp_min(1.0)
        eye = torch.eye(len(work), dtype=work.dtype, device=work.device)
        values, vectors = torch.linalg.eigh(work + jitter * eye)
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def damped_inverse(
    matrix: Tensor, shift: Tensor | float, dtype: torch.dtype | None = None
) -> Tensor:
    """``(M + shift·I)⁻¹`` of a symmetric PSD matrix by Cholesky, in ``dtype``.

    Computed in float64 for float32 by default, returned in the matrix's dtype. ``M`` is
    symmetrised as ``(M + Mᵀ)/2`` (``M/2 + Mᵀ/2``: exact for float32 in float64) into one working
    copy, whose diagonal is shifted in place. Where the shifted matrix is not positive definite
    (non-finite or overflowing entries) the result is NaN, without a host synchronisation: a
    NaN or infinity in ``M`` either stops the factorisation (``info > 0``) or reaches the
    factor's diagonal (an infinite diagonal entry factors "fine"), so the ``n`` diagonal
    entries of the factor are the one finiteness check.
    """
    work_dtype = dtype or (torch.float64 if matrix.dtype == torch.float32 else matrix.dtype)
    work = torch.empty(matrix.shape, dtype=work_dtype, device=matrix.device)
    torch.mul(matrix, 0.5, out=work)  # halving is exact: M/2 + Mᵀ/2 rounds as (M + Mᵀ)/2
    work.add_(matrix.T, alpha=0.5)
    work.diagonal().add_(torch.as_tensor(shift, dtype=work_dtype, device=work.device))
    chol, info = torch.linalg.cholesky_ex(work)
    del work
    ok = (info == 0) & torch.isfinite(chol.diagonal()).all()
    inverse = torch.cholesky_inverse(chol).to(matrix.dtype)
    return inverse.masked_fill_(~ok, torch.nan)


def gram_accumulate(
    rows: Tensor, out: Tensor, tile: int = 512, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """``out ← beta·out + alpha · rowsᵀ rows`` on the upper triangle of ``tile×tile`` blocks only.

    Accumulate any number of batches of rows, then call :func:`mirror_upper` once. In place,
    without a ``P×P`` temporary; the product costs about ``(k+1)/(2k)`` of the full one for
    ``k = ⌈P/tile⌉`` tiles. ``beta = 0`` ignores ``out``'s entries (NaN in an empty tensor
    included).

    Args:
        rows: ``[M, P]``.
        out: ``[P, P]``, accumulated in place.
        tile: Column tile width.
        alpha: Weight of the product.
        beta: Weight of ``out``'s upper tiles before the product.
    """
    p = rows.shape[1]
    weight = {} if alpha == 1 and beta == 1 else {"alpha": alpha, "beta": beta}
    if p <= tile:
        return out.addmm_(rows.T, rows, **weight)
    for i in range(0, p, tile):
        out[i : i + tile, i:].addmm_(rows[:, i : i + tile].T, rows[:, i:], **weight)
    return out


def mirror_upper(out: Tensor, tile: int = 512) -> Tensor:
    """Copy the upper block triangle of :func:`gram_accumulate` into the lower one (in place)."""
    p = out.shape[0]
    if p <= tile:
        return out
    for i in range(0, p, tile):
        out[i + tile :, i : i + tile] = out[i : i + tile, i + tile :].T
    return out


def symmetric_gram(rows: Tensor, tile: int = 512) -> Tensor:
    """``rowsᵀ rows`` computed on the upper triangle of tiles only, then mirrored.

    Args:
        rows: ``[M, P]``.
        tile: Column tile width.

    Returns:
        The symmetric ``[P, P]`` matrix.
    """
    p = rows.shape[1]
    return mirror_upper(gram_accumulate(rows, rows.new_zeros(p, p), tile), tile)


def add_to_diagonal(matrix: Tensor, value: float) -> Tensor:
    """``matrix + value·I`` as a new tensor (one copy, no identity matrix)."""
    out = matrix.clone()
    out.diagonal().add_(value)
    return out


def squared_norm(matrix: Tensor) -> float:
    """``‖matrix‖²_F`` without a temporary of the matrix's size."""
    flat = matrix.reshape(-1)
    return float(torch.dot(flat, flat))


def sample_chunks(n: int, row_elems: int, budget_elems: int = 2**22) -> Iterator[slice]:
    """Slices of ``n`` samples so that a chunk holds at most ``budget_elems`` elements."""
    step = max(1, budget_elems // max(row_elems, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def outer_rows(G: Tensor, A: Tensor) -> Tensor:
    """``Σ_t g_t ã_tᵀ`` per row: ``G [..., N, T, d_out]``, ``A [N, T, D]`` → ``[..., N, d_out, D]``.

    The per-sample gradient of a layer ``z_t = W̃ ã_t`` (and of its rotated forms): the one place
    this outer-product sum is written.
    """
    return torch.einsum("...ntd,nte->...nde", G, A)
