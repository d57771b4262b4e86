"""KFAC (Martens & Grosse 2015): running-average Kronecker factors, periodic eigen-decomposition."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from fisherlab.blocks.factors import gradient_factor, input_factor
from fisherlab.blocks.kfac import DAMPING_MODES, KronBlock
from fisherlab.blocks.kronecker import KroneckerEigenbasis, factored_shifts
from fisherlab.conventions import FisherlabError, check_choice, check_positive_int, check_range
from fisherlab.layers import Layer
from fisherlab.linalg import damped_inverse, symmetric_eigh
from fisherlab.optim.base import CurvatureOptimizer
from fisherlab.optim.distributed import all_reduce_mean, computed_once


def _inverse(factor: Tensor, shift: Tensor, dtype: torch.dtype | None) -> tuple[Tensor]:
    return (damped_inverse(factor, shift, dtype),)


def update_average(state: dict, key: str, value: Tensor, decay: float) -> Tensor:
    """``state[key] ← decay·state[key] + (1 − decay)·value`` (set on first use or shape change)."""
    old = state.get(key)
    if old is None or old.shape != value.shape or decay == 0:
        state[key] = value.clone()
    else:  # a new tensor (the old one is kept for a rollback), in one pass
        state[key] = torch.lerp(value, old, decay)
    return state[key]


class KFAC(CurvatureOptimizer):
    """KFAC with the factors of :mod:`fisherlab.blocks.factors` and the ``kfac`` block's solve.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``: ``1/(λ_Γλ_Ω + λ)`` in the eigenbasis (four products per step), or
            factored Tikhonov damping with ``damping_mode="factored"`` (the two damped inverses
            are formed at each eigen-decomposition: two products per step).
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        stat_decay: Running-average decay of the factors, in ``[0, 1)``.
        factor_update_freq: Steps between factor updates.
        inv_update_freq: Steps between eigen-decompositions.
        damping_mode: ``"eigen"`` or ``"factored"``.
        kl_clip: Scale updates so that ``lr²·Σ dᵀg ≤ kl_clip`` (``None``: off).
        kfac_approx: ``"expand"`` or ``"reduce"`` factors for convolutions.
        fisher_type: ``"empirical"`` or ``"mc"``.
        eigen_dtype: Dtype of the factors' eigen-decompositions (default: float64 for float32
            statistics; ``torch.float32`` is faster, on GPU in particular).
        spread_eigen: Under ``torch.distributed``, compute each layer's eigen-decompositions
            (or inverses) on one rank and broadcast them
            (:func:`~fisherlab.optim.distributed.computed_once`).
        loss_fn: The loss (needed for ``"mc"``, MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.
    """

    gather_samples = False  # batch factors are averaged across ranks instead
    hyper_parameters = (
        "stat_decay", "factor_update_freq", "inv_update_freq", "damping_mode", "kl_clip",
        "kfac_approx",
    )  # fmt: skip

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
        eigen_dtype: torch.dtype | None = None,
        spread_eigen: bool = True,
        **loop,
    ):
        self.spread_eigen = bool(spread_eigen)
        if eigen_dtype is not None and not (
            isinstance(eigen_dtype, torch.dtype) and eigen_dtype.is_floating_point
        ):
            raise FisherlabError(f"eigen_dtype must be a floating torch.dtype, got {eigen_dtype!r}")
        self.eigen_dtype = eigen_dtype
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

    def _prepare(self, jobs: dict[str, tuple[Tensor, Tensor, dict]], normaliser: float) -> None:
        """Update the factors; at inverse updates, what the steps until the next one need.

        Eigen-decompositions (``damping_mode="eigen"``, EKFAC) or factored damping's two
        inverses (Cholesky, no eigen-decomposition), one job per factor, shared out across
        ranks (:func:`~fisherlab.optim.distributed.computed_once`).
        """
        work, like, costs, due = {}, {}, {}, {}
        for name, (A, G, group) in jobs.items():
            state = self._update_factors(name, A, G, normaliser, group)
            gamma, omega = state["gamma"], state["omega"]
            factored = group.get("damping_mode") == "factored"
            key = "inverses" if factored else "eig_omega"
            fresh = key in state and state[key][-1].shape == omega.shape
            if self.steps % group["inv_update_freq"] != 0 and fresh:
                continue
            due[name] = group["damping"] if factored else None
            if factored:  # π from both traces, on every rank; then one inverse per factor
                shifts = dict(
                    zip(
                        ("gamma", "omega"),
                        factored_shifts(
                            gamma.diagonal().mean(), omega.diagonal().mean(), group["damping"]
                        ),
                    )
                )
            for which, factor in (("gamma", gamma), ("omega", omega)):
                if factored:
                    work[name, which] = partial(_inverse, factor, shifts[which], self.eigen_dtype)
                    like[name, which] = (factor,)
                else:
                    work[name, which] = partial(symmetric_eigh, factor, self.eigen_dtype)
                    like[name, which] = (factor[0], factor)
                costs[name, which] = factor.shape[0] ** 3
        out = computed_once(work, like, costs, self.spread_eigen)
        for name, damping in due.items():
            state = self.layer_state[name]
            if damping is not None:
                state["inverses"] = (damping, out[name, "gamma"][0], out[name, "omega"][0])
            else:
                state["eig_gamma"], state["eig_omega"] = out[name, "gamma"], out[name, "omega"]
        self._new_bases = set(due)

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        state = self.layer_state[name]
        basis = None
        if "eig_gamma" in state and "eig_omega" in state:
            (lg, ug), (lo, uo) = state["eig_gamma"], state["eig_omega"]
            basis = KroneckerEigenbasis(ug, uo, lg, lo)
        block = KronBlock(
            layer, state["gamma"], state["omega"], self.fisher_type,
            {"damping_mode": group["damping_mode"]},
            eigenbasis=basis, inverse_factors=state.get("inverses"),
        )  # fmt: skip
        direction = block.solve(grad, group["damping"])
        if group["damping_mode"] == "factored":  # kept until the next eigen-decomposition
            state["inverses"] = (group["damping"], *block.inverse_factors(group["damping"]))
        return direction

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
