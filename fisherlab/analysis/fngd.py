r"""A test of FNGD's hypothesis: are natural-gradient coefficients shareable across epochs?

FNGD (Sec. IV-B) writes the damped natural gradient of a batch as a weighted sum of its
per-sample gradients, :math:`d = J^\top w` with :math:`w = (νλI + K)^{-1}\mathbf 1` and
:math:`K = JJ^\top` (per layer, empirical Fisher, :math:`ν = N`), computes :math:`w` during the
first epoch and reuses the weights of step ``i`` of epoch 1 at step ``i`` of every later epoch,
with that step's (reshuffled) batch. The paper's hypothesis: the weights depend only on the
samples' correlation, which does not change, so the shared-weight direction stays the natural
gradient.

At steps of later epochs, per layer and damping, this compares three directions of the same
batch at the same parameters:

* ``fresh``: :math:`J_t^\top w_t`, the damped natural gradient of the batch (TENGraD's step);
* ``shared``: :math:`J_t^\top w_i`, the weights of step ``i`` of epoch 1;
* ``permuted``: :math:`J_t^\top π(w_i)`, the same weights randomly permuted over the batch
  (a control: weights that carry no information about which sample they belong to);
* ``gradient``: :math:`J_t^\top \mathbf 1/ν`, the plain batch gradient;

and reports the cosines of ``shared``, ``permuted`` and ``gradient`` to ``fresh``. If the
hypothesis holds, the shared direction is closer to the natural gradient than the plain gradient
*and* than the permuted weights (else the sharing carries no sample information: each epoch
reshuffles the batches, so the sample at position ``n`` of step ``i`` is another one). The damping
is FNGD's ``"frobenius"`` mode, :math:`νλ = δ\|K\|_F` (scale-free: :math:`λ = δ\|F_B\|_F`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.analysis.table import FigureData
from fisherlab.analysis.trajectory import Trajectory
from fisherlab.capture import capture
from fisherlab.conventions import FisherlabError


def coefficients(J: Tensor, delta: float) -> Tensor:
    """FNGD's weights ``w = (νλI + K)⁻¹1`` with ``νλ = δ‖K‖_F``, for rows ``J`` (``[N, P]``)."""
    K = J @ J.T
    shift = delta * float(torch.linalg.matrix_norm(K))
    eye = torch.eye(len(K), dtype=K.dtype, device=K.device)
    return torch.linalg.solve(K + shift * eye, torch.ones(len(K), dtype=K.dtype))


def _rows(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> tuple[dict, float]:
    cap = capture(model, loss_fn, x, y, fisher_type="empirical")
    return {name: lc.jacobian_rows()[0] for name, lc in cap.items()}, cap.normaliser


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def coefficient_sharing(
    trajectory: Trajectory,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: Sequence[int],
    dampings: Sequence[float] = (1e-4, 1e-2, 1.0),
    positions: Sequence[int] = (0, 1, 2, 3),
    seed: int = 0,
) -> FigureData:
    """Cosines of the shared-weight and plain-gradient directions to the fresh natural gradient.

    Args:
        trajectory: Checkpoints at every step of the epochs used (``checkpoints=None``).
        loss_fn: The loss.
        x: The training set the trajectory used (its batches index into it).
        y: Training targets.
        epochs: Later epochs (``≥ 1``; epoch 0 is where the weights come from) evaluated.
        dampings: ``δ`` of ``νλ = δ‖K‖_F``.
        positions: Step indices within an epoch evaluated (the spread gives the bands).
        seed: Seed of the control's permutation (``seed + step`` per evaluated step; the same
            permutation for every layer and damping).

    Returns:
        Table ``cosines`` (``epoch, position, step, loss, accuracy, n_eff, damping, layer,
        shared, permuted, gradient``; layer ``"network"``: all layers' directions
        concatenated; ``n_eff`` of the whole training set ``(x, y)``).
    """
    per_epoch = trajectory.settings["steps_per_epoch"]
    rows: list[dict[str, Any]] = []
    for i in positions:
        if i >= per_epoch:
            raise FisherlabError(f"position {i} is beyond the {per_epoch} steps of an epoch")
        then, _ = _rows(trajectory.model_at(i), loss_fn, *_batch(trajectory, i, x, y))
        weights = {d: {n: coefficients(J, d) for n, J in then.items()} for d in dampings}
        for epoch in epochs:
            if epoch < 1:
                raise FisherlabError("epochs must be ≥ 1: the weights come from epoch 0")
            step = epoch * per_epoch + i
            now, nu = _rows(trajectory.model_at(step), loss_fn, *_batch(trajectory, step, x, y))
            state = trajectory.state_at(step, loss_fn, x, y)
            shuffle = permutation(len(next(iter(now.values()))), seed + step)
            for d in dampings:
                dirs: dict[str, list[Tensor]] = {k: [] for k in DIRECTIONS}
                for name, J in now.items():
                    found = {
                        "fresh": J.T @ coefficients(J, d),
                        "shared": J.T @ weights[d][name],
                        "permuted": J.T @ weights[d][name][shuffle],
                        "gradient": J.T @ torch.ones(len(J), dtype=J.dtype) / nu,
                    }
                    for k, v in found.items():
                        dirs[k].append(v)
                    rows.append(_row(state, epoch, i, d, name, found))
                cat = {k: torch.cat(v) for k, v in dirs.items()}
                rows.append(_row(state, epoch, i, d, "network", cat))
    meta = {
        "fisher_type": "empirical",
        "reference": "each step's own batch (FNGD's object)",
        "dampings": list(dampings),
        "damping_mode": "frobenius: νλ = δ‖K‖_F",
        "epochs": list(epochs),
        "positions": list(positions),
        **trajectory.settings,
        "final": trajectory.checkpoints[-1].describe(),
    }
    return FigureData("fngd", {"cosines": rows}, meta)


def _batch(trajectory: Trajectory, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    index = trajectory.batches[step]
    return x[index], y[index]


def permutation(n: int, seed: int) -> Tensor:
    """The control's permutation of a batch of ``n``: ``torch.randperm`` seeded by ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _row(state, epoch, i, d, layer, found: dict[str, Tensor]) -> dict[str, Any]:
    return {
        **state,
        "epoch": epoch,
        "position": i,
        "damping": float(d),
        "layer": layer,
        **{k: _cos(found[k], found["fresh"]) for k in DIRECTIONS if k != "fresh"},
    }


DIRECTIONS = ("fresh", "shared", "permuted", "gradient")
"""Directions of :func:`coefficient_sharing`; the table holds the others' cosines to ``fresh``."""

__all__ = ["DIRECTIONS", "coefficient_sharing", "coefficients", "permutation"]
