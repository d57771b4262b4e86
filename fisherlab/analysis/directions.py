"""Cosine of each method's damped natural gradient to the exact one, against damping."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fisherlab.analysis.setup import (
    APPROXIMATIONS,
    _capture,
    _layer_info,
    exact_reference,
)
from fisherlab.analysis.table import FigureData
from fisherlab.blocks import build_block, parse_method
from fisherlab.comparison import batch_gradients
from fisherlab.metrics import direction_agreement
from fisherlab.problem import Problem


def direction_quality_vs_damping(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    methods: Sequence[str] = APPROXIMATIONS,
    dampings: Sequence[float] | None = None,
    fisher_type: str | None = None,
) -> FigureData:
    r"""Cosine of each method's preconditioned gradient to the exact natural gradient vs ``λ``.

    Per layer, with ``g`` the mini-batch loss gradient (:func:`fisherlab.comparison.
    batch_gradients`), compares ``(F̂+λI)⁻¹g`` with ``(F+λI)⁻¹g`` from the exact block
    (:func:`exact_reference`, solved once per ``λ``; :func:`fisherlab.metrics.direction_agreement`).

    Args:
        model: The network, or a :class:`~fisherlab.problem.Problem` (then ``loss_fn``, ``x``
            and ``y`` are left out and the problem's data, all batches, is captured).
        loss_fn: The loss (with a network).
        x: Batch inputs (with a network).
        y: Batch targets (with a network).
        methods: Method specs.
        dampings: Absolute ``λ`` values (default ``10^-6 … 10^1``, 15 values).
        fisher_type: Fisher type of the blocks (the gradient is always the loss gradient).

    Returns:
        Table ``directions`` with ``layer, method, damping, cosine, relative_error``.
    """
    lams = [10.0**e for e in torch.linspace(-6, 1, 15).tolist()] if dampings is None else dampings
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    grads = batch_gradients(_capture(model, loss_fn, x, y, "empirical", force=True)[0])
    rows = []
    for name in cap:
        exact = exact_reference(cap, name)
        g = grads[name]
        reference = {lam: exact.solve(g, lam) for lam in lams}  # once per λ, not per method
        for spec in methods:
            method, options = parse_method(spec)
            block = build_block(method, cap, name, **options)
            for lam in lams:
                q = direction_agreement(block.solve(g, lam), reference[lam])
                rows.append(
                    {
                        "layer": name,
                        "method": spec,
                        "damping": float(lam),
                        "cosine": q.cosine,
                        "relative_error": q.relative_error,
                    }
                )
    meta = {
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "methods": list(methods),
        "layers": [_layer_info(cap, name) for name in cap],
    }
    return FigureData("directions", {"directions": rows}, meta)
