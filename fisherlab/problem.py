"""A validated curvature problem: model, loss, batch, Fisher type, and the layers it covers.

Every entry point (capture, exact blocks, later the approximations) starts by building a
:class:`Problem`, so that bad input is refused in one place, before any computation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fisherlab.conventions import FisherlabError, check_fisher_type
from fisherlab.layers import Layer, find_layers
from fisherlab.losses import LossSpec


@dataclass(frozen=True)
class Problem:
    """Inputs to a curvature computation, checked.

    Attributes:
        model: The network.
        loss_fn: The loss module as the user wrote it.
        loss: What fisherlab read from ``loss_fn``.
        inputs: Batch inputs ``[N, ...]``.
        targets: Batch targets ``[N, ...]``.
        fisher_type: ``"true"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels drawn per input for ``"mc"``.
        layers: The supported layers, keyed by module name.
    """

    model: nn.Module
    loss_fn: nn.Module
    loss: LossSpec
    inputs: Tensor
    targets: Tensor
    fisher_type: str
    mc_samples: int
    layers: dict[str, Layer]

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        fisher_type: str = "true",
        mc_samples: int = 1,
        skip_unsupported: bool = False,
    ) -> Problem:
        """Check everything that can be checked without a forward pass."""
        if not isinstance(model, nn.Module):
            raise FisherlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_fisher_type(fisher_type, mc_samples)
        loss = LossSpec.from_module(loss_fn)
        loss.check_batch(inputs, targets)
        layers = find_layers(model, skip_unsupported=skip_unsupported)
        return cls(model, loss_fn, loss, inputs, targets, fisher_type, mc_samples, layers)

    @property
    def batch_size(self) -> int:
        """``N``."""
        return self.inputs.shape[0]
