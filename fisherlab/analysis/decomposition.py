r"""Where an approximation's error comes from, along training: structure, estimation, staleness.

At a checkpoint with parameters :math:`θ_t`, let :math:`F` be the exact Fisher block of a layer
over a fixed reference set (:func:`~fisherlab.analysis.trajectory.reference_problem`), and, for
one method (KFAC, EKFAC, diagonal):

* :math:`\hat F_{\rm ref}`: the approximation built from the reference set at :math:`θ_t`;
* :math:`\hat F_b`: built from one mini-batch of size ``b`` at :math:`θ_t`;
* :math:`\hat F_{\rm stale}`: built from the reference set ``lag`` steps earlier, at
  :math:`θ_{t-k}` (KFAC's factors, the diagonal: all old; EKFAC: the old basis with the scalings
  of the reference set at :math:`θ_t`, as EKFAC re-estimates them every step);
* :math:`\hat F_{\rm deployed}`: what an optimizer holds: built from a batch ``lag`` steps
  earlier (EKFAC: the basis of that batch, the scalings of a batch at :math:`θ_t`).

All relative to :math:`\|F\|_F`:

* **structural** :math:`\|\hat F_{\rm ref} - F\|_F` — what the method cannot represent even with
  all the data;
* **estimation** :math:`\|\hat F_b - \hat F_{\rm ref}\|_F` — the noise of one batch (mean and sd
  over ``batches`` disjoint batches);
* **staleness** :math:`\|\hat F_{\rm stale} - \hat F_{\rm ref}\|_F` — the drift of the
  parameters over ``lag`` steps;
* **total** :math:`\|\hat F_{\rm deployed} - F\|_F`.

The three terms are distances between different pairs of matrices; by the triangle inequality
the total is at most structural + staleness + the estimation error of the old batch, so the
stacked terms are an (approximate) upper bound of the total, not a partition of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.analysis.setup import _layer_info
from fisherlab.analysis.table import FigureData
from fisherlab.analysis.trajectory import Trajectory, reference_problem
from fisherlab.blocks import build, curvature, curvatures, parse_method
from fisherlab.capture import capture
from fisherlab.conventions import FisherlabError
from fisherlab.metrics import scale_controls
from fisherlab.problem import Problem

DECOMPOSITION_METHODS = ("kfac", "ekfac", "diag")
"""Methods of :func:`error_decomposition` by default."""

TERMS = ("structural", "estimation", "staleness")
"""The error terms, in stacking order."""


def sample_batches(n: int, batch_size: int, count: int, seed: int) -> list[Tensor]:
    """``count`` disjoint index sets of size ``batch_size`` from a seeded permutation of ``n``."""
    if count * batch_size > n:
        raise FisherlabError(f"{count} batches of {batch_size} need {count * batch_size} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def _stale(method: str, options: dict, old: Any, problem: Problem) -> Any:
    """The blocks ``lag`` steps old, completed as the method does at the current step."""
    if method == "ekfac":  # the old basis, scalings of the current data
        return build("ekfac", problem, **{**options, "basis": old})
    return old


def _relative(a: Tensor, b: Tensor, norm: float) -> float:
    return float(torch.linalg.matrix_norm(a - b)) / norm if norm > 0 else 0.0


def error_decomposition(
    trajectory: Trajectory,
    loss_fn: nn.Module,
    x_ref: Tensor,
    y_ref: Tensor,
    steps: Sequence[int],
    lag: int,
    batch_size: int = 64,
    batches: int = 3,
    methods: Sequence[str] = DECOMPOSITION_METHODS,
    fisher_type: str = "true",
    seed: int = 0,
) -> FigureData:
    """Structural, estimation and staleness errors per layer and method at each checkpoint.

    Args:
        trajectory: Checkpoints at every ``step`` and at ``step - lag``.
        loss_fn: The loss.
        x_ref: Reference-set inputs (e.g. the training set).
        y_ref: Reference-set targets.
        steps: Checkpoints to evaluate (each needs ``step - lag`` too, ``step ≥ lag``).
        lag: Steps of staleness ``k``.
        batch_size: ``b`` of the batch-built approximations.
        batches: Disjoint batches averaged at each checkpoint (another ``batches`` at the old
            checkpoint, for the deployed approximation).
        methods: Method specs.
        fisher_type: Fisher type of every matrix.
        seed: Seed of the batches.

    Returns:
        Table ``errors`` (``step, epoch, loss, accuracy, n_eff, layer, method, structural,
        structural_scaled, structural_trace, estimation, estimation_sd, staleness, total,
        total_sd, total_scaled``; relative to ``‖F‖_F``; ``_scaled``: after the optimal scalar
        ``α*``, ``_trace``: after trace matching, :class:`fisherlab.metrics.ScaleControls`).
    """
    specs = [(spec, *parse_method(spec)) for spec in methods]
    rows: list[dict[str, Any]] = []
    index = sample_batches(len(x_ref), batch_size, 2 * batches, seed)
    layers: list[dict[str, Any]] = []
    for step in steps:
        if step < lag:
            raise FisherlabError(f"step {step} has no checkpoint {lag} steps earlier")
        state = trajectory.state_at(step, loss_fn, x_ref, y_ref)
        model, old_model = trajectory.model_at(step), trajectory.model_at(step - lag)
        ref = reference_problem(model, loss_fn, x_ref, y_ref, fisher_type)
        old_ref = reference_problem(old_model, loss_fn, x_ref, y_ref, fisher_type)
        exact = curvature("exact", ref)
        built = curvatures(ref, methods)
        old = curvatures(old_ref, methods)

        def on_batch(m: nn.Module, i: Tensor) -> Problem:
            return Problem(m, loss_fn, (x_ref[i], y_ref[i]), fisher_type=fisher_type)

        now_b = [curvatures(on_batch(model, i), methods) for i in index[:batches]]
        old_b = [curvatures(on_batch(old_model, i), methods) for i in index[batches:]]
        stale = {spec: _stale(m, o, old[spec], ref) for spec, m, o in specs}
        deployed = {
            spec: [
                _stale(m, o, ob[spec], on_batch(model, i)) if m == "ekfac" else ob[spec]
                for ob, i in zip(old_b, index[:batches])
            ]
            for spec, m, o in specs
        }
        if not layers:
            cap = capture(model, loss_fn, x_ref[:2], y_ref[:2])
            layers = [_layer_info(cap, name) for name in cap]
        for name, block in exact.items():
            f = block.to_dense()
            norm = float(torch.linalg.matrix_norm(f))
            for spec, _, _ in specs:
                a_ref = built[spec][name].to_dense()
                est = torch.tensor(
                    [_relative(b[spec][name].to_dense(), a_ref, norm) for b in now_b]
                )
                dep = [d[name].to_dense() for d in deployed[spec]]
                tot = torch.tensor([_relative(d, f, norm) for d in dep])
                tot_scaled = torch.tensor([scale_controls(f, d).scaled for d in dep])
                controls = scale_controls(f, a_ref)
                rows.append(
                    {
                        **state,
                        "layer": name,
                        "method": spec,
                        "structural": _relative(a_ref, f, norm),
                        "structural_scaled": controls.scaled,
                        "structural_trace": controls.trace_matched,
                        "estimation": float(est.mean()),
                        "estimation_sd": float(est.std()) if batches > 1 else 0.0,
                        "staleness": _relative(stale[spec][name].to_dense(), a_ref, norm),
                        "total": float(tot.mean()),
                        "total_sd": float(tot.std()) if batches > 1 else 0.0,
                        "total_scaled": float(tot_scaled.mean()),
                    }
                )
    meta = {
        "fisher_type": fisher_type,
        "reference": f"{len(x_ref)} training samples",
        "batch_size": batch_size,
        "batches": batches,
        "lag": lag,
        "methods": list(methods),
        "layers": layers,
        **trajectory.settings,
        "final": trajectory.at(max(steps)).describe(),
    }
    return FigureData("decomposition", {"errors": rows}, meta)


__all__ = ["DECOMPOSITION_METHODS", "TERMS", "error_decomposition", "sample_batches"]
