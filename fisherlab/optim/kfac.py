"""KFAC (Martens & Grosse 2015): running-average Kronecker factors, periodic eigen-decomposition."""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.blocks.factors import gradient_factor, input_factor
from fisherlab.blocks.kfac import DAMPING_MODES, KronBlock
from fisherlab.conventions import check_choice, check_positive_int, check_range
from fisherlab.layers import Layer
from fisherlab.linalg import symmetric_eigh
from fisherlab.optim.base import CurvatureOptimizer
from fisherlab.optim.distributed import all_reduce_mean


def update_average(state: dict, key: str, value: Tensor, decay: float) -> Tensor:
    """``state[key] ← decay·state[key] + (1 − decay)·value`` (set on first use or shape change)."""
    old = state.get(key)
    if old is None or old.shape != value.shape or decay == 0:
        state[key] = value.clone()
    else:
        state[key] = old.mul(decay).add_(value, alpha=1 - decay)
    return state[key]


class KFAC(CurvatureOptimizer):
    """KFAC with the factors of :mod:`fisherlab.blocks.factors` and the ``kfac`` block's solve.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``: ``1/(λ_Γλ_Ω + λ)`` in the eigenbasis, or factored Tikhonov damping with
            ``damping_mode="factored"``.
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        stat_decay: Running-average decay of the factors, in ``[0, 1)``.
        factor_update_freq: Steps between factor updates.
        inv_update_freq: Steps between eigen-decompositions.
        damping_mode: ``"eigen"`` or ``"factored"``.
        kl_clip: Scale updates so that ``lr²·Σ dᵀg ≤ kl_clip`` (``None``: off).
        kfac_approx: ``"expand"`` or ``"reduce"`` factors for convolutions.
        fisher_type: ``"empirical"`` or ``"mc"``.
        loss_fn: The loss (needed for ``"mc"``, MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.
    """

    gather_samples = False  # batch factors are averaged across ranks instead

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        factor_update_freq: int = 1,
        inv_update_freq: int = 10,
        damping_mode: str = "eigen",
        kl_clip: float | None = None,
        kfac_approx: str = "expand",
        fisher_type: str = "empirical",
        loss_fn=None,
        **loop,
    ):
        super().__init__(
            model, lr, damping, momentum, weight_decay, fisher_type, loss_fn,
            stat_decay=stat_decay, factor_update_freq=factor_update_freq,
            inv_update_freq=inv_update_freq, damping_mode=damping_mode, kl_clip=kl_clip,
            kfac_approx=kfac_approx, **loop,
        )  # fmt: skip

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_range("stat_decay", group["stat_decay"], 0.0, 1.0)
        check_positive_int("factor_update_freq", group["factor_update_freq"])
        check_positive_int("inv_update_freq", group["inv_update_freq"])
        check_choice("damping_mode", group["damping_mode"], DAMPING_MODES)
        check_choice("kfac_approx", group["kfac_approx"], ("expand", "reduce"))
        if group["kl_clip"] is not None:
            check_range("kl_clip", group["kl_clip"], 0.0, open_low=True)

    def _update_factors(
        self, name: str, A: Tensor, G: Tensor, normaliser: float, group: dict
    ) -> dict:
        state = self.layer_state[name]
        stale = "omega" not in state or state["omega"].shape[0] != A.shape[-1]  # bias (un)frozen
        if self.steps % group["factor_update_freq"] == 0 or stale:
            approx, decay = group["kfac_approx"], group["stat_decay"]
            gamma = all_reduce_mean(gradient_factor(G, normaliser, approx))
            update_average(state, "gamma", gamma, decay)
            update_average(state, "omega", all_reduce_mean(input_factor(A, approx)), decay)
        return state

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        state = self._update_factors(name, A, G, normaliser, group)
        fresh = "eig_omega" in state and state["eig_omega"][1].shape == state["omega"].shape
        if self.steps % group["inv_update_freq"] == 0 or not fresh:
            state["eig_gamma"] = symmetric_eigh(state["gamma"])
            state["eig_omega"] = symmetric_eigh(state["omega"])
        block = KronBlock(
            layer, state["gamma"], state["omega"], self.fisher_type,
            {"damping_mode": group["damping_mode"]},
            eig_gamma=state["eig_gamma"], eig_omega=state["eig_omega"],
        )  # fmt: skip
        return block.solve(grad, group["damping"])

    def _scale(
        self, directions: dict[str, Tensor], grads: dict[str, Tensor], groups: dict[str, dict]
    ) -> dict[str, Tensor | float]:
        """KL clipping, per param group: ``lr²·Σ dᵀg ≤ kl_clip`` over the group's layers."""
        sums: dict[int, Tensor] = {}
        for n in directions:
            if groups[n]["kl_clip"] is not None:
                vg = (directions[n] * grads[n]).sum() * groups[n]["lr"] ** 2
                sums[id(groups[n])] = sums.get(id(groups[n]), 0) + vg
        factors: dict[str, Tensor | float] = {}
        for n in directions:
            clip = groups[n]["kl_clip"]
            if clip is None:
                factors[n] = 1.0
            else:  # no host synchronisation: the factor stays a tensor
                vg = sums[id(groups[n])]
                factors[n] = torch.clamp(torch.sqrt(clip / vg.abs().clamp_min(1e-30)), max=1.0)
        return factors
