"""SKFAC (Tang et al. 2021): Kronecker factors from moving averages of their rows, SMW-inverted."""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.blocks.kfac import DAMPING_MODES
from fisherlab.blocks.skfac import CONV_REDUCTIONS, SKFACBlock, skfac_rows
from fisherlab.conventions import check_choice, check_positive_int, check_range
from fisherlab.layers import Layer
from fisherlab.optim.base import CurvatureOptimizer


def update_average(state: dict, key: str, value: Tensor, decay: float) -> Tensor:
    """``state[key] ← decay·state[key] + (1 − decay)·value`` (set on first use or shape change).

    The paper's moving average of the factor *rows* (the ``skfac`` builder averages their
    Grams instead, holding every batch's rows).
    """
    old = state.get(key)
    if old is None or old.shape != value.shape or decay == 0:
        state[key] = value.clone()
    else:  # a new tensor (the old one is kept for a rollback), in one pass
        state[key] = torch.lerp(value, old, decay)
    return state[key]


class SKFAC(CurvatureOptimizer):
    """SKFAC: moving averages of the factor rows and the ``skfac`` block's SMW solve.

    The rows ``X`` (from ``Ã``) and ``Y`` (from ``G``) of the Kronecker factors are averaged over
    steps, as in the paper.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``.
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        stat_decay: Moving-average decay of the rows, in ``[0, 1)`` (reset when the batch size
            changes).
        conv_reduction: ``"sum"`` (reduce-sum) or ``"subsample"`` for layers with ``T > 1``.
        spatial_samples: Positions per sample for ``"subsample"``.
        damping_mode: ``"eigen"`` (KFAC's damped inverse) or ``"factored"`` (as in the paper).
        fisher_type: ``"empirical"`` or ``"mc"``.
        loss_fn: The loss (needed for ``"mc"``, MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.
    """

    hyper_parameters = ("stat_decay", "conv_reduction", "spatial_samples", "damping_mode")

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        conv_reduction: str = "sum",
        spatial_samples: int | None = None,
        damping_mode: str = "eigen",
        fisher_type: str = "empirical",
        loss_fn=None,
        **loop,
    ):
        super().__init__(
            model, lr, damping, momentum, weight_decay, fisher_type, loss_fn,
            stat_decay=stat_decay, conv_reduction=conv_reduction,
            spatial_samples=spatial_samples, damping_mode=damping_mode, **loop,
        )  # fmt: skip

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_range("stat_decay", group["stat_decay"], 0.0, 1.0)
        check_choice("conv_reduction", group["conv_reduction"], CONV_REDUCTIONS)
        check_choice("damping_mode", group["damping_mode"], DAMPING_MODES)
        if group["spatial_samples"] is not None:
            check_positive_int("spatial_samples", group["spatial_samples"])

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        state = self.layer_state[name]
        X, Y = skfac_rows(A, G, group["conv_reduction"], group["spatial_samples"], self.steps)
        X = update_average(state, "X", X, group["stat_decay"])
        Y = update_average(state, "Y", Y, group["stat_decay"])
        block = SKFACBlock(
            layer, X, Y, normaliser, self.fisher_type, {"damping_mode": group["damping_mode"]}
        )
        return block.solve(grad, group["damping"])
