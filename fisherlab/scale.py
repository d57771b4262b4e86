r"""The Fisher's scale: its largest eigenvalue ``λ_max``, the yardstick for damping.

A damping ``λ`` means nothing on its own: ``(F + λI)⁻¹`` is within ``λ_max/λ`` of ``I/λ`` when
``λ ≫ λ_max`` (the preconditioner does nothing but rescale the learning rate), and follows the
curvature only when ``λ`` is well below ``λ_max``. :func:`fisher_scale` measures ``λ_max`` of the
Fisher over all parameters of the supported layers (not block by block), of a problem's data:

.. math::
    F = \frac1ν J^\top J, \qquad λ_{\max}(F) = \frac1ν λ_{\max}(JJ^\top) = \frac1ν λ_{\max}
    \Big(\sum_{\text{layers } l} J_l J_l^\top\Big),

since the Gram of the whole network is the sum of the layers' Grams (the rows of ``J`` are the
same samples, and classes for the true Fisher, in every layer). Each layer's Gram is the exact
Woodbury block's (:class:`~fisherlab.blocks.woodbury.WoodburyBlock`), so the cost is that of
TENGraD's step on the same samples: ``O(M²)`` memory for ``M`` rows (``N`` samples; ``N·C`` for
the true Fisher). The per-layer ``λ_max`` of each block comes with it.

Example:
    >>> import torch, fisherlab as fl
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> problem = fl.Problem(model, torch.nn.CrossEntropyLoss(), (x, y), fisher_type="empirical")
    >>> s = fisher_scale(problem)
    >>> bool(s.lambda_max >= max(s.per_layer.values()))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fisherlab.blocks import curvature
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError
from fisherlab.problem import Problem


@dataclass(frozen=True)
class FisherScale:
    """The largest eigenvalue of a Fisher, of the whole network and per layer block.

    Attributes:
        lambda_max: ``λ_max`` of the Fisher over all parameters of the supported layers.
        per_layer: ``λ_max`` of each layer's diagonal block, ``{name: value}``.
        samples: ``N`` of the data it was measured on.
        fisher_type: The Fisher type.
    """

    lambda_max: float
    per_layer: dict[str, float]
    samples: int
    fisher_type: str


def fisher_scale(problem: Problem, max_bytes: int = DEFAULT_MAX_BYTES) -> FisherScale:
    """``λ_max`` of the problem's Fisher over all its layers, from the sum of their Grams.

    Args:
        problem: The model, loss and data (any Fisher type).
        max_bytes: Memory budget of each layer's Woodbury block (refused beyond it, naming the
            size: take fewer samples).

    Returns:
        The whole network's and each block's largest eigenvalue.

    Raises:
        FisherlabError: When the Fisher holds NaN or Inf (an overflowing model), or the problem
            has no supported layer.
    """
    blocks = curvature("woodbury", problem, max_bytes=max_bytes)
    total = None
    per_layer = {}
    nu = float(blocks.normaliser)
    for name, block in blocks.items():
        gram = block.gram.to(torch.float64)
        if not bool(torch.isfinite(gram).all()):
            raise FisherlabError(f"the Fisher of layer {name!r} holds NaN or Inf values")
        per_layer[name] = float(torch.linalg.eigvalsh(gram)[-1]) / nu
        total = gram if total is None else total + gram
    if total is None:
        raise FisherlabError("the problem has no supported layer")
    return FisherScale(
        float(torch.linalg.eigvalsh(total)[-1]) / nu,
        per_layer,
        int(problem.num_samples or 0),
        problem.fisher_type,
    )


__all__ = ["FisherScale", "fisher_scale"]
