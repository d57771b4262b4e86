"""fisherlab: the curvature of neural networks in PyTorch.

A :class:`Problem` (model, loss, one batch or a data set of batches, Fisher type) is accepted by
every entry point: exact Fisher blocks and the full matrix as ground truth, the block
approximations built from the same captured layer statistics, their comparison and verification,
figures, and (in :mod:`fisherlab.optim`) optimizers.
"""

import importlib
from typing import Any

from fisherlab import data, metrics, models, optim, zoo
from fisherlab.blocks import METHODS, REGISTRY, CurvatureDict, curvature, curvatures
from fisherlab.capture import Capture, LayerCapture, Recorder, capture
from fisherlab.comparison import compare
from fisherlab.conventions import (
    FISHER_TYPES,
    FisherlabError,
    MemoryBudgetError,
    UnsupportedLayerError,
)
from fisherlab.exact import BlockDict, ExactFisher, exact_blocks, exact_fisher
from fisherlab.problem import Problem
from fisherlab.verification import verify

__version__ = "0.1.0"

#: The applications, imported on first use: ``import fisherlab`` loads no plotting library.
_LAZY = ("analysis", "plots", "experiments")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FISHER_TYPES",
    "METHODS",
    "REGISTRY",
    "BlockDict",
    "Capture",
    "CurvatureDict",
    "ExactFisher",
    "FisherlabError",
    "LayerCapture",
    "MemoryBudgetError",
    "Problem",
    "Recorder",
    "UnsupportedLayerError",
    "analysis",
    "capture",
    "compare",
    "curvature",
    "curvatures",
    "data",
    "exact_blocks",
    "exact_fisher",
    "metrics",
    "models",
    "optim",
    "plots",
    "verify",
    "zoo",
]
