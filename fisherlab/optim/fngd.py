"""FNGD (inverse-free fast natural gradient): TENGraD's weights, computed in the first epoch only.

The natural gradient of a batch is a weighted sum of per-sample gradients, ``Jᵀw`` with
``w = (νλI + K)⁻¹1``. During the first epoch (``steps_per_epoch`` steps) FNGD computes ``w`` for
every step, exactly as TENGraD, and stores it under the step's index in the epoch; later epochs
reuse the stored weights of the same index with the current batch's per-sample gradients, so a
step costs one weighted gradient and no Gram or solve. ``damping_mode="frobenius"`` ties the
damping to the Gram as in the paper: ``νλ = damping·‖K‖_F``.
"""

from __future__ import annotations

from torch import Tensor

from fisherlab.conventions import FisherlabError, check_choice
from fisherlab.layers import Layer
from fisherlab.optim.base import check_frequency
from fisherlab.optim.tengrad import TENGraD

FNGD_DAMPING = ("absolute", "frobenius")


class FNGD(TENGraD):
    """FNGD (see the module docstring).

    Args:
        model: The network.
        steps_per_epoch: Steps of the first epoch, during which the weights are computed.
        lr: Learning rate.
        damping: ``λ`` (``"absolute"``) or the factor of ``‖K‖_F`` (``"frobenius"``).
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        damping_mode: ``"absolute"`` or ``"frobenius"``.
        loss_fn: The loss (needed for MSE's normaliser).
    """

    def __init__(
        self,
        model,
        steps_per_epoch: int,
        lr: float = 0.1,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        damping_mode: str = "absolute",
        fisher_type: str = "empirical",
        loss_fn=None,
    ):
        check_frequency("steps_per_epoch", steps_per_epoch)
        check_choice("damping_mode", damping_mode, FNGD_DAMPING)
        if fisher_type != "empirical":
            raise FisherlabError(
                "FNGD needs fisher_type='empirical': its weights assume the batch gradient Jᵀ1/ν"
            )
        super().__init__(model, lr, damping, momentum, weight_decay, fisher_type, loss_fn)
        group = self.param_groups[0]
        group["steps_per_epoch"], group["damping_mode"] = steps_per_epoch, damping_mode

    @property
    def first_epoch(self) -> bool:
        """Whether the current step belongs to the first epoch (weights are computed)."""
        return self.steps < self.param_groups[0]["steps_per_epoch"]

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor
    ) -> Tensor:
        group = self.param_groups[0]
        block = self._block(layer, A, G, normaliser)
        index = self.steps % group["steps_per_epoch"]
        stored = self.layer_state[name].setdefault("weights", {})
        weights = stored.get(index)
        if weights is None or weights.shape[0] != block.rows or self.first_epoch:
            damping = group["damping"]
            if group["damping_mode"] == "frobenius":
                damping = damping * float(block.gram.norm()) / normaliser
            weights = block.coefficients(damping)
            if self.first_epoch:
                stored[index] = weights
        return block.weighted_gradient(weights)
