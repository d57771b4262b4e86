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
from fisherlab.comparison import data_gradients
from fisherlab.conventions import FisherlabError
from fisherlab.exact import exact_fisher
from fisherlab.linalg import add_to_diagonal
from fisherlab.metrics import frobenius_error, whitened_inverse_error
from fisherlab.problem import Problem

BASELINES = ("zero", "identity")
"""Trivial approximations beside every method: ``F̂ = 0`` (inverse ``I/λ``, direction the plain
gradient) and the scaled identity ``(tr F/P)·I`` (direction also parallel to the gradient)."""


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
        units of 1/F) and ``summary`` (``method, baseline, rel_frobenius_block,
        rel_frobenius_inverse, whitened_error, direction_cosine``), with the baselines of
        :data:`BASELINES` as rows of their own. ``rel_frobenius_inverse`` is the paper's metric
        (which ``I/λ`` wins at small damping: stated only beside that baseline);
        ``whitened_error`` is ``‖E^{-1/2}(F̂+λI)^{-1}E^{-1/2} − I‖_F/√P`` with ``E`` the exact
        inverse (:func:`fisherlab.metrics.whitened_inverse_error`; with ``reference="block"``
        ``E^{-1} = F_ll+λI``), and ``direction_cosine`` the cosine of ``(F̂+λI)⁻¹g_l`` to the
        layer's part of the exact damped natural gradient (``g``: the loss gradient of the data).
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    name = layer if layer is not None else choose_layer(cap, max_params)
    exact = build_block("exact", cap, name)
    dense = exact.to_dense()
    size = exact.size
    lam = float(damping) if damping is not None else relative_damping * float(dense.trace()) / size
    eye = torch.eye(size, dtype=dense.dtype)
    shown = min(size, max_params)
    problem = (
        model if isinstance(model, Problem) else _as_problem(model, loss_fn, x, y, fisher_type)
    )
    grads = data_gradients(problem)
    g = grads[name].to(dense)
    if reference == "network":
        full = exact_fisher(problem)
        s = full.slices[name]
        inv = torch.linalg.solve(
            add_to_diagonal(full.matrix, lam),
            torch.eye(len(full.matrix), dtype=full.matrix.dtype),
        )
        inverses = {"exact": inv[s, s]}
        g_all = torch.cat([grads[n].reshape(-1).to(dense) for n in full.slices])
        target = (inv @ g_all)[s]
    elif reference == "block":
        inverses = {"exact": exact.solve(eye, lam)}
        target = inverses["exact"] @ g
    else:
        raise FisherlabError(f"reference must be 'block' or 'network', got {reference!r}")
    # the curvature whose damped inverse is the exact one: E⁻¹ − λI (F_ll for "block")
    effective = torch.linalg.solve(inverses["exact"], eye) - lam * eye
    effective = (effective + effective.T) / 2
    approximations = {
        "zero": torch.zeros_like(dense),
        "identity": float(dense.trace()) / size * eye,
    }
    for spec in methods:
        method, options = parse_method(spec)
        approximations[spec] = build_block(method, cap, name, **options).to_dense()
    summary = []
    for spec, f_hat in approximations.items():
        inverses[spec] = torch.linalg.solve(add_to_diagonal(f_hat, lam), eye)
        inverses[spec] = (inverses[spec] + inverses[spec].T) / 2
        d = inverses[spec] @ g
        summary.append(
            {
                "method": spec,
                "baseline": spec in BASELINES,
                "rel_frobenius_block": frobenius_error(dense, f_hat),
                "rel_frobenius_inverse": frobenius_error(inverses["exact"], inverses[spec]),
                "whitened_error": whitened_inverse_error(effective, f_hat, lam),
                "direction_cosine": float(d @ target / (d.norm() * target.norm())),
            }
        )
    for spec in BASELINES:  # in the summary, not drawn as heatmaps
        inverses.pop(spec)
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
