"""Damped inverse blocks of one layer, exact and approximate (TENGraD Fig. 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fisherlab.analysis.setup import (
    HEATMAP_METHODS,
    _capture,
    _layer_info,
    choose_layer,
)
from fisherlab.analysis.table import FigureData, matrix_rows
from fisherlab.blocks import build_block, parse_method
from fisherlab.conventions import FisherlabError
from fisherlab.exact import exact_fisher
from fisherlab.linalg import add_to_diagonal
from fisherlab.metrics import frobenius_error
from fisherlab.problem import Problem


def _as_problem(model, loss_fn, x, y, fisher_type) -> Problem:
    return Problem(model, loss_fn, (x, y), fisher_type=fisher_type)


def block_heatmaps(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    layer: str | None = None,
    methods: Sequence[str] = HEATMAP_METHODS,
    damping: float | None = None,
    relative_damping: float = 0.1,
    max_params: int = 200,
    fisher_type: str | None = None,
    reference: str = "block",
) -> FigureData:
    r"""Damped inverse blocks :math:`(F̂+λI)^{-1}` of one layer, exact and approximate.

    The exact block is :class:`~fisherlab.blocks.exact.ExactBlock`; every method's inverse is
    ``block.solve(I, λ)``, in parameter order (weight row-major, then bias). Where the layer has
    more than ``max_params`` parameters, the leading ``max_params × max_params`` sub-block is
    kept (``meta["shown"]``).

    Args:
        model: The network, or a :class:`~fisherlab.problem.Problem` (then ``loss_fn``, ``x``
            and ``y`` are left out and the problem's data, all batches, is captured).
        loss_fn: The loss (with a network).
        x: Batch inputs (with a network).
        y: Batch targets (with a network).
        layer: Module name (default: :func:`choose_layer` with ``max_params``).
        methods: Method specs next to the exact block.
        damping: Absolute ``λ``; default ``relative_damping · tr(F)/P`` (a fraction of the mean
            eigenvalue), so that the inverse shows structure and not only ``I/λ``.
        relative_damping: See ``damping``.
        max_params: Layer choice and crop size.
        fisher_type: Fisher type (default ``"true"``; a Problem's own with a Problem).
        reference: ``"block"``: the exact reference is the inverse of the layer's damped block
            ``(F_ll+λI)⁻¹`` (which Woodbury/TENGraD computes exactly); ``"network"``: the layer's
            block of the whole network's ``(F+λI)⁻¹`` (exact NGD, from
            :func:`fisherlab.exact_fisher`; TENGraD Fig. 6's reference), so that the
            block-diagonal approximation itself shows.

    Returns:
        Tables ``inverse`` (wide rows ``matrix, row, c0…``: ``"exact"`` and one per method, in
        units of 1/F) and ``summary`` (``method, rel_frobenius_block, rel_frobenius_inverse``).
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    name = layer if layer is not None else choose_layer(cap, max_params)
    exact = build_block("exact", cap, name)
    dense = exact.to_dense()
    size = exact.size
    lam = float(damping) if damping is not None else relative_damping * float(dense.trace()) / size
    eye = torch.eye(size, dtype=dense.dtype)
    shown = min(size, max_params)
    if reference == "network":
        full = exact_fisher(
            model if isinstance(model, Problem) else _as_problem(model, loss_fn, x, y, fisher_type)
        )
        s = full.slices[name]
        inv = torch.linalg.solve(
            add_to_diagonal(full.matrix, lam),
            torch.eye(len(full.matrix), dtype=full.matrix.dtype),
        )
        inverses = {"exact": inv[s, s]}
    elif reference == "block":
        inverses = {"exact": exact.solve(eye, lam)}
    else:
        raise FisherlabError(f"reference must be 'block' or 'network', got {reference!r}")
    summary = []
    for spec in methods:
        method, options = parse_method(spec)
        block = build_block(method, cap, name, **options)
        inverses[spec] = block.solve(eye, lam)
        summary.append(
            {
                "method": spec,
                "rel_frobenius_block": frobenius_error(dense, block.to_dense()),
                "rel_frobenius_inverse": frobenius_error(inverses["exact"], inverses[spec]),
            }
        )
    crop = {k: v[:shown, :shown] for k, v in inverses.items()}
    meta = {
        **_layer_info(cap, name),
        "shown": shown,
        "damping": lam,
        "relative_damping": None if damping is not None else relative_damping,
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "methods": list(methods),
        "reference": reference,
    }
    return FigureData("heatmaps", {"inverse": matrix_rows(crop), "summary": summary}, meta)
