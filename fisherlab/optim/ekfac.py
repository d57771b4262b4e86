"""EKFAC and EKFAC-ra (George et al. 2018): KFAC's eigenbasis with refreshed scalings."""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.blocks.ekfac import EKFACBlock, kfe_scalings, pool_null_spaces
from fisherlab.conventions import check_positive_int
from fisherlab.layers import Layer
from fisherlab.optim.distributed import all_reduce_mean
from fisherlab.optim.kfac import KFAC, update_average


class EKFAC(KFAC):
    """EKFAC: KFAC's eigenbasis with scalings refreshed every step.

    The basis of the running-average KFAC factors is recomputed every ``basis_update_freq``
    steps; the scalings ``s`` come from every batch (``running_average=False``) or are a running
    average with ``stat_decay`` (EKFAC-ra, reset when the basis changes). Where a factor is
    singular, the scalings are averaged over its null space
    (:func:`~fisherlab.blocks.ekfac.pool_null_spaces`): the step does not depend on the
    arbitrary basis of the null space.

    Args:
        basis_update_freq: Steps between eigen-decompositions of the factors.
        running_average: EKFAC-ra.
        Other arguments: as :class:`~fisherlab.optim.KFAC` (without ``damping_mode`` and
            ``kl_clip``: damping is ``1/(s + λ)`` in the basis).
    """

    hyper_parameters = (*KFAC.hyper_parameters, "running_average")

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        factor_update_freq: int = 1,
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
            model, lr, damping, momentum, weight_decay, stat_decay, factor_update_freq,
            inv_update_freq=basis_update_freq, kfac_approx=kfac_approx,
            fisher_type=fisher_type, loss_fn=loss_fn, eigen_dtype=eigen_dtype,
            spread_eigen=spread_eigen, running_average=bool(running_average), **loop,
        )  # fmt: skip

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        state = self.layer_state[name]
        u_gamma, u_omega = state["eig_gamma"][1], state["eig_omega"][1]
        s = all_reduce_mean(kfe_scalings(A, G, u_gamma, u_omega, normaliser), normaliser)
        s = pool_null_spaces(s, state["eig_gamma"][0], state["eig_omega"][0])
        new_basis = name in self._new_bases
        decay = 0.0 if new_basis or not group["running_average"] else group["stat_decay"]
        s = update_average(state, "scalings", s, decay)
        block = EKFACBlock(layer, u_gamma, u_omega, s, self.fisher_type, {})
        return block.solve(grad, group["damping"])


def EKFACra(model, **kwargs) -> EKFAC:
    """EKFAC-ra: :class:`EKFAC` with running-average scalings."""
    return EKFAC(model, running_average=True, **kwargs)
