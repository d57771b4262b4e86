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


def _as_scale_shift(block: CurvatureBlock, options: Options) -> CurvatureBlock:
    """The ``diag``/``exact`` block a builder made, as the scale-and-shift block it is."""
    if isinstance(block, ExactBlock):
        out = ScaleAndShiftFull(block.layer, block.matrix, block.fisher_type, options)
    else:
        out = ScaleAndShiftDiagonal(block.layer, block.diagonal, block.fisher_type, options)
    out.method = _method_of(options) or out.method
    return out


class ScaleShiftDiagonalBuilder(DiagBuilder):
    """Weighted sums of squared rows; builds :class:`ScaleAndShiftDiagonal`."""

    def block(self, normaliser: float | None = None) -> CurvatureBlock:
        return _as_scale_shift(super().block(normaliser), self.options)


class ScaleShiftFullBuilder(ExactBuilder):
    """Weighted sums of the rows' outer products; builds :class:`ScaleAndShiftFull`."""

    def block(self, normaliser: float | None = None) -> CurvatureBlock:
        return _as_scale_shift(super().block(normaliser), self.options)

    def finish(self, normaliser: float, num_samples: int) -> CurvatureBlock:
        return _as_scale_shift(super().finish(normaliser, num_samples), self.options)


def scale_shift_builder(
    layer: Layer, options: Options, context: BuildContext, normalise: str = "data"
) -> BlockBuilder:
    """The builder of the method's ``scale_shift`` option (``"diagonal"`` by default)."""
    full = getattr(options, "scale_shift", "diagonal") == "full"
    kind = ScaleShiftFullBuilder if full else ScaleShiftDiagonalBuilder
    return kind(layer, options, context, normalise)


class ScaleShiftBlock(CurvatureBlock):
    """The block class the table names for scale-and-shift layers under ``kfac|ekfac|skfac``.

    Its builder (:func:`scale_shift_builder`) makes a :class:`ScaleAndShiftDiagonal` or a
    :class:`ScaleAndShiftFull` by the method's ``scale_shift`` option. Defines no ``method``: it
    is not a method of its own.
    """

    Builder = staticmethod(scale_shift_builder)


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
    "ScaleShiftDiagonalBuilder",
    "ScaleShiftFullBuilder",
    "scale_shift_builder",
]
