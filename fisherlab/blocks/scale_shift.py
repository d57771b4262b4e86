r"""Scale-and-shift blocks: what the Kronecker methods give BatchNorm, LayerNorm and GroupNorm.

A scale-and-shift layer (:mod:`fisherlab.layers.norm`) has per-sample gradients
``[Σ_t g·x̂, Σ_t g]`` per feature — not ``G_nᵀÃ_n`` — so KFAC's factorisation does not apply.
As in kfac-jax (``ScaleAndShiftDiagonal``, ``ScaleAndShiftFull``), the methods ``kfac``,
``ekfac`` and ``skfac`` give such a layer one of two blocks, chosen by their option
``scale_shift``:

* ``"diagonal"`` (the default, as kfac-jax): :class:`ScaleAndShiftDiagonal`,
  :math:`\mathrm{diag}(F)` over ``[γ, β]`` (``2C`` numbers);
* ``"full"``: :class:`ScaleAndShiftFull`, the dense ``2C×2C`` block ``(1/ν) JᵀJ`` — the exact
  block of the layer, affordable because ``P = 2C`` is small.

Both are built from the adapter's gradient rows, like the ``diag`` and ``exact`` methods (whose
builders and kernels they reuse); they are not methods of their own: ``block.method`` is the
method that built them (``"kfac"``, …) and the class says which block it is. The
(method, layer kind) table of :mod:`fisherlab.blocks.assemble` maps ``(kfac|ekfac|skfac,
"scale_shift")`` to :class:`ScaleShiftBlock`.
"""

from __future__ import annotations

from fisherlab.blocks.assemble import KIND_BLOCKS, SCALE_SHIFT_BLOCKS
from fisherlab.blocks.base import REGISTRY, BlockBuilder, BuildContext, CurvatureBlock, Options
from fisherlab.blocks.diag import DiagBlock, DiagBuilder
from fisherlab.blocks.exact import ExactBlock, ExactBuilder
from fisherlab.layers import Layer


def _method_of(options: Options) -> str:
    """The registered method whose options these are (``""`` if none)."""
    return next((m for m, cls in REGISTRY.items() if type(options) is cls.Options), "")


class ScaleShiftBuilder(BlockBuilder):
    """Sums of squared rows (diagonal) or of their outer products (full), over the data set."""

    def __init__(self, layer: Layer, options: Options, context: BuildContext):
        super().__init__(layer, options, context)
        self.full = getattr(options, "scale_shift", "diagonal") == "full"
        self.inner = (ExactBuilder if self.full else DiagBuilder)(layer, options, context)

    def add(self, A, G, pass_index: int) -> None:
        self.inner.add(A, G, pass_index)

    def finish(self, normaliser: float, num_samples: int) -> CurvatureBlock:
        built = self.inner.finish(normaliser, num_samples)
        fisher_type = self.context.fisher_type
        if self.full:
            block = ScaleAndShiftFull(self.layer, built.matrix, fisher_type, self.options)
        else:
            block = ScaleAndShiftDiagonal(self.layer, built.diagonal, fisher_type, self.options)
        block.method = _method_of(self.options) or block.method
        return block


class ScaleShiftBlock(CurvatureBlock):
    """The block class the table names for scale-and-shift layers under ``kfac|ekfac|skfac``.

    Its builder makes a :class:`ScaleAndShiftDiagonal` or a :class:`ScaleAndShiftFull` by the
    method's ``scale_shift`` option. Defines no ``method``: it is not a method of its own.
    """

    Builder = ScaleShiftBuilder


class ScaleAndShiftDiagonal(ScaleShiftBlock, DiagBlock):
    """``diag(F)`` of a scale-and-shift layer (kfac-jax's ``ScaleAndShiftDiagonal``)."""


class ScaleAndShiftFull(ScaleShiftBlock, ExactBlock):
    """The dense ``2C×2C`` block of a scale-and-shift layer (kfac-jax's ``ScaleAndShiftFull``)."""


KIND_BLOCKS["scale_shift"] = ScaleShiftBlock


__all__ = [
    "SCALE_SHIFT_BLOCKS",
    "ScaleAndShiftDiagonal",
    "ScaleAndShiftFull",
    "ScaleShiftBlock",
    "ScaleShiftBuilder",
]
