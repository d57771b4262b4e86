"""Which modules of a model fisherlab treats as layers (:func:`find_layers`), and which it refuses.

A module with parameters is a layer when an adapter reads its type (:mod:`fisherlab.layers`);
otherwise it is refused by name, or skipped with a warning when the caller asks.
"""

from __future__ import annotations

import warnings

from torch import nn

from fisherlab.conventions import FisherlabError, UnsupportedLayerError
from fisherlab.layers.base import ADAPTERS, Layer, LayerAdapter, adapter_for

#: Modules that draw random numbers in training mode (their Fisher would be one random draw).
RANDOM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _training_mode_problem(name: str, module: nn.Module) -> str | None:
    """Why a module in training mode makes per-sample curvature undefined (``None`` if not)."""
    if not module.training:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            f"module {name!r} ({type(module).__name__}) is in training mode and couples the "
            "samples of a batch, so per-sample gradients are undefined; call model.eval()"
        )
    if isinstance(module, RANDOM_MODULES) and getattr(module, "p", 0) > 0:
        return (
            f"module {name!r} ({type(module).__name__}) is in training mode: the curvature would "
            "be that of one random mask; call model.eval()"
        )
    return _adapter_training_problem(name, module)


def _adapter_training_problem(name: str, module: nn.Module) -> str | None:
    """The adapter's own reason why the module's training mode is not supported."""
    adapter = adapter_for(module)
    problem = adapter.training_problem(module) if adapter is not None else None
    return None if problem is None else f"module {name!r} ({type(module).__name__}) {problem}"


def _claimed_sublayers(name: str, module: nn.Module) -> dict[str, tuple[str, LayerAdapter]]:
    """Submodules whose parameters ``module`` uses functionally: ``{full name: (parent, adapter)}``.

    E.g. ``nn.MultiheadAttention``'s ``out_proj``.

    Asked of the adapter of the module's type even when the module overrides ``forward`` (a
    parent that is not supported takes its claimed submodules with it).
    """
    for base in type(module).__mro__:
        if base in ADAPTERS:
            return {
                f"{name}.{sub}" if name else sub: (name, adapter)
                for sub, adapter in ADAPTERS[base].sublayers(module).items()
            }
    return {}


def find_layers(
    model: nn.Module,
    skip_unsupported: bool = False,
    for_optimizer: bool = False,
    require_any: bool = True,
) -> dict[str, Layer]:
    """The supported layers of a model, keyed by their names in ``model.named_modules()``.

    A submodule whose parameters its parent uses functionally (``nn.MultiheadAttention``'s
    ``out_proj``; :meth:`~fisherlab.layers.LayerAdapter.sublayers`) is read with the parent's
    adapter for it, and left out with the parent when the parent is not supported.

    Args:
        model: Any ``nn.Module`` graph.
        skip_unsupported: Skip modules with parameters that fisherlab does not support (with a
            warning naming them) instead of raising.
        for_optimizer: The layers an optimizer preconditions: BatchNorm and Dropout in training
            mode are accepted (optimizers approximate anyway), unsupported modules are always
            skipped with a warning, and a layer sharing a parameter with a skipped module is
            left out (plain gradient) instead of refused.
        require_any: Refuse a model without any supported layer.

    Raises:
        UnsupportedLayerError: naming the module and its type, when a module with parameters
            is not supported and ``skip_unsupported`` is false, or when a parameter is shared
            by two supported layers, or by a supported layer and a skipped module (its block
            would miss the gradient through the skipped module).
        FisherlabError: when the model has no supported layer, or a module in training mode
            makes per-sample curvature undefined (BatchNorm, Dropout).
    """
    skip_unsupported = skip_unsupported or for_optimizer
    layers: dict[str, Layer] = {}
    skipped: list[str] = []
    skipped_owner: dict[int, str] = {}
    owner: dict[int, str] = {}
    claimed: dict[str, tuple[str, LayerAdapter]] = {}
    for name, module in model.named_modules():
        problem = _training_mode_problem(name, module)
        if problem is not None and not for_optimizer:
            raise FisherlabError(problem)
        claimed.update(_claimed_sublayers(name, module))
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        adapter = adapter_for(module)
        parent, claim = claimed.get(name, (None, None))
        if claim is not None:  # used functionally by its parent: its layer is the parent's
            adapter = claim if parent in layers else None
        if adapter is None and parent is not None:
            reason = f"it is used by its parent {parent!r}, which is not supported"
        elif adapter is None:
            reason = (
                "this layer type is not supported (supported: "
                + ", ".join(sorted(t.__name__ for t in ADAPTERS))
                + ")"
            )
        else:
            reason = adapter.unsupported_reason(module)
            if reason is None and for_optimizer:  # the mode an optimizer trains in
                reason = adapter.training_problem(module)
            extra = {n for n, _ in own} - set(adapter.parameter_names(module))
            if reason is None and extra:
                reason = f"unexpected parameters {sorted(extra)}"
        if reason is not None:
            message = f"module {name!r} ({type(module).__name__}) has parameters but {reason}"
            if not skip_unsupported:
                raise UnsupportedLayerError(
                    message + "; pass skip_unsupported=True to leave it out"
                )
            skipped.append(message)
            for _, p in own:
                skipped_owner.setdefault(id(p), f"{name!r} ({type(module).__name__})")
            continue
        layer = Layer(name, module, adapter)
        for p in layer.parameters():
            if id(p) in owner:
                raise UnsupportedLayerError(
                    f"a parameter is shared by modules {owner[id(p)]!r} and {name!r}; "
                    "tied weights are not supported"
                )
            owner[id(p)] = name
        layers[name] = layer
    for name, layer in list(layers.items()):
        tied = {skipped_owner[id(p)] for p in layer.parameters() if id(p) in skipped_owner}
        if not tied:
            continue
        message = (
            f"module {name!r} ({layer.kind}) shares a parameter with the skipped module "
            f"{', '.join(sorted(tied))}: its block would miss the gradient through that module"
        )
        if not for_optimizer:
            raise UnsupportedLayerError(message + "; untie the weights or leave both out")
        skipped.append(message)
        del layers[name]
    if skipped:
        warnings.warn(
            "skipping unsupported layers: " + "; ".join(skipped), UserWarning, stacklevel=3
        )
    if not layers and require_any:
        raise FisherlabError(
            f"model {type(model).__name__} has no supported layer "
            f"({', '.join(sorted(t.__name__ for t in ADAPTERS))})"
        )
    return layers
