"""Block-diagonal curvature: every representation built from the same captured statistics.

``fl.curvature(method, problem, **options)`` streams the problem's data (one batch or a data set
of batches) through the method's builder and returns ``{module_name: block}``; every block
implements :class:`~fisherlab.blocks.base.CurvatureBlock` (``to_dense``, ``matvec``, ``solve``,
``eigvalsh``, ``nbytes``, ``as_linear_operator``). ``fl.curvature(method, model, loss_fn, inputs,
targets, fisher_type=...)`` is the one-batch shorthand. ``build(method, capture, **options)``
builds from an existing :class:`~fisherlab.capture.Capture`, and :func:`curvatures` builds
several methods in shared passes.

A layer's statistics become its block through the method's builder
(:class:`~fisherlab.blocks.base.BlockBuilder`): ``builder.add(stats, old_weight, new_weight)``
serves both a sum over a data set (what ``curvature`` does, weights ``(1, 1)``) and a running
average (an optimizer's); :func:`builder` makes one for a layer.

Methods are registered by their block classes, one file each in this package (adding a file
adds a method). Built in, with their options (defaults first):

=============  ===============================================================================
``exact``      dense ``(1/ν)JᵀJ``
``kfac``       ``kfac_approx="expand"|"reduce"``, ``damping_mode="eigen"|"factored"``
``ekfac``      ``kfac_approx``, ``basis=`` (an earlier ``ekfac`` result or ``{name: (U_Γ, U_Ω)}``)
``woodbury``   ``conv_gram="exact"|"reduce_sum"``, ``gram_route="auto"|"covariance"|"gradients"``
``skfac``      ``conv_reduction="sum"|"subsample"``, ``spatial_samples``, ``seed=0``,
               ``damping_mode="eigen"|"factored"``
``diag``       the diagonal of ``F``
=============  ===============================================================================

``kfac``, ``ekfac`` and ``skfac`` also take ``scale_shift="diagonal"|"full"``: the block of a
scale-and-shift layer (BatchNorm, LayerNorm, GroupNorm; :mod:`fisherlab.blocks.scale_shift`).
Which block each method builds for each layer kind is the table
:data:`~fisherlab.blocks.assemble.BLOCK_TABLE`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fisherlab.blocks.assemble import (
    BLOCK_TABLE,
    Source,
    assemble,
    block_class,
    method_class,
    methods_for,
)
from fisherlab.blocks.base import (
    REGISTRY,
    BlockBuilder,
    BuildContext,
    CurvatureBlock,
    LayerStats,
    Options,
)
from fisherlab.capture import Capture
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, check_damping
from fisherlab.layers import Layer
from fisherlab.problem import Problem, as_problem

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

#: The built-in methods (every method is in :data:`~fisherlab.blocks.base.REGISTRY`).
METHODS: tuple[str, ...] = tuple(REGISTRY)


class CurvatureDict(dict):
    """``{module_name: CurvatureBlock}`` that records how it was built.

    Attributes:
        method: The method name.
        fisher_type: The Fisher type of the captured statistics.
        options: All options (defaults filled in).
        normaliser: ``ν`` of the loss over the data.
        missing: ``{layer name: reason}`` of layers the method has no block for (left out
            when built with ``missing="skip"``).
    """

    def __init__(
        self,
        blocks: dict[str, CurvatureBlock],
        method: str,
        fisher_type: str,
        options: dict,
        normaliser: float,
        missing: dict[str, str] | None = None,
    ):
        super().__init__(blocks)
        self.method, self.fisher_type, self.options, self.normaliser = (
            method,
            fisher_type,
            options,
            normaliser,
        )
        self.missing = dict(missing or {})


def parse_options(method: str, options: dict[str, Any], text: bool = False) -> Options:
    """The typed options of ``method`` (see :meth:`~fisherlab.blocks.base.Options.parse`)."""
    return method_class(method).Options.parse(method, options, text=text)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"woodbury:conv_gram=reduce_sum,gram_route=auto"`` → ``("woodbury", {...})``.

    Values are converted to the options' types (``spatial_samples=8`` is an ``int``); a value
    that does not convert, an unknown option or method is a clear error.
    """
    if not isinstance(spec, str):
        raise FisherlabError(
            f"a method spec is a string like 'kfac:kfac_approx=reduce', got {spec!r}"
        )
    method, _, rest = spec.partition(":")
    raw: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise FisherlabError(f"option {item!r} in method {spec!r} is not of the form key=value")
        raw[key.strip()] = value.strip()
    typed = parse_options(method, raw, text=True)
    return method, {key: getattr(typed, key) for key in raw}


def _specs(methods: Sequence[str | tuple[str, dict]]) -> list[tuple[str, str, Options]]:
    out = []
    for spec in methods:
        if isinstance(spec, tuple):
            method, options = spec
            label = method
        else:
            method, options = parse_method(spec)
            label = spec
        out.append((label, method, parse_options(method, options)))
    return out


def curvatures(
    problem: Problem,
    methods: Sequence[str | tuple[str, dict]],
    names: Sequence[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    missing: str = "raise",
) -> dict[str, CurvatureDict]:
    """Several methods over a problem's data, built in shared passes.

    Args:
        problem: The problem.
        methods: Specs ``"name"`` or ``"name:option=value,…"``, or ``(name, options)`` pairs.
        names: Layers to build (default: all).
        max_bytes: Memory budget of each large object.
        missing: ``"raise"`` (default): a layer a method has no block for is refused;
            ``"skip"``: left out, its reason in :attr:`CurvatureDict.missing`.

    Returns:
        ``{spec: CurvatureDict}``.
    """
    specs = _specs(methods)
    skipped: list[dict[str, str]] = [{} for _ in specs]
    results = assemble(
        Source.of(problem), [(m, o) for _, m, o in specs], names, max_bytes, missing, skipped
    )
    return {
        label: CurvatureDict(blocks, m, problem.fisher_type, o.as_dict(), problem.normaliser, gone)
        for (label, m, o), blocks, gone in zip(specs, results, skipped)
    }


def build(
    method: str,
    statistics: Capture | Problem,
    max_bytes: int = DEFAULT_MAX_BYTES,
    names: Sequence[str] | None = None,
    **options: Any,
) -> CurvatureDict:
    """Blocks of one method from a capture (or a problem); options as keyword arguments."""
    opts = parse_options(method, options)
    source = Source.of(statistics)
    (blocks,) = assemble(source, [(method, opts)], names, max_bytes)
    normaliser = source.totals()[0]
    return CurvatureDict(blocks, method, source.fisher_type, opts.as_dict(), normaliser)


def build_block(
    method: str, cap: Capture, name: str, max_bytes: int = DEFAULT_MAX_BYTES, **options: Any
) -> CurvatureBlock:
    """One layer's block of one method from an existing capture."""
    return build(method, cap, max_bytes=max_bytes, names=[name], **options)[name]


def builder(
    method: str,
    layer: Layer,
    fisher_type: str,
    normalise: str = "data",
    max_bytes: int = DEFAULT_MAX_BYTES,
    **options: Any,
) -> BlockBuilder:
    """A builder of one layer's ``method`` block, to hold across batches or steps.

    Args:
        method: Any registered method that has a block for the layer's type (the table).
        layer: The layer (e.g. ``capture[name].layer`` or ``problem.layers[name]``).
        fisher_type: The Fisher type of the statistics it will be given.
        normalise: ``"data"`` (sums over a data set; ``block(normaliser=ν)``) or ``"batch"``
            (averages of per-batch estimates; ``block()``), see
            :class:`~fisherlab.blocks.base.BlockBuilder`.
        max_bytes: Memory budget of each large object.
        **options: Method options.

    Example:
        >>> import torch, fisherlab as fl
        >>> from fisherlab.blocks import LayerStats, builder
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> caps = [fl.capture(model, loss_fn, torch.randn(8, 4), torch.randint(0, 2, (8,)))
        ...         for _ in range(3)]
        >>> b = builder("kfac", caps[0]["0"].layer, "true", normalise="batch")
        >>> for k, cap in enumerate(caps):  # a running average with decay 0.9
        ...     b.add(LayerStats.of(cap, "0"), 0.0 if k == 0 else 0.9, 1.0 if k == 0 else 0.1)
        >>> b.block().solve(torch.ones(15), damping=1e-3).shape
        torch.Size([15])
    """
    opts = parse_options(method, options)
    context = BuildContext(fisher_type, max_bytes)
    return block_class(method, layer).Builder(layer, opts, context, normalise)


def curvature(
    method: str,
    problem: Problem | nn.Module,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    fisher_type: str | None = None,
    mc_samples: int | None = None,
    skip_unsupported: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    **options: Any,
) -> CurvatureDict:
    """Per-layer curvature blocks of one method, over a problem's data.

    Args:
        method: ``"exact"``, ``"kfac"``, ``"ekfac"``, ``"woodbury"``, ``"skfac"``, ``"diag"`` or
            any registered method.
        problem: A :class:`~fisherlab.problem.Problem` (one batch or a data set), or a model
            followed by ``loss_fn``, ``inputs``, ``targets`` (and ``fisher_type``, …) for one
            batch.
        loss_fn: With a model: ``nn.CrossEntropyLoss`` or ``nn.MSELoss``.
        inputs: With a model: batch inputs.
        targets: With a model: batch targets.
        fisher_type: With a model: ``"true"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: With a model: labels drawn per input for ``"mc"``.
        skip_unsupported: With a model: leave out unsupported modules with a warning.
        max_bytes: Memory budget for large objects (dense blocks, rows, Grams); refused
            beyond it with the size and an alternative.
        **options: Method options (module docstring).

    Returns:
        A :class:`CurvatureDict` ``{module_name: block}``.

    Example:
        >>> import torch, fisherlab as fl
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        >>> curv = fl.curvature("ekfac", fl.Problem(model, nn.CrossEntropyLoss(), data))
        >>> curv["0"].solve(torch.ones(15), damping=1e-3).shape
        torch.Size([15])
    """
    parse_options(method, options)  # refuse bad options before any computation
    problem = as_problem(
        problem, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported
    )
    return build(method, problem, max_bytes=max_bytes, **options)


__all__ = [
    "BLOCK_TABLE",
    "METHODS",
    "REGISTRY",
    "BlockBuilder",
    "CurvatureBlock",
    "CurvatureDict",
    "LayerStats",
    "block_class",
    "build",
    "build_block",
    "builder",
    "check_damping",
    "curvature",
    "curvatures",
    "methods_for",
    "parse_method",
]
