"""The engine that builds blocks from a data set: passes over its captures, fed to builders.

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

from fisherlab.blocks.base import REGISTRY, BuildContext, CurvatureBlock, Options
from fisherlab.capture import Capture, RangeCheck, cached_captures, captures
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError
from fisherlab.layers import Layer
from fisherlab.problem import Problem


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


def assemble(
    source: Source,
    specs: Sequence[tuple[str, Options]],
    names: Sequence[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[dict[str, CurvatureBlock]]:
    """Blocks of several methods, built in shared passes over the source.

    Args:
        source: Where the statistics come from.
        specs: ``(method, options)`` pairs.
        names: Layers to build (default: all of the source's).
        max_bytes: Memory budget of each large object.

    Returns:
        One ``{layer_name: block}`` per spec, in order.
    """
    names = list(source.layers) if names is None else list(names)
    context = BuildContext(
        source.fisher_type, max_bytes, source.num_samples, source.all_reduce, source.all_gather
    )
    builders = [
        {name: method_class(m).Builder(source.layers[name], options, context) for name in names}
        for m, options in specs
    ]
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
                for b in active:
                    lc = cap[b.layer.name]
                    b.add(lc.A, lc.G, pass_index)
            normaliser, _ = source.totals()
            for b in active:
                b.end_pass(pass_index, normaliser)
    normaliser, num_samples = source.totals()
    return [{name: b.finish(normaliser, num_samples) for name, b in bs.items()} for bs in builders]
