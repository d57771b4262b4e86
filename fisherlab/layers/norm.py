r"""Scale-and-shift layers: ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm``, ``nn.GroupNorm``.

Each normalises its input ``x`` to ``x̂`` and applies a per-feature affine map,
``y_{t,c} = γ_c x̂_{t,c} + β_c`` at ``T`` positions per sample (``T = H·W`` for BatchNorm2d and
GroupNorm on images, the leading dimensions of a LayerNorm input, ``1`` for vectors). The
*matrix view* is ``[γ | β] ∈ R^{C × 2}`` (``d_out = C`` features, ``d_in = 1``, a bias column),
so parameter order ``[γ…, β…]`` is the standard layout; the per-sample gradient is

.. math::
    \Big[\sum_t g_{t,c}\, x̂_{t,c},\; \sum_t g_{t,c}\Big]_{c = 1..C},

not of the form ``G_nᵀÃ_n`` (each feature has its own input ``x̂_c``): the layers are not
Kronecker-structured, and the Kronecker methods give them kfac-jax's scale-and-shift blocks
(:mod:`fisherlab.blocks.scale_shift`).

``x̂`` is computed from the module's input with the statistics the module itself uses:
``LayerNorm`` and ``GroupNorm`` per sample, ``BatchNorm`` in eval mode from its running
statistics. Then the samples are independent and the Fisher is that of the network as a
function of its parameters, exactly.

**BatchNorm in training mode** normalises with the batch's mean and variance, which couple the
samples: a sample's loss depends on the other samples' inputs, so per-sample gradients (and the
per-sample Fisher ``(1/ν) Σ_n j_n j_nᵀ``) are undefined. fisherlab's choice:

* every per-sample analysis (:class:`~fisherlab.problem.Problem`: ``exact_blocks``,
  ``curvature``, ``compare``, ``verify``) refuses such a model by name and asks for
  ``model.eval()`` (:func:`~fisherlab.layers.find_layers`);
* where training-mode statistics are read anyway (an optimizer's recorder), the layer is
  treated as an affine map of the normalised input with the batch statistics held constant —
  ``x̂`` is the batch-normalised input of that call, as kfac-jax and the KFAC literature do. Its
  rows then sum to the exact batch gradient of ``γ`` and ``β`` (the statistics do not depend on
  them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fisherlab.layers.base import LayerAdapter


def _channels_last(t: Tensor) -> Tensor:
    """``[N, C, *]`` → ``[N, T, C]`` with ``T`` the product of ``*`` (``1`` for ``[N, C]``)."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


class ScaleShiftAdapter(LayerAdapter):
    """Shared reading of a scale-and-shift layer (subclasses compute ``x̂`` and the layout)."""

    kind = "scale_shift"
    kronecker = False

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.numel(), 1

    def normalised(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x̂`` in the layout of the module's input (subclasses)."""
        raise NotImplementedError

    def layout(self, module: nn.Module, t: Tensor) -> Tensor:
        """A tensor shaped like the module's input or output → ``[N, T, C]``."""
        return _channels_last(t)

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.layout(module, self.normalised(module, x))

    def output_rows(self, module: nn.Module, g: Tensor) -> Tensor:
        return self.layout(module, g)

    def gradient_rows(self, module: nn.Module, A: Tensor, G: Tensor) -> Tensor:
        """``[Σ_t g·x̂, Σ_t g]`` per feature: ``[..., N, C, 2]`` (``[..., N, C, 1]`` without β).

        ``A = x̂ [N, T, C]``, ``G [..., N, T, C]``.
        """
        scale = (G * A).sum(dim=-2)
        if module.bias is None:
            return scale.unsqueeze(-1)
        return torch.stack([scale, G.sum(dim=-2)], dim=-1)


class BatchNormAdapter(ScaleShiftAdapter):
    """``nn.BatchNorm1d/2d/3d`` with ``affine=True``: eval mode (running statistics).

    In training mode ``x̂`` uses the batch statistics of the call (module docstring); a module
    without running statistics (``track_running_stats=False``) uses batch statistics in eval
    mode too, and is refused.
    """

    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def unsupported_reason(self, module: nn.modules.batchnorm._BatchNorm) -> str | None:
        if module.running_mean is None:
            return (
                "track_running_stats=False: it normalises with the batch's statistics even in "
                "eval mode, which couples the samples (per-sample gradients are undefined)"
            )
        return None

    def normalised(self, module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
        if module.training:  # batch statistics, held constant; running statistics untouched
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(
            x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
        )


class LayerNormAdapter(ScaleShiftAdapter):
    """``nn.LayerNorm`` with ``elementwise_affine=True`` (with or without ``bias``).

    ``normalized_shape`` may have several dimensions: the ``C = prod(normalized_shape)``
    features are the trailing dimensions, flattened row-major (the order of ``γ.flatten()``);
    every leading dimension after the first (the sample) is a position.
    """

    module_types = (nn.LayerNorm,)

    def normalised(self, module: nn.LayerNorm, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def layout(self, module: nn.LayerNorm, t: Tensor) -> Tensor:
        features = math.prod(module.normalized_shape)
        return t.reshape(t.shape[0], -1, features)


class GroupNormAdapter(ScaleShiftAdapter):
    """``nn.GroupNorm`` with ``affine=True``: statistics per sample and group, ``γ, β`` per channel.

    ``C = num_channels``; every position of ``[N, C, *]`` after the channels is a position.
    """

    module_types = (nn.GroupNorm,)

    def normalised(self, module: nn.GroupNorm, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)
