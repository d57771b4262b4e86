"""EKFAC and EKFAC-ra (George et al. 2018): KFAC's eigenbasis with refreshed scalings.

Each layer holds one ``ekfac`` builder (``normalise="batch"``, see :mod:`fisherlab.optim.kfac`):
its factors (:meth:`~fisherlab.blocks.ekfac.EKFACBuilder.add_factors`) are KFAC's running
average, its basis is renewed from them every ``basis_update_freq`` steps (the scalings restart
there), and its scalings (:meth:`~fisherlab.blocks.ekfac.EKFACBuilder.add_scalings`) are the
batch's own (EKFAC) or their running average (EKFAC-ra).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.base import BlockBuilder, LayerStats, WeightedSum
from fisherlab.blocks.ekfac import EKFACBlock, pool_null_spaces
from fisherlab.conventions import check_positive_int
from fisherlab.layers import Layer
from fisherlab.optim.kfac import BUILDER, KFAC, running_average_weights


class EKFAC(KFAC):
    """EKFAC: KFAC's eigenbasis with scalings refreshed at every statistics step.

    The basis of the running-average KFAC factors is recomputed every ``basis_update_freq``
    steps; the scalings ``s`` come from every batch (``running_average=False``) or are a running
    average with ``stat_decay`` (EKFAC-ra, reset when the basis changes). Where a factor is
    singular, the scalings are averaged over its null space
    (:func:`~fisherlab.blocks.ekfac.pool_null_spaces`): the step does not depend on the
    arbitrary basis of the null space.

    Args:
        stat_every: Steps between statistics steps (factors and scalings); the scalings of
            the last one are used in between.
        basis_update_freq: Steps between eigen-decompositions of the factors (a multiple of
            ``stat_every``).
        running_average: EKFAC-ra.
        Other arguments: as :class:`~fisherlab.optim.KFAC` (without ``damping_mode`` and
            ``kl_clip``: damping is ``1/(s + λ)`` in the basis).
    """

    hyper_parameters = (*KFAC.hyper_parameters, "running_average")
    method = "ekfac"
    interval_name = "basis_update_freq"
    reduced: ClassVar[dict[str, str]] = {"factors.gg": "normaliser", "factors.aa": "samples"}
    added_entries: ClassVar[tuple[str, ...]] = ("factors.",)

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        stat_every: int = 1,
        basis_update_freq: int = 10,
        running_average: bool = False,
        kfac_approx: str = "expand",
        fisher_type: str = "empirical",
        loss_fn=None,
        eigen_dtype: torch.dtype | None = None,
        spread_eigen: bool = True,
        **loop,
    ):
        check_positive_int("basis_update_freq", basis_update_freq)
        super().__init__(
            model, lr, damping, momentum, weight_decay, stat_decay, stat_every,
            inv_update_freq=basis_update_freq, kfac_approx=kfac_approx,
            fisher_type=fisher_type, loss_fn=loss_fn, eigen_dtype=eigen_dtype,
            spread_eigen=spread_eigen, running_average=bool(running_average), **loop,
        )  # fmt: skip

    #: The basis's factor eigenvalues (the scalings are pooled over their null spaces).
    kept_entries: ClassVar[tuple[str, ...]] = ("basis_values_gamma", "basis_values_omega")

    def _builder_options(self, group: dict) -> dict:
        return {"kfac_approx": group["kfac_approx"]}

    def _input_width(self, name: str) -> int | None:
        aa = self.layer_state[name].get(BUILDER + "factors.aa")
        return None if aa is None else aa.shape[0]

    def _basis_key(self, group: dict) -> str:
        return BUILDER + "u_omega"

    def _basis_source(self, held: BlockBuilder) -> BlockBuilder:
        return held.factors  # the KFAC builder inside

    def _add(self, name: str, held: BlockBuilder, stats: LayerStats, group: dict) -> None:
        first = self._input_width(name) is None
        held.add_factors(stats, *running_average_weights(first, group["stat_decay"]))
        self._reduce(held, stats, self.reduced)

    def _new_basis(self, name: str, damping: float | None, tensors: tuple[Tensor, ...]) -> None:
        """The builder's basis (as its ``update_basis()``, computed once across ranks)."""
        held = self.builders[name]
        l_gamma, u_gamma, l_omega, u_omega = tensors
        held.basis, held.squares = (u_gamma, u_omega), WeightedSum()
        state = self.layer_state[name]
        state["basis_values_gamma"], state["basis_values_omega"] = l_gamma, l_omega
        self._mirror(name, held, ("u_gamma", "u_omega", "squares"))

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        held = self.builders[name]
        if name in self._updated:
            new_basis = name in self._new_bases
            decay = group["stat_decay"] if group["running_average"] else 0.0
            stats = LayerStats(A, G, normaliser)
            held.add_scalings(stats, *running_average_weights(new_basis, decay))
            self._reduce(held, stats, {"squares": "normaliser"})
            self._mirror(name, held, ("squares",))
        block = held.block()
        state = self.layer_state[name]  # the basis's eigenvalues: scalings pooled over null spaces
        s = pool_null_spaces(
            block.scalings, state["basis_values_gamma"], state["basis_values_omega"]
        )
        block = EKFACBlock(layer, block.u_gamma, block.u_omega, s, self.fisher_type, {})
        return block.solve(grad, group["damping"])


def EKFACra(model, **kwargs) -> EKFAC:
    """EKFAC-ra: :class:`EKFAC` with running-average scalings."""
    return EKFAC(model, running_average=True, **kwargs)
