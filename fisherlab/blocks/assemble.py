"""The (method, layer kind) table, and the engine that builds blocks from a data set.

:data:`BLOCK_TABLE` says which block each method builds for each kind of layer
(:attr:`fisherlab.layers.LayerAdapter.kind`); a method without an entry for a kind has no block
for it, and :func:`block_class` refuses it by name with the methods that do. A registered method
without any entry (one defined outside this package) builds its own block for the Kronecker
layer kinds :data:`DEFAULT_KINDS`.

The engine streams captures through builders:

A *source* is where the captured statistics come from: a :class:`~fisherlab.problem.Problem`
(its batches, captured one after the other, in as many passes as the slowest builder needs;
with more than one pass, the captures of the first are replayed from memory when they fit the
problem's ``cache_bytes``) or one :class:`~fisherlab.capture.Capture`. Several methods share the
passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import Tensor

from fisherlab.blocks.base import REGISTRY, BuildContext, CurvatureBlock, LayerStats, Options
from fisherlab.capture import Capture, RangeCheck, cached_captures, captures
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, UnsupportedLayerError
from fisherlab.layers import Layer
from fisherlab.problem import Problem

#: Layer kinds every method reads: ``z_t = W ã_t (+ b)`` with Kronecker-structured gradients.
DEFAULT_KINDS: tuple[str, ...] = ("linear", "conv2d")

#: Values of the Kronecker methods' option ``scale_shift``: the block they give a
#: scale-and-shift layer (:mod:`fisherlab.blocks.scale_shift`; kfac-jax's default first).
SCALE_SHIFT_BLOCKS: tuple[str, ...] = ("diagonal", "full")

#: ``(method, layer kind) → name of the block class`` that method builds for that kind of
#: layer: a registered method, or a block of :data:`KIND_BLOCKS`. Adding a block for a new
#: layer kind is one entry here.
BLOCK_TABLE: dict[tuple[str, str], str] = {
    (method, kind): method
    for method in ("exact", "kfac", "ekfac", "woodbury", "skfac", "diag")
    for kind in (*DEFAULT_KINDS, "embedding")
}
BLOCK_TABLE.update({(method, "scale_shift"): method for method in ("exact", "woodbury", "diag")})
BLOCK_TABLE.update(
    {(method, "scale_shift"): "scale_shift" for method in ("kfac", "ekfac", "skfac")}
)

#: Block classes the table names that are not methods of their own (filled in by their
#: modules): ``"scale_shift"`` → :class:`~fisherlab.blocks.scale_shift.ScaleShiftBlock`.
KIND_BLOCKS: dict[str, type[CurvatureBlock]] = {}

# nn.MultiheadAttention's input projection (fisherlab.layers.attention): a Linear layer over
# the tokens (its output projection is an ordinary "linear" layer).
BLOCK_TABLE.update(
    {
        (method, "mha_in_proj"): method
        for method in ("exact", "kfac", "ekfac", "woodbury", "skfac", "diag")
    }
)

#: Why a method has no block for a layer kind, where there is more to say than "none".
NO_BLOCK_REASONS: dict[tuple[str, str], str] = {}


@dataclass
class Source:
    """Captured statistics, pass after pass.

    Attributes:
        fisher_type: The Fisher type of the rows.
        layers: The layers the captures hold.
        one_pass: A function giving the captures of one pass (argument: a progress label).
        totals: ``(ν, N)`` of the data, valid after a complete pass.
        num_samples: ``N`` when known before the first pass (for memory estimates).
        all_reduce: Sum over the ranks holding shards of the data.
        all_gather: Concatenation over those ranks.
        cached: A context in which a complete pass is kept for the next ones (computations of
            more than one pass enter it).
    """

    fisher_type: str
    layers: dict[str, Layer]
    one_pass: Callable[[str], Iterable[Capture]]
    totals: Callable[[], tuple[float, int]]
    num_samples: int | None = None
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t
    all_gather: Callable[[Tensor, int], Tensor] = lambda t, dim: t
    cached: Callable[[], AbstractContextManager] = contextlib.nullcontext

    @classmethod
    def of(cls, statistics: Problem | Capture) -> Source:
        """The source of a problem's data or of one capture."""
        if isinstance(statistics, Problem):
            p = statistics
            return cls(
                p.fisher_type,
                p.layers,
                lambda desc: captures(p, desc),
                lambda: (p.normaliser, p.num_samples),
                p.num_samples_hint,
                p.all_reduce,
                p.all_gather,
                lambda: cached_captures(p),
            )
        if isinstance(statistics, Capture):
            cap = statistics
            return cls(
                cap.fisher_type,
                {name: lc.layer for name, lc in cap.items()},
                lambda desc: [cap],
                lambda: (cap.normaliser, cap.num_samples),
                cap.num_samples,
            )
        raise FisherlabError(
            f"curvature is built from a Problem or a Capture, got {type(statistics).__name__}"
        )


def method_class(method: str) -> type[CurvatureBlock]:
    """The block class of a method name, or a clear error listing the methods."""
    if not isinstance(method, str) or method not in REGISTRY:
        raise FisherlabError(f"unknown method {method!r}; valid methods are {tuple(REGISTRY)}")
    return REGISTRY[method]


def _table_entry(method: str, kind: str) -> str | None:
    entry = BLOCK_TABLE.get((method, kind))
    if entry is None and kind in DEFAULT_KINDS and not any(m == method for m, _ in BLOCK_TABLE):
        return method  # a method registered outside the table: its own block, default kinds
    return entry


def methods_for(kind: str) -> list[str]:
    """The methods that have a block for a layer kind."""
    return [m for m in REGISTRY if _table_entry(m, kind) is not None]


def no_block_reason(method: str, layer: Layer) -> str | None:
    """Why ``method`` has no block for ``layer`` (``None`` when it has one)."""
    method_class(method)
    if _table_entry(method, layer.layer_kind) is not None:
        return None
    why = NO_BLOCK_REASONS.get((method, layer.layer_kind), "")
    supported = ", ".join(methods_for(layer.layer_kind)) or "none"
    return (
        f"method {method!r} has no block for layer {layer.name!r} ({layer.kind})"
        + (f": {why}" if why else "")
        + f"; methods with a block for it: {supported}"
    )


def block_class(method: str, layer: Layer) -> type[CurvatureBlock]:
    """The block class ``method`` builds for ``layer`` (the table), or a clear refusal.

    Raises:
        UnsupportedLayerError: naming the layer, its type and the methods that support it.
    """
    reason = no_block_reason(method, layer)
    if reason is not None:
        raise UnsupportedLayerError(reason)
    entry = _table_entry(method, layer.layer_kind)
    return REGISTRY[entry] if entry in REGISTRY else KIND_BLOCKS[entry]


def assemble(
    source: Source,
    specs: Sequence[tuple[str, Options]],
    names: Sequence[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    missing: str = "raise",
    missing_out: list[dict[str, str]] | None = None,
) -> list[dict[str, CurvatureBlock]]:
    """Blocks of several methods, built in shared passes over the source.

    Args:
        source: Where the statistics come from.
        specs: ``(method, options)`` pairs.
        names: Layers to build (default: all of the source's).
        max_bytes: Memory budget of each large object.
        missing: ``"raise"``: a layer a method has no block for is refused
            (:func:`block_class`); ``"skip"``: it is left out of that method's blocks, and
            the reason is recorded in ``missing_out[spec index][layer name]``.
        missing_out: Filled with the skipped layers' reasons, one dict per spec.

    Returns:
        One ``{layer_name: block}`` per spec, in order.
    """
    names = list(source.layers) if names is None else list(names)
    context = BuildContext(
        source.fisher_type, max_bytes, source.num_samples, source.all_reduce, source.all_gather
    )
    builders = []
    for index, (m, options) in enumerate(specs):
        per_layer = {}
        for name in names:
            layer = source.layers[name]
            reason = no_block_reason(m, layer)
            if reason is not None and missing == "raise":
                raise UnsupportedLayerError(reason)
            if reason is not None:
                if missing_out is not None:
                    missing_out[index][name] = reason
                continue
            per_layer[name] = block_class(m, layer).Builder(layer, options, context)
        builders.append(per_layer)
    flat = [b for per_layer in builders for b in per_layer.values()]
    total_passes = max((b.passes for b in flat), default=0)
    in_range = RangeCheck()  # overflowing statistics: refused alike for every method
    with source.cached() if total_passes > 1 else contextlib.nullcontext():
        for pass_index in range(total_passes):
            active = [b for b in flat if b.passes > pass_index]
            label = "capture" if total_passes == 1 else f"capture (pass {pass_index + 1})"
            for cap in source.one_pass(label):
                if pass_index == 0:
                    in_range.add(cap)
                for b in active:  # a sum over the data: weights (1, 1), ν at the end
                    b.add(LayerStats.of(cap, b.layer.name))
            normaliser, _ = source.totals()
            for b in active:
                b.end_pass(normaliser)
    normaliser, num_samples = source.totals()
    return [{name: b.finish(normaliser, num_samples) for name, b in bs.items()} for bs in builders]
