"""``nn.Conv2d``: inputs unfolded into patches, the weight read as ``C_out × C_in·k_h·k_w``.

``T = H_out·W_out`` positions per sample share the weight (KFC, Grosse & Martens 2016).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fisherlab.layers.base import LayerAdapter, append_ones


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with any stride, padding (numbers, ``"valid"``, ``"same"``) and dilation."""

    kind = "conv2d"
    module_types = (nn.Conv2d,)

    def unsupported_reason(self, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        return None

    def inputs(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same": PyTorch pads the extra element on the right/bottom
                pads = []
                for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
                padding = (0, 0)
        patches = F.unfold(
            x,
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=padding,
            stride=module.stride,
        )  # [N, C_in·kh·kw, T]
        return append_ones(patches.transpose(1, 2), module.bias is not None)

    def output_rows(self, module: nn.Conv2d, g: Tensor) -> Tensor:
        return g.flatten(start_dim=2).transpose(1, 2)
