"""Cosine of each method's damped natural gradient to the exact one, against damping."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fisherlab.analysis.setup import (
    APPROXIMATIONS,
    _capture,
    _layer_info,
    exact_reference,
    exact_spectrum,
)
from fisherlab.analysis.table import FigureData
from fisherlab.blocks import build_block, parse_method
from fisherlab.comparison import batch_gradients
from fisherlab.conventions import FisherlabError
from fisherlab.metrics import direction_agreement
from fisherlab.problem import Problem


def _parsed(methods: Sequence[str]) -> list[tuple[str, tuple[str, dict]]]:
    return [(spec, parse_method(spec)) for spec in methods]


def direction_quality_vs_damping(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    methods: Sequence[str] = APPROXIMATIONS,
    dampings: Sequence[float] | None = None,
    fisher_type: str | None = None,
    relative_dampings: Sequence[float] | None = None,
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
        relative_dampings: ``λ`` as multiples of each layer's largest eigenvalue ``λ_max``
            (instead of ``dampings``).

    Returns:
        Table ``directions`` with ``layer, method, baseline, damping, relative_damping
        (λ/λ_max of the layer), cosine, relative_error``, the baselines ``zero`` (``F̂ = 0``:
        ``g/λ``, the plain gradient's direction) and ``identity`` (``(tr F/P)·I``) included.
    """
    if dampings is not None and relative_dampings is not None:
        raise FisherlabError("give dampings= or relative_dampings=, not both")
    if dampings is None and relative_dampings is None:
        dampings = [10.0**e for e in torch.linspace(-6, 1, 15).tolist()]
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    grads = batch_gradients(_capture(model, loss_fn, x, y, "empirical", force=True)[0])
    rows = []
    for name in cap:
        exact = exact_reference(cap, name)
        values = exact_spectrum(cap, name)
        top, mean = float(values[0]), float(values.sum()) / len(values)
        if dampings is not None:
            lams = list(dampings)
            relative = {lam: lam / top if top > 0 else math.inf for lam in lams}
        else:
            relative = {r * top: r for r in relative_dampings}
            lams = list(relative)
        g = grads[name]
        reference = {lam: exact.solve(g, lam) for lam in lams}  # once per λ, not per method
        blocks = {spec: build_block(m, cap, name, **o) for spec, (m, o) in _parsed(methods)}
        for spec in ("zero", "identity", *blocks):
            for lam in lams:
                if spec == "zero":  # F̂ = 0: g/λ
                    d = g / lam
                elif spec == "identity":  # (tr F/P)·I
                    d = g / (mean + lam)
                else:
                    d = blocks[spec].solve(g, lam)
                q = direction_agreement(d, reference[lam])
                rows.append(
                    {
                        "layer": name,
                        "method": spec,
                        "baseline": spec in ("zero", "identity"),
                        "damping": float(lam),
                        "relative_damping": float(relative[lam]),
                        "lambda_max": top,
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
