"""fisherlab: the curvature of neural networks in PyTorch.

Exact Fisher blocks as ground truth, the captured layer statistics every approximation is built
from, and (in later modules) block approximations, metrics, figures and optimizers.
"""

from fisherlab import analysis, data, metrics, models, optim, plots, zoo
from fisherlab.blocks import METHODS, CurvatureDict, curvature
from fisherlab.capture import Capture, LayerCapture, capture
from fisherlab.comparison import compare
from fisherlab.conventions import (
    FISHER_TYPES,
    FisherlabError,
    MemoryBudgetError,
    UnsupportedLayerError,
)
from fisherlab.exact import BlockDict, ExactFisher, exact_blocks, exact_fisher
from fisherlab.verification import verify

__version__ = "0.1.0"

__all__ = [
    "FISHER_TYPES",
    "METHODS",
    "BlockDict",
    "Capture",
    "CurvatureDict",
    "ExactFisher",
    "FisherlabError",
    "LayerCapture",
    "MemoryBudgetError",
    "UnsupportedLayerError",
    "analysis",
    "capture",
    "compare",
    "curvature",
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
