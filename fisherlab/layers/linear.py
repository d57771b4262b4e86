"""``nn.Linear`` on ``[N, d_in]`` or ``[N, *, d_in]``: ``z_t = W a_t + b`` at ``T`` positions."""

from __future__ import annotations

from torch import Tensor, nn

from fisherlab.layers.base import LayerAdapter, append_ones


class LinearAdapter(LayerAdapter):
    """``nn.Linear``; every leading position of a sequence input shares ``W`` (``T = S``)."""

    kind = "linear"
    module_types = (nn.Linear,)

    def inputs(self, module: nn.Linear, x: Tensor) -> Tensor:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        return append_ones(a, module.bias is not None)

    def output_rows(self, module: nn.Linear, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])
