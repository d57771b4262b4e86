"""SKFAC (Tang et al. 2021): a row-averaging ``skfac`` builder per layer, the block's SMW solve.

One ``skfac`` builder per layer with ``average="rows"`` (:mod:`fisherlab.optim.builders`:
statistics steps, the builder's state mirrored into the per-layer state): the factor rows
``X`` (from ``Ã``) and ``Y`` (from ``G``) are averaged over statistics steps, as in the paper,
and each step solves with the builder's :class:`~fisherlab.blocks.skfac.SKFACBlock` (its
factors' non-zero eigenpairs from the ``S×S`` Grams, kept until the next statistics step).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from fisherlab.blocks.base import BlockBuilder, LayerStats
from fisherlab.blocks.kfac import DAMPING_MODES
from fisherlab.blocks.skfac import CONV_REDUCTIONS, SKFACBlock
from fisherlab.conventions import check_choice, check_positive_int
from fisherlab.layers import Layer
from fisherlab.optim.builders import BUILDER, BuilderOptimizer, running_average_weights


class SKFAC(BuilderOptimizer):
    """SKFAC: moving averages of the factor rows in an ``skfac`` builder, its block's SMW solve.

    At each statistics step the batch's rows enter the builder with weights ``(0, 1)`` (the
    first time, or when the batch gives rows of another shape: another batch size) or
    ``(stat_decay, 1 − stat_decay)``: ``X̄ ← stat_decay·X̄ + (1 − stat_decay)·X_b/√S_b`` and
    ``Ȳ`` alike with ``√ν_b`` (:class:`~fisherlab.blocks.skfac.SKFACBuilder`,
    ``average="rows"``). The step is ``(Γ ⊗ Ω + λI)⁻¹ g`` of the builder's block.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``.
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        stat_decay: Moving-average decay of the rows, in ``[0, 1)`` (restarted when the batch
            size changes).
        stat_every: Steps between statistics steps (as :class:`~fisherlab.optim.KFAC`): the
            rows are updated only when ``steps % stat_every == 0``; the steps in between solve
            with the block of the last statistics step (its eigenpairs computed once).
        conv_reduction: ``"sum"`` (reduce-sum) or ``"subsample"`` for layers with ``T > 1``.
        spatial_samples: Positions per sample for ``"subsample"`` (drawn anew at each
            statistics step, from a generator seeded with the step count).
        damping_mode: ``"eigen"`` (KFAC's damped inverse) or ``"factored"`` (as in the paper).
        fisher_type: ``"empirical"`` or ``"mc"``.
        loss_fn: The loss (needed for ``"mc"``, MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.

    Attributes:
        builders: ``{layer: SKFACBuilder}``, the layers' row-averaging builders.
    """

    hyper_parameters = (
        "stat_decay", "stat_every", "conv_reduction", "spatial_samples", "damping_mode",
    )  # fmt: skip
    method = "skfac"
    width_entry = ("X", 1)
    #: The generator is reseeded at each statistics step; the mode is the optimizer's.
    not_mirrored: ClassVar[tuple[str, ...]] = (
        *BuilderOptimizer.not_mirrored, "generator", "average_rows",
    )  # fmt: skip

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        stat_every: int = 1,
        conv_reduction: str = "sum",
        spatial_samples: int | None = None,
        damping_mode: str = "eigen",
        fisher_type: str = "empirical",
        loss_fn=None,
        **loop,
    ):
        self._blocks: dict[str, tuple[Tensor, BlockBuilder, SKFACBlock]] = {}
        super().__init__(
            model, lr, damping, momentum, weight_decay, fisher_type, loss_fn,
            stat_decay=stat_decay, stat_every=stat_every, conv_reduction=conv_reduction,
            spatial_samples=spatial_samples, damping_mode=damping_mode, **loop,
        )  # fmt: skip

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_choice("conv_reduction", group["conv_reduction"], CONV_REDUCTIONS)
        check_choice("damping_mode", group["damping_mode"], DAMPING_MODES)
        if group["spatial_samples"] is not None:
            check_positive_int("spatial_samples", group["spatial_samples"])

    def _builder_options(self, group: dict) -> dict[str, Any]:
        return {
            "average": "rows",
            "conv_reduction": group["conv_reduction"],
            "spatial_samples": group["spatial_samples"],
            "damping_mode": group["damping_mode"],
        }

    def _add(self, name: str, held: BlockBuilder, stats: LayerStats, group: dict) -> None:
        """Add the batch's rows to the moving average (a new one for rows of another shape)."""
        first = not self._mirrors.get(name) or not held.rows_fit(stats)
        held.seed_positions(self.steps)
        held.add(stats, *running_average_weights(first, group["stat_decay"]))

    def _prepare(self, jobs: dict[str, tuple[Tensor, Tensor, dict]], normaliser: float) -> None:
        self._update_builders(jobs, normaliser)

    def _block(self, name: str) -> SKFACBlock:
        """The builder's block, kept while the builder and its mirrored rows are the same."""
        rows, held = self.layer_state[name][BUILDER + "X"], self.builders[name]
        kept = self._blocks.get(name)
        if kept is None or kept[0] is not rows or kept[1] is not held:
            kept = self._blocks[name] = (rows, held, held.block())
        return kept[2]

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        return self._block(name).solve(grad, group["damping"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._blocks.clear()
