r"""EKFAC Fig. 3 (right) and Fig. 5c under the paper's protocol: a basis fixed at step 0.

Protocol (EKFAC paper, Sec. 4 and Fig. 5c): the **empirical** Fisher, the Kronecker-factored
eigenbasis computed once at the start of training (or, as an option, every ``basis_every``
steps) and kept while the network trains to a low loss, and every approximation compared with
the exact Fisher block of the **training set** at each checkpoint. Series per layer:

* ``kfac``: KFAC's factors from the reference set at the last basis computation (frozen);
* ``ekfac``: that basis, with the scalings ``s`` of the reference set at the checkpoint (EKFAC
  re-estimates them every step; here from all the data, so no batch noise enters);
* ``ekfac-ra``: that basis, with scalings the running average (``decay``) of every training
  batch's scalings since the basis was computed — fisherlab's EKFAC-ra
  (:class:`fisherlab.optim.EKFAC` with ``running_average=True``).
* ``kfac-trace``: the frozen KFAC times ``tr F_t / tr K₀`` (a scalar an optimizer can track;
  the control that separates the Fisher shrinking from the frozen factors' shape going wrong);
* ``kfac-fresh``: KFAC of the reference set at the checkpoint (recomputed; not in the paper,
  the structural floor of Kronecker factors).

Controls in every row: the error after the optimal scalar ``α* = ⟨F,F̂⟩/‖F̂‖²`` and after trace
matching (:class:`fisherlab.metrics.ScaleControls`), the spectrum distance after each scalar,
``‖F_t‖_F/‖F_0‖_F`` (how far the Fisher itself has moved in scale) and ``n_eff`` of the
empirical Fisher of the reference set.

Metrics: relative Frobenius error ``‖F̂−F‖_F/‖F‖_F`` and the relative distance of sorted spectra
(:func:`fisherlab.metrics.spectrum_distance`): the error from dense matrices, the
approximations' eigenvalues from their factors (KFAC) or scalings (EKFAC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fisherlab.analysis.setup import _layer_info
from fisherlab.analysis.table import FigureData
from fisherlab.analysis.trajectory import Trajectory, reference_problem
from fisherlab.blocks import LayerStats, build, builder, curvature
from fisherlab.capture import capture
from fisherlab.metrics import scale_controls, spectrum, spectrum_distance

EKFAC_SERIES = ("kfac", "kfac-trace", "ekfac", "ekfac-ra", "kfac-fresh")
"""Series of :func:`ekfac_protocol`."""


def ekfac_protocol(
    trajectory: Trajectory,
    loss_fn: nn.Module,
    x_ref: Tensor,
    y_ref: Tensor,
    steps: Sequence[int],
    basis_every: int | None = None,
    decay: float = 0.95,
    fisher_type: str = "empirical",
) -> FigureData:
    """KFAC, EKFAC and EKFAC-ra with a fixed (or amortised) basis against the reference Fisher.

    Args:
        trajectory: A trajectory with a checkpoint at every step up to ``max(steps)`` (for the
            running average; :func:`~fisherlab.analysis.trajectory.train_trajectory` with
            ``checkpoints=None``), or one without recorded batches (a user's checkpoint files,
            :func:`~fisherlab.analysis.load_trajectory`): then the basis is that of the first
            of ``steps`` and EKFAC-ra, which replays the batches, is left out.
        loss_fn: The loss.
        x_ref: Reference set (the training set).
        y_ref: Reference targets.
        steps: Checkpoints evaluated.
        basis_every: Steps between basis (and frozen-KFAC) recomputations; ``None``: once, at
            step 0 (Fig. 5c).
        decay: Running-average decay of EKFAC-ra's scalings.
        fisher_type: ``"empirical"`` (the paper's), or another type.

    Returns:
        Table ``curves`` (``step, epoch, loss, accuracy, n_eff, basis_step, layer, method,
        rel_frobenius, rel_frobenius_scaled, rel_frobenius_trace, alpha, trace_ratio,
        spectrum_distance, spectrum_distance_scaled, spectrum_distance_trace, fisher_norm_ratio``).
    """
    last = max(steps)
    wanted = set(steps)
    rows: list[dict[str, Any]] = []
    frozen: dict[str, Any] = {}
    average: dict[str, Any] = {}  # EKFAC-ra's builders, per layer
    layers: list[dict[str, Any]] = []
    first_norm: dict[str, float] = {}
    basis_step = 0
    # the running average replays every update's batch; a trajectory of checkpoint files has none
    replay = len(trajectory.batches) >= last
    order = list(range(last + 1)) if replay else sorted(wanted)
    for step in order:
        model = trajectory.model_at(step)
        refresh = step == order[0] or (basis_every is not None and step % basis_every == 0)
        ref = None
        if refresh:
            ref = reference_problem(model, loss_fn, x_ref, y_ref, fisher_type)
            frozen = {"kfac": curvature("kfac", ref), "ekfac": curvature("ekfac", ref)}
            average = {}
            basis_step = step
        if step in wanted:
            ref = ref or reference_problem(model, loss_fn, x_ref, y_ref, fisher_type)
            exact = curvature("exact", ref)
            blocks = {
                "kfac": frozen["kfac"],
                "ekfac": build("ekfac", ref, basis=frozen["ekfac"]),
                "kfac-fresh": curvature("kfac", ref),
            }
            state = trajectory.state_at(step, loss_fn, x_ref, y_ref)
            if not layers:
                cap = capture(model, loss_fn, x_ref[:2], y_ref[:2])
                layers = [_layer_info(cap, name) for name in cap]
            for name, block in exact.items():
                f = block.to_dense()
                norm = float(f.norm())
                first_norm.setdefault(name, norm)
                reference = spectrum(f).clamp_min(0)
                dense = {k: v[name].to_dense() for k, v in blocks.items()}
                values = {k: spectrum(v[name]) for k, v in blocks.items()}  # own eigvalsh
                tau = float(f.trace()) / float(dense["kfac"].trace())
                dense["kfac-trace"], values["kfac-trace"] = (
                    tau * dense["kfac"],
                    tau * values["kfac"],
                )
                if name in average:
                    ra = average[name].block()
                    dense["ekfac-ra"], values["ekfac-ra"] = ra.to_dense(), spectrum(ra)
                for method in EKFAC_SERIES:
                    if method not in dense:
                        continue
                    controls = scale_controls(f, dense[method])
                    v = values[method]
                    rows.append(
                        {
                            **state,
                            "basis_step": basis_step,
                            "layer": name,
                            "method": method,
                            **controls.columns(),
                            "spectrum_distance": spectrum_distance(reference, v),
                            "spectrum_distance_scaled": spectrum_distance(
                                reference, controls.optimal_scalar * v
                            ),
                            "spectrum_distance_trace": spectrum_distance(
                                reference, controls.trace_ratio * v
                            ),
                            "fisher_norm_ratio": norm / first_norm[name],
                        }
                    )
        if replay and step < last:  # the batch of update `step`, at the parameters it started from
            index = trajectory.batches[step]
            cap = capture(model, loss_fn, x_ref[index], y_ref[index], fisher_type=fisher_type)
            for name, lc in cap.items():  # EKFAC-ra: a running-average builder in the fixed basis
                first = name not in average
                if first:
                    basis = {name: frozen["ekfac"][name].basis}
                    average[name] = builder(
                        "ekfac", lc.layer, fisher_type, normalise="batch", basis=basis
                    )
                weights = (0.0, 1.0) if first else (decay, 1.0 - decay)
                average[name].add(LayerStats(lc.A, lc.G, cap.normaliser), *weights)
    meta = {
        "fisher_type": fisher_type,
        "reference": f"training set ({len(x_ref)} samples)",
        "basis_every": basis_every,
        "basis": "fixed at step 0" if basis_every is None else f"every {basis_every} steps",
        "decay": decay,
        "layers": layers,
        "series": list(EKFAC_SERIES),
        **trajectory.settings,
        "final": trajectory.at(last).describe(),
    }
    return FigureData("ekfac_protocol", {"curves": rows}, meta)


__all__ = ["EKFAC_SERIES", "ekfac_protocol"]
