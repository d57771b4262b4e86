"""Sorted eigenvalues of the exact block and of each approximation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fisherlab.analysis.setup import (
    APPROXIMATIONS,
    _capture,
    _layer_info,
    exact_spectrum,
)
from fisherlab.analysis.table import FigureData
from fisherlab.blocks import build_block, parse_method
from fisherlab.capture import Capture
from fisherlab.metrics import spectrum_distance
from fisherlab.problem import Problem


def rank_bound(cap: Capture, loss_fn: nn.Module) -> int:
    """Upper bound of a block's rank from the rows of its square root.

    ``N·R`` rows, but the true Fisher of softmax cross-entropy has ``R = C`` rows per sample
    that span at most ``C − 1`` dimensions (the softmax Hessian annihilates the all-ones
    vector), so its rank is at most ``N(C−1)``; the empirical Fisher's at most ``N``.
    """
    lc = next(iter(cap.values()))
    rows, n = lc.G.shape[0], lc.G.shape[1]
    if cap.fisher_type == "true" and isinstance(loss_fn, nn.CrossEntropyLoss):
        return n * (rows - 1)
    return n * rows


def spectra(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    methods: Sequence[str] = APPROXIMATIONS,
    fisher_type: str | None = None,
) -> FigureData:
    """All eigenvalues, descending, of the exact block and of each approximation, per layer.

    The exact spectrum comes from :func:`exact_spectrum` (the dense block or the Gram of the
    ``woodbury`` block, whichever is smaller; zeros beyond the rank ``R·N``), the
    approximations' from their own ``eigvalsh``.

    Returns:
        Tables ``eigenvalues`` (``layer, method, index, eigenvalue``; method ``"exact"`` for
        the reference) and ``distance`` (``layer, method, spectrum_distance``, the relative
        distance of sorted spectra).
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    rows, distance = [], []
    for name in cap:
        exact = exact_spectrum(cap, name)
        values = {"exact": exact}
        for spec in methods:
            method, options = parse_method(spec)
            values[spec] = build_block(method, cap, name, **options).eigvalsh().flip(0)
            distance.append(
                {
                    "layer": name,
                    "method": spec,
                    "spectrum_distance": spectrum_distance(exact, values[spec]),
                }
            )
        for spec, v in values.items():
            rows += [
                {"layer": name, "method": spec, "index": i, "eigenvalue": float(e)}
                for i, e in enumerate(v.tolist())
            ]
    meta = {"fisher_type": fisher_type, "batch_size": cap.num_samples, "methods": list(methods)}
    meta["rank_bound"] = rank_bound(cap, model.loss_fn if isinstance(model, Problem) else loss_fn)
    meta["layers"] = [_layer_info(cap, name) for name in cap]
    return FigureData("spectra", {"eigenvalues": rows, "distance": distance}, meta)
