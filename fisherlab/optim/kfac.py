"""KFAC (Martens & Grosse 2015): a running-average ``kfac`` builder per layer, periodic eigenbases.

One ``kfac`` builder per layer (:mod:`fisherlab.optim.builders`: statistics steps, the builder's
state mirrored into the per-layer state); the block, its eigenbasis and factored damping's
inverses come from the builder's block.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.base import BlockBuilder, LayerStats
from fisherlab.blocks.kfac import DAMPING_MODES, KronBlock
from fisherlab.blocks.kronecker import KroneckerEigenbasis
from fisherlab.conventions import FisherlabError, check_choice, check_positive_int, check_range
from fisherlab.layers import Layer
from fisherlab.optim.builders import BuilderOptimizer, running_average_weights
from fisherlab.optim.distributed import all_reduce_mean, computed_once, distributed
from fisherlab.optim.update import kl_clip_factors


class KFAC(BuilderOptimizer):
    """KFAC with one ``kfac`` builder per layer (module docstring) and its block's solve.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``: ``1/(λ_Γλ_Ω + λ)`` in the eigenbasis (four products per step), or
            factored Tikhonov damping with ``damping_mode="factored"`` (the two damped inverses
            are formed at each eigen-decomposition: two products per step).
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        stat_decay: Running-average decay of the factors, in ``[0, 1)``.
        stat_every: Steps between statistics steps (kfac-pytorch's ``factor_update_steps``):
            the factors are updated only when ``steps % stat_every == 0``; on other steps the
            statistics recorded are dropped unused.
        inv_update_freq: Steps between eigen-decompositions (a multiple of ``stat_every``).
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

    Attributes:
        builders: ``{layer: BlockBuilder}``, the layers' running-average builders.
    """

    gather_samples = False  # batch factors are averaged across ranks instead
    hyper_parameters = (
        "stat_decay", "stat_every", "inv_update_freq", "damping_mode", "kl_clip", "kfac_approx",
    )  # fmt: skip
    method = "kfac"
    #: The name of ``inv_update_freq`` in the constructor (messages).
    interval_name = "inv_update_freq"
    #: The builder entries averaged across ranks, with the weight of each rank's share.
    reduced: ClassVar[dict[str, str]] = {"gg": "normaliser", "aa": "samples"}

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        stat_every: int = 1,
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
            stat_decay=stat_decay, stat_every=stat_every, inv_update_freq=inv_update_freq,
            damping_mode=damping_mode, kl_clip=kl_clip, kfac_approx=kfac_approx, **loop,
        )  # fmt: skip

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_positive_int(self.interval_name, group["inv_update_freq"])
        if group["inv_update_freq"] % group["stat_every"]:
            raise FisherlabError(
                f"{self.interval_name}={group['inv_update_freq']} must be a multiple of "
                f"stat_every={group['stat_every']} (a new basis needs fresh statistics)"
            )
        check_choice("damping_mode", group.get("damping_mode", "eigen"), DAMPING_MODES)
        check_choice("kfac_approx", group["kfac_approx"], ("expand", "reduce"))
        if group.get("kl_clip") is not None:
            check_range("kl_clip", group["kl_clip"], 0.0, open_low=True)

    # ------------------------------------------------------------------ builders
    def _builder_options(self, group: dict) -> dict[str, Any]:
        """The block options of a group's builders."""
        return {"kfac_approx": group["kfac_approx"], "damping_mode": group["damping_mode"]}

    def _reduce(self, held: BlockBuilder, stats: LayerStats, names: dict[str, str]) -> None:
        """Average the batch's part of the builder's entries across ranks (by their share).

        After ``S ← αS + βx_r`` on rank ``r`` (``S`` the same on all), the weighted mean over
        ranks is ``αS + β·mean_r(x_r)``: the batch factors of the concatenated batch, added.
        """
        if not distributed():
            return
        live = held.state_dict()
        shares = {"normaliser": float(stats.normaliser), "samples": float(stats.A.shape[0])}
        for entry, share in names.items():
            live[entry].copy_(all_reduce_mean(live[entry], shares[share]))

    #: Per-layer entries kept besides the builder's (``builder.<entry>``).
    kept_entries: ClassVar[tuple[str, ...]] = ("eig_gamma", "eig_omega", "inverses")

    # ------------------------------------------------------------------ the step
    def _add(self, name: str, held: BlockBuilder, stats: LayerStats, group: dict) -> None:
        """Add the batch's factors to the running average."""
        first = not self._mirrors.get(name)
        held.add(stats, *running_average_weights(first, group["stat_decay"]))
        self._reduce(held, stats, self.reduced)

    def _kron_block(self, held: BlockBuilder, group: dict, **given: Any) -> KronBlock:
        """``Γ ⊗ Ω`` of the builder's state (``given``: its eigenbasis or inverses, if kept)."""
        gamma, omega = held.factors(shared=True)
        return KronBlock(
            held.layer, gamma, omega, self.fisher_type,
            {"damping_mode": group.get("damping_mode", "eigen")},
            eigen_dtype=self.eigen_dtype, **given,
        )  # fmt: skip

    def _basis_key(self, group: dict) -> str:
        return "inverses" if group.get("damping_mode") == "factored" else "eig_omega"

    def _prepare(self, jobs: dict[str, tuple[Tensor, Tensor, dict]], normaliser: float) -> None:
        """Update the builders; at inverse updates, what the steps until the next one need.

        Eigenbases (:meth:`~fisherlab.blocks.kfac.KronBlock.eigenbasis`) or factored damping's
        two inverses (:meth:`~fisherlab.blocks.kfac.KronBlock.inverse_factors`), one job per
        layer, shared out across ranks (:func:`~fisherlab.optim.distributed.computed_once`).
        """
        self._update_builders(jobs, normaliser)
        work, like, costs, due = {}, {}, {}, {}
        for name, (_, _, group) in jobs.items():
            layer, held = self._trained(name)[0], self.builders[name]
            state, width = self.layer_state[name], layer.d_in + layer.has_bias
            key = self._basis_key(group)
            kept = state.get(key)  # a tensor, or a tuple ending with the Ω-side tensor
            kept = kept[-1] if isinstance(kept, tuple) else kept
            fresh = kept is not None and kept.shape[0] == width
            if self.steps % group["inv_update_freq"] != 0 and fresh:
                continue
            factored = key == "inverses"
            due[name] = group["damping"] if factored else None
            block = self._kron_block(self._basis_source(held), group)
            if factored:
                work[name] = lambda b=block, d=group["damping"]: b.inverse_factors(d)
                like[name] = (block.gamma, block.omega)
            else:
                work[name] = lambda b=block: _basis_tensors(b.eigenbasis())
                like[name] = (block.gamma[0], block.gamma, block.omega[0], block.omega)
            costs[name] = block.gamma.shape[0] ** 3 + block.omega.shape[0] ** 3
        out = computed_once(work, like, costs, self.spread_eigen)
        for name, damping in due.items():
            self._new_basis(name, damping, out[name])
        self._new_bases = set(due)

    def _basis_source(self, held: BlockBuilder) -> BlockBuilder:
        """The builder whose factors give the basis (KFAC: the layer's own)."""
        return held

    def _new_basis(self, name: str, damping: float | None, tensors: tuple[Tensor, ...]) -> None:
        """Keep a new eigenbasis (or factored inverses) until the next one."""
        state = self.layer_state[name]
        if damping is not None:
            state["inverses"] = (damping, *tensors)
        else:
            lg, ug, lo, uo = tensors
            state["eig_gamma"], state["eig_omega"] = (lg, ug), (lo, uo)

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        state = self.layer_state[name]
        basis = None
        if "eig_gamma" in state and "eig_omega" in state:
            (lg, ug), (lo, uo) = state["eig_gamma"], state["eig_omega"]
            basis = KroneckerEigenbasis(ug, uo, lg, lo)
        block = self._kron_block(
            self.builders[name], group, eigenbasis=basis, inverse_factors=state.get("inverses")
        )
        direction = block.solve(grad, group["damping"])
        if group["damping_mode"] == "factored":  # kept until the next eigen-decomposition
            state["inverses"] = (group["damping"], *block.inverse_factors(group["damping"]))
        return direction

    def _scale(
        self, directions: dict[str, Tensor], grads: dict[str, Tensor], groups: dict[str, dict]
    ) -> dict[str, Tensor | float]:
        """KL clipping, per param group: ``lr²·Σ dᵀg ≤ kl_clip`` over the group's layers."""
        return kl_clip_factors(directions, grads, groups)


def _basis_tensors(basis: KroneckerEigenbasis) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(λ_Γ, U_Γ, λ_Ω, U_Ω)`` of an eigenbasis (what :func:`computed_once` broadcasts)."""
    return basis.values_gamma, basis.u_gamma, basis.values_omega, basis.u_omega
