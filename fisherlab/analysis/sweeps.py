r"""Sweeps against the Fisher of a reference set: batch size, SKFAC spatial samples, Fisher type.

* :func:`batch_size_sweep`: the exact block of one batch (what TENGraD/Woodbury inverts) and
  KFAC/EKFAC built from the same batch, against the reference Fisher ``F``, for batch sizes
  from 16 to the whole set: relative Frobenius error and the cosine of the damped natural
  gradient ``(F̂+λI)⁻¹g`` to ``(F+λI)⁻¹g`` (``g``: the reference set's loss gradient, the same
  for every method, so that only the curvature differs).
* :func:`spatial_sweep`: SKFAC's spatial subsampling with ``s'`` positions per sample, its
  reduce-sum, and KFAC's expand factors, on convolutions.
* :func:`fisher_type_comparison`: true, Monte-Carlo and empirical Fisher of the same
  checkpoints, and KFAC's structural error under each.

Every error is from dense matrices (small networks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.analysis.decomposition import sample_batches
from fisherlab.analysis.table import FigureData
from fisherlab.analysis.trajectory import Trajectory, reference_problem
from fisherlab.blocks import curvature, curvatures
from fisherlab.comparison import data_gradients
from fisherlab.linalg import add_to_diagonal
from fisherlab.metrics import frobenius_error, scale_controls
from fisherlab.problem import Problem

BATCH_METHODS = ("exact", "kfac", "ekfac")
"""Methods of :func:`batch_size_sweep`: ``exact`` is the batch's own block (TENGraD's)."""


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _direction(f: Tensor, g: Tensor, lam: float) -> Tensor:
    return torch.linalg.solve(add_to_diagonal(f, lam), g)


def batch_size_sweep(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    sizes: Sequence[int],
    repeats: int = 20,
    relative_damping: float = 0.1,
    methods: Sequence[str] = BATCH_METHODS,
    fisher_type: str = "empirical",
    seed: int = 0,
) -> FigureData:
    """Error and direction cosine of batch-built blocks against the reference Fisher.

    Args:
        model: The network.
        loss_fn: The loss.
        x: Reference set inputs (batches are drawn from it; a size ``≥ len(x)`` is the set).
        y: Reference set targets.
        sizes: Batch sizes.
        repeats: Disjoint batches per size (as many as fit when fewer; one for the whole set).
        relative_damping: ``λ = relative_damping · tr(F)/P`` per layer.
        methods: Method specs built from each batch.
        fisher_type: Fisher type of every matrix.
        seed: Seed of the batches.

    Returns:
        Table ``sweep`` (``batch_size, repeat, layer, method, rel_frobenius,
        rel_frobenius_scaled, rel_frobenius_trace, alpha, trace_ratio, cosine``), with the
        baseline ``gradient`` (``F̂ = 0``: the direction ``g``; errors of the zero matrix) once
        per size.
    """
    ref = reference_problem(model, loss_fn, x, y, fisher_type)
    exact = {name: b.to_dense() for name, b in curvature("exact", ref).items()}
    grads = data_gradients(ref)
    lams = {n: relative_damping * float(f.trace()) / len(f) for n, f in exact.items()}
    target = {n: _direction(f, grads[n], lams[n]) for n, f in exact.items()}
    rows: list[dict[str, Any]] = []
    for size in sizes:
        size = min(int(size), len(x))
        count = 1 if size == len(x) else min(repeats, len(x) // size)
        for r, index in enumerate(sample_batches(len(x), size, count, seed + size)):
            batch = Problem(model, loss_fn, (x[index], y[index]), fisher_type=fisher_type)
            built = curvatures(batch, methods)
            for name, f in exact.items():
                for spec in methods:
                    approx = built[spec][name].to_dense()
                    d = _direction(approx, grads[name], lams[name])
                    rows.append(
                        {
                            "batch_size": size,
                            "repeat": r,
                            "layer": name,
                            "method": spec,
                            **scale_controls(f, approx).columns(),
                            "cosine": _cos(d, target[name]),
                        }
                    )
                if r == 0:  # the baseline does not depend on the batch
                    rows.append(
                        {
                            "batch_size": size,
                            "repeat": r,
                            "layer": name,
                            "method": "gradient",
                            **scale_controls(f, torch.zeros_like(f)).columns(),
                            "cosine": _cos(grads[name], target[name]),
                        }
                    )
    meta = {
        "fisher_type": fisher_type,
        "reference": f"{len(x)} training samples",
        "relative_damping": relative_damping,
        "repeats": repeats,
        "methods": list(methods),
        "layers": list(exact),
        "statistic": "median over batches",
    }
    return FigureData("batch_size", {"sweep": rows}, meta)


def spatial_methods(samples: Sequence[int] = (1, 2, 4, 8)) -> list[str]:
    """SKFAC with ``s'`` subsampled positions, SKFAC reduce-sum, and KFAC (expand)."""
    sub = [f"skfac:conv_reduction=subsample,spatial_samples={s}" for s in samples]
    return [*sub, "skfac", "kfac"]


def spatial_sweep(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    samples: Sequence[int] = (1, 2, 4, 8),
    batch_size: int = 64,
    repeats: int = 3,
    fisher_type: str = "empirical",
    seed: int = 0,
) -> FigureData:
    """SKFAC's error against ``s'`` (subsampling), reduce-sum and expand, on convolutions.

    Each method is built from the reference set (``source = "reference"``: its structural
    error) and from ``repeats`` batches of ``batch_size`` (``"batch"``, each with another seed of
    the subsampled positions), and compared with the reference set's exact block.

    Returns:
        Table ``sweep`` (``source, repeat, layer, T, method, spatial_samples, rel_frobenius``;
        ``spatial_samples`` 0 for reduce-sum and -1 for expand), convolution layers only.
    """
    ref = reference_problem(model, loss_fn, x, y, fisher_type)
    exact = curvature("exact", ref)
    convs = [n for n, b in exact.items() if isinstance(b.layer.module, nn.Conv2d)]
    exact = {n: exact[n].to_dense() for n in convs}
    sources: list[tuple[str, int, Problem]] = [("reference", 0, ref)]
    for r, index in enumerate(sample_batches(len(x), batch_size, repeats, seed)):
        batch = Problem(model, loss_fn, (x[index], y[index]), fisher_type=fisher_type)
        sources.append(("batch", r, batch))
    rows: list[dict[str, Any]] = []
    for source, r, problem in sources:
        specs = [s.replace("subsample,", f"subsample,seed={r},") for s in spatial_methods(samples)]
        built = curvatures(problem, specs, names=convs)
        for spec, plain in zip(specs, spatial_methods(samples)):
            count = int(plain.rsplit("=", 1)[1]) if "spatial_samples" in plain else 0
            count = -1 if plain == "kfac" else count
            for name in convs:
                rows.append(
                    {
                        "source": source,
                        "repeat": r,
                        "layer": name,
                        "method": plain,
                        "spatial_samples": count,
                        "rel_frobenius": frobenius_error(exact[name], built[spec][name].to_dense()),
                    }
                )
    meta = {
        "fisher_type": fisher_type,
        "reference": f"{len(x)} training samples",
        "batch_size": batch_size,
        "repeats": repeats,
        "samples": list(samples),
        "layers": convs,
    }
    return FigureData("spatial", {"sweep": rows}, meta)


FISHER_TYPES = ("true", "mc", "empirical")
"""Fisher types of :func:`fisher_type_comparison`."""


def fisher_type_comparison(
    trajectory: Trajectory,
    loss_fn: nn.Module,
    x_ref: Tensor,
    y_ref: Tensor,
    steps: Sequence[int],
    mc_samples: int = 1,
) -> FigureData:
    """True, Monte-Carlo and empirical Fisher of the same checkpoints, and KFAC under each.

    Returns:
        Table ``types`` (``step, epoch, loss, accuracy, n_eff, layer, fisher_type, to_true``:
        ``‖F_type − F_true‖/‖F_true‖``, ``kfac`` and ``ekfac``: the structural error of
        KFAC/EKFAC built from the reference set of that type against its exact block,
        ``kfac_scaled``: KFAC's after the optimal scalar).
    """
    rows: list[dict[str, Any]] = []
    for step in steps:
        model = trajectory.model_at(step)
        state = trajectory.state_at(step, loss_fn, x_ref, y_ref)
        base = reference_problem(model, loss_fn, x_ref, y_ref, "true")
        true = None
        for kind in FISHER_TYPES:
            problem = base if kind == "true" else base.with_fisher_type(kind, mc_samples)
            exact = {n: b.to_dense() for n, b in curvature("exact", problem).items()}
            built = curvatures(problem, ["kfac", "ekfac"])
            true = exact if kind == "true" else true
            for name, f in exact.items():
                rows.append(
                    {
                        **state,
                        "layer": name,
                        "fisher_type": kind,
                        "to_true": frobenius_error(true[name], f),
                        "kfac": frobenius_error(f, built["kfac"][name].to_dense()),
                        "kfac_scaled": scale_controls(f, built["kfac"][name].to_dense()).scaled,
                        "ekfac": frobenius_error(f, built["ekfac"][name].to_dense()),
                    }
                )
    meta = {
        "fisher_type": "true, mc, empirical",
        "mc_samples": mc_samples,
        "reference": f"{len(x_ref)} training samples",
        **trajectory.settings,
        "final": trajectory.at(max(steps)).describe(),
    }
    return FigureData("fisher_types", {"types": rows}, meta)


__all__ = [
    "BATCH_METHODS",
    "FISHER_TYPES",
    "batch_size_sweep",
    "fisher_type_comparison",
    "spatial_methods",
    "spatial_sweep",
]
