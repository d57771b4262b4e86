"""Layer adapters: one file per layer type, each reading its statistics and its parameters.

:mod:`fisherlab.layers.base` defines the interface (:class:`LayerAdapter`) and :class:`Layer`;
each other module of this package defines the adapter of one layer type (defining it registers
it in :data:`ADAPTERS`, so adding a file adds a layer type); :func:`find_layers` finds a model's
layers.
"""

from __future__ import annotations

import importlib
import pkgutil

from fisherlab.layers.base import ADAPTERS, Layer, LayerAdapter, adapter_for, append_ones
from fisherlab.layers.discovery import RANDOM_MODULES, find_layers

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "discovery"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "ADAPTERS",
    "RANDOM_MODULES",
    "Layer",
    "LayerAdapter",
    "adapter_for",
    "append_ones",
    "find_layers",
]
