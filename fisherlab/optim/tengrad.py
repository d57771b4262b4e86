"""TENGraD (Soori et al. 2021): the exact Fisher block of each batch, inverted by Woodbury."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from fisherlab.blocks import builder as make_builder
from fisherlab.blocks.base import LayerStats
from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.layers import Layer
from fisherlab.optim.base import CurvatureOptimizer


class TENGraD(CurvatureOptimizer):
    """``(F_b + λI)⁻¹ g`` per layer with ``F_b`` the exact block of the step's samples.

    The block is :class:`~fisherlab.blocks.woodbury.WoodburyBlock` built (by a ``woodbury``
    builder given the step's batch alone) from the ``Ã`` and ``G`` recorded during the step's
    own forward/backward passes (no extra pass), and ``g`` is
    ``p.grad`` as the loop left it. The step is the ``N×N`` Gram ``K``, one Cholesky factor of
    ``νλI + K`` and two products with the per-sample gradients,
    ``(g − Jᵀ(νλI + K)⁻¹Jg)/λ`` (:meth:`~fisherlab.blocks.woodbury.WoodburyBlock.solve_once`).

    The paper's cheaper ``Jᵀ(νλI + K)⁻¹1`` equals this only when ``g`` is exactly the batch
    gradient ``Jᵀ1/ν`` of the recorded passes — not after clipping, a penalty in the loss or
    ``GradScaler``'s rounding — and checking that costs the product it saves, so it is not used.

    With float32 statistics and ``λ`` small beside the layer's curvature scale ``τ ≥ λ_max``
    (``ε·τ/λ > 10⁻²``, known from the optimizer's periodic check), one float32 solve cannot
    resolve ``λ``: the step is then solved in float64 from the float32 statistics and refined
    once with the block's own product, as :class:`~fisherlab.blocks.woodbury.WoodburyBlock`
    refines.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``.
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        fisher_type: ``"empirical"`` or ``"mc"``.
        loss_fn: The loss (needed for ``"mc"``, MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.
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
        **loop,
    ):
        super().__init__(model, lr, damping, momentum, weight_decay, fisher_type, loss_fn, **loop)

    def _block(self, layer: Layer, A: Tensor, G: Tensor, normaliser: float) -> WoodburyBlock:
        """The step's block from a ``woodbury`` builder given the step's batch alone.

        ``normalise="data"`` with weights ``(0, 1)`` and ``block(ν_b)``: the rows as captured,
        which the shortcut ``Jᵀ(νλI + K)⁻¹1`` of FNGD needs (see
        :class:`~fisherlab.blocks.woodbury.WoodburyBuilder`). A step is not held to a memory
        budget (the builder's is lifted): the batch is the loop's choice.
        """
        held = make_builder(
            "woodbury", layer, self.fisher_type, normalise="data", max_bytes=sys.maxsize,
            gram_route="auto",
        )  # fmt: skip
        held.add(LayerStats(A, G, normaliser), 0.0, 1.0)
        return held.block(normaliser)

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        return self._solve_once(name, self._block(layer, A, G, normaliser), grad, group["damping"])

    def _solve_once(self, name: str, block: WoodburyBlock, grad: Tensor, damping: float) -> Tensor:
        """``(F_b + λI)⁻¹ g`` by one Woodbury solve, refined where ``λ`` needs it."""
        if not self._needs_refinement(name, damping):
            return block.solve_once(grad, damping)
        # one solve has a relative error of about ε·τ/λ: in float64, refined once as the
        # block refines (x ← x + S(g − (F + λI)x)), from the float32 statistics as they are
        block = self._block(block.layer, block.A.double(), block.G.double(), block.normaliser)
        g = grad.double()
        x = block.solve_once(g, damping)
        x = x + block.solve_once(g - block.matvec(x) - damping * x, damping)
        return x.to(grad.dtype)

    #: Refine when one solve's relative error ``ε·τ/λ`` (τ ≥ λ_max) may exceed this.
    refinement_threshold: float = 1e-2

    def _needs_refinement(self, name: str, damping: float) -> bool:
        """Whether ``λ`` is small beside the layer's curvature scale for the statistics' dtype.

        Known from the last check (:meth:`~fisherlab.optim.CurvatureOptimizer._probe`, the
        first step and every ``check_gradients_every`` steps); float64 statistics never.
        """
        scale = self.curvature_scale.get(name)
        if self.stat_dtype == torch.float64 or scale is None:
            return False
        return torch.finfo(self.stat_dtype).eps * scale > self.refinement_threshold * damping
