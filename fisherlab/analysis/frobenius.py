"""Relative Frobenius error per layer and method, over models and batches."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fisherlab.analysis.setup import (
    APPROXIMATIONS,
    _capture,
)
from fisherlab.analysis.table import FigureData
from fisherlab.blocks import build_block, parse_method
from fisherlab.metrics import fisher_norm_sq, frobenius_at_scale


def frobenius_errors(
    models_: Sequence[nn.Module],
    loss_fn: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    methods: Sequence[str] = APPROXIMATIONS,
    fisher_type: str = "true",
) -> FigureData:
    r"""Relative Frobenius error :math:`\|F̂-F\|_F/\|F\|_F` per layer and method.

    Every model (e.g. one per seed) is evaluated on every batch. Errors come from the captured
    statistics and the Gram of the exact block (:func:`fisherlab.metrics.frobenius_at_scale`),
    exact up to rounding and never forming a ``P×P`` matrix.

    Returns:
        Table ``errors`` with ``seed`` (index into ``models_``), ``batch``, ``layer``, ``P``,
        ``method``, ``rel_frobenius``.
    """
    specs = [(spec, *parse_method(spec)) for spec in methods]
    rows = []
    for seed, model in enumerate(models_):
        for b, (x, y) in enumerate(batches):
            cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
            for name, lc in cap.items():
                f_sq = fisher_norm_sq(lc, cap.normaliser)
                for spec, method, options in specs:
                    block = build_block(method, cap, name, **options)
                    error, norm = frobenius_at_scale(block, lc, cap.normaliser, f_sq)
                    rows.append(
                        {
                            "seed": seed,
                            "batch": b,
                            "layer": name,
                            "P": lc.layer.num_params,
                            "method": spec,
                            "rel_frobenius": error / norm if norm > 0 else 0.0,
                        }
                    )
    meta = {
        "fisher_type": fisher_type,
        "models": len(models_),
        "batches": len(batches),
        "batch_size": len(batches[0][0]),
        "methods": list(methods),
    }
    return FigureData("frobenius", {"errors": rows}, meta)
