"""TENGraD (Soori et al. 2021): the exact Fisher block of each batch, inverted by Woodbury."""

from __future__ import annotations

from torch import Tensor

from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.layers import Layer
from fisherlab.optim.base import CurvatureOptimizer


class TENGraD(CurvatureOptimizer):
    """``(F_b + λI)⁻¹ g`` per layer with ``F_b`` the exact block of the step's batch.

    The block is :class:`~fisherlab.blocks.woodbury.WoodburyBlock` built from the ``Ã`` and
    ``G`` recorded during the step's own forward/backward (no extra pass). With the empirical
    Fisher the step is the ``N×N`` Gram, one Cholesky solve and one weighted gradient
    ``Jᵀ(νλI + K)⁻¹1`` (the batch gradient is ``Jᵀ1/ν``); with ``"mc"`` the general solve.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``.
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        fisher_type: ``"empirical"`` or ``"mc"``.
        loss_fn: The loss (needed for ``"mc"`` and MSE).
    """

    def __init__(
        self,
        model,
        lr: float = 0.1,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fisher_type: str = "empirical",
        loss_fn=None,
    ):
        super().__init__(model, lr, damping, momentum, weight_decay, fisher_type, loss_fn)

    def _block(self, layer: Layer, A: Tensor, G: Tensor, normaliser: float) -> WoodburyBlock:
        return WoodburyBlock(layer, A, G, normaliser, self.fisher_type, {"gram_route": "auto"})

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor
    ) -> Tensor:
        block = self._block(layer, A, G, normaliser)
        damping = self.param_groups[0]["damping"]
        if self.fisher_type == "empirical":
            return block.natural_gradient(damping)
        return block.solve(grad, damping)
