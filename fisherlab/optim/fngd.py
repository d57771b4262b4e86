"""FNGD (inverse-free fast natural gradient): TENGraD's weights, computed in the first epoch only.

The natural gradient of a batch is a weighted sum of per-sample gradients, ``Jᵀw`` with
``w = (νλI + K)⁻¹1``. During the first epoch (``steps_per_epoch`` steps) FNGD steps exactly as
TENGraD and stores ``w`` under the step's index in the epoch; later epochs reuse the stored
weights of the same index with the current batch's per-sample gradients, so a step costs
weighted gradients and no Gram or solve. ``damping_mode="frobenius"`` ties the damping to the
Gram as in the paper: ``νλ = damping·‖K‖_F``.

**Which gradient.** The shared weights precondition the batch gradient ``ĝ = Jᵀ1/ν`` of the
recorded passes; ``p.grad`` may differ (clipping, a penalty in the loss). In later epochs the
step computes ``ĝ`` with ``Jᵀw`` (one product with two weight vectors) and, when
``p.grad = s·ĝ`` up to rounding (``‖p.grad − sĝ‖ ≤ τ‖p.grad‖`` with ``τ = √ε`` of the
statistics' dtype, or ``4ε`` of autocast's dtype when larger: unchanged, or clipped by a factor
``s``), steps ``s·Jᵀw``. Otherwise (a penalty, per-parameter clipping) there is no
shared-weight direction for it: that step solves with the current batch as TENGraD does (its
cost), with a one-time warning; decoupled ``weight_decay=`` does not touch ``p.grad``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.conventions import FisherlabError, check_choice, check_positive_int
from fisherlab.layers import Layer
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
        loss_fn: The loss (needed for MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.
    """

    hyper_parameters = ("steps_per_epoch", "damping_mode")

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
        **loop,
    ):
        if fisher_type != "empirical":
            raise FisherlabError(
                "FNGD needs fisher_type='empirical': its weights assume the batch gradient Jᵀ1/ν"
            )
        super(TENGraD, self).__init__(
            model, lr, damping, momentum, weight_decay, fisher_type, loss_fn,
            steps_per_epoch=steps_per_epoch, damping_mode=damping_mode, **loop,
        )  # fmt: skip
        self._pending: dict[str, tuple[Tensor, WoodburyBlock, float]] = {}

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_positive_int("steps_per_epoch", group["steps_per_epoch"])
        check_choice("damping_mode", group["damping_mode"], FNGD_DAMPING)

    @property
    def first_epoch(self) -> bool:
        """Whether the current step belongs to the first epoch (weights are computed)."""
        return self.steps < self.param_groups[0]["steps_per_epoch"]

    def _tolerance(self, dtype: torch.dtype) -> float:
        """Relative distance of ``p.grad`` from ``sĝ`` still read as rounding.

        ``√ε`` of the statistics' dtype, or ``4ε`` of the precision the step was computed in
        when that is larger (``p.grad`` and ``ĝ`` are two roundings of the same sum: under
        bfloat16 autocast they differ by about its ``ε``).
        """
        return max(torch.finfo(dtype).eps ** 0.5, 4 * torch.finfo(self._precision).eps)

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        block = self._block(layer, A, G, normaliser)
        first_epoch = self.steps < group["steps_per_epoch"]
        index = self.steps % group["steps_per_epoch"]
        stored = self.layer_state[name].setdefault("weights", {})
        weights = stored.get(index)
        damping = group["damping"]
        if group["damping_mode"] == "frobenius":
            damping = damping * float(block.gram.norm()) / normaliser
        if first_epoch or weights is None or weights.shape[0] != block.rows:
            direction = self._solve_once(name, block, grad, damping)
            if first_epoch:
                stored[index] = block.coefficients(damping)  # the same Cholesky factor
            return direction
        ones = torch.full_like(weights, 1 / normaliser)
        shared, batch_grad = block.weighted_gradient(torch.stack([weights, ones])).T
        norm_sq = batch_grad @ batch_grad
        s = (grad @ batch_grad) / norm_sq.clamp_min(torch.finfo(grad.dtype).tiny)
        residual = torch.linalg.vector_norm(grad - s * batch_grad)
        ok = residual <= self._tolerance(grad.dtype) * torch.linalg.vector_norm(grad)
        self._pending[name] = (ok, block, damping)
        return s * shared

    def _revise(self, directions: dict[str, Tensor], grads: dict[str, Tensor]) -> dict:
        """Solve with the batch where ``p.grad`` is not ``s·ĝ`` (one host synchronisation)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return directions
        flags = torch.stack([ok for ok, _, _ in pending.values()]).tolist()
        failed = [name for name, ok in zip(pending, flags) if not ok]
        for name in failed:
            _, block, damping = pending[name]
            directions[name] = self._solve_once(name, block, grads[name], damping)
        if failed and "fngd-fallback" not in self._warned:
            self._warned.add("fngd-fallback")
            warnings.warn(
                f"FNGD: p.grad of layers {failed} is not a multiple of the batch gradient of the "
                "recorded passes (a penalty in the loss, per-parameter clipping, …); the shared "
                "weights do not apply to it, so such steps solve with the current batch "
                "(TENGraD's cost). Use weight_decay= instead of an L2 term in the loss",
                RuntimeWarning,
                stacklevel=4,
            )
        return directions
