r"""The block-diagonal approximation itself: blocks of ``(F+λI)⁻¹`` vs inverses of the blocks.

TENGraD (Sec. 3 and Fig. 6) inverts every layer's damped Fisher block exactly and compares the
result with "exact NGD", the whole network's ``(F+λI)⁻¹``. What separates them is the
block-diagonal approximation alone: per layer ``l``,

.. math::
    e_l(λ) = \frac{\|[(F+λI)^{-1}]_{ll} - (F_{ll}+λI)^{-1}\|_F}{\|[(F+λI)^{-1}]_{ll}\|_F},

and, for the whole network, the cosine between the exact natural gradient ``(F+λI)⁻¹g`` and the
block-diagonal one (each layer's ``(F_ll+λI)⁻¹g_l``), with ``g`` the gradient of the same data.
The share of the Fisher's energy outside the diagonal blocks, ``‖F − bdiag(F)‖²/‖F‖²``, is
reported beside them, and the plain gradient's cosine to the exact natural gradient (the
trivial baseline: a block-diagonal direction that does not beat it has not earned its cost).
Dampings are multiples of the largest eigenvalue ``λ_max`` of the whole network's ``F``. All from
:func:`fisherlab.exact_fisher` (dense, small networks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fisherlab.analysis.table import FigureData
from fisherlab.comparison import data_gradients
from fisherlab.exact import exact_fisher
from fisherlab.linalg import add_to_diagonal
from fisherlab.metrics import frobenius_error
from fisherlab.problem import Problem

DEFAULT_DAMPINGS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""Dampings relative to the largest eigenvalue ``λ_max`` of the whole network's Fisher."""


def block_diagonal_error(
    problem: Problem, relative_dampings: Sequence[float] = DEFAULT_DAMPINGS
) -> FigureData:
    """Error of the block-diagonal inverse against the whole network's damped inverse.

    Args:
        problem: The model, loss, data and Fisher type (e.g. the empirical Fisher of the
            training set).
        relative_dampings: ``λ`` as multiples of ``λ_max(F)``.

    Returns:
        Table ``errors`` (``relative_damping, damping, damping_over_mean, layer, P,
        inverse_error, cosine, gradient_cosine``; layer ``"network"``: the whole network, where
        ``inverse_error`` compares the full inverse with the block-diagonal one and ``cosine``
        is that of the natural gradients; ``gradient_cosine``: the plain gradient's cosine to
        the exact natural gradient, the baseline), and meta ``offdiagonal_energy``
        (``‖F − bdiag(F)‖²/‖F‖²``), ``lambda_max``, ``mean_eigenvalue``.
    """
    full = exact_fisher(problem)
    f = full.matrix
    size = len(f)
    grads = data_gradients(problem)
    g = torch.cat([grads[name].reshape(-1).to(f) for name in full.slices])
    mask = torch.zeros_like(f, dtype=torch.bool)
    for s in full.slices.values():
        mask[s, s] = True
    energy = float((f[~mask] ** 2).sum() / (f**2).sum())
    mean_eig = float(f.trace()) / size
    top = float(torch.linalg.eigvalsh(f)[-1])
    eye = torch.eye(size, dtype=f.dtype)
    rows: list[dict[str, Any]] = []
    for rel in relative_dampings:
        lam = rel * top
        inverse = torch.linalg.solve(add_to_diagonal(f, lam), eye)
        blockwise = torch.zeros_like(f)
        for name, s in full.slices.items():
            blockwise[s, s] = torch.linalg.solve(add_to_diagonal(f[s, s], lam), eye[s, s])
            d_full, d_block = inverse[s] @ g, blockwise[s, s] @ g[s]
            rows.append(_row(rel, lam, name, s.stop - s.start, inverse[s, s], blockwise[s, s]))
            rows[-1]["cosine"] = _cos(d_full, d_block)
            rows[-1]["gradient_cosine"] = _cos(d_full, g[s])
        rows.append(_row(rel, lam, "network", size, inverse, blockwise))
        rows[-1]["cosine"] = _cos(inverse @ g, blockwise @ g)
        rows[-1]["gradient_cosine"] = _cos(inverse @ g, g)
    for row in rows:
        row["damping_over_mean"] = row["damping"] / mean_eig
    meta = {
        "fisher_type": problem.fisher_type,
        "reference": f"{full.num_samples} samples",
        "offdiagonal_energy": energy,
        "mean_eigenvalue": mean_eig,
        "lambda_max": top,
        "layers": list(full.slices),
    }
    return FigureData("block_diagonal", {"errors": rows}, meta)


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _row(rel: float, lam: float, layer: str, p: int, exact: Tensor, approx: Tensor) -> dict:
    return {
        "relative_damping": float(rel),
        "damping": float(lam),
        "layer": layer,
        "P": p,
        "inverse_error": frobenius_error(exact, approx),
    }


__all__ = ["DEFAULT_DAMPINGS", "block_diagonal_error"]
