r"""Layer adapters: how to read homogeneous inputs ``Ã`` and output gradients ``G`` of a layer.

A supported layer computes ``z_t = W a_t + b`` at ``T`` positions per sample: ``T = 1`` for a
``Linear`` layer on vectors, ``T = S`` for a ``Linear`` layer on sequences ``[N, S, d_in]``, and
``T = H_out·W_out`` for ``Conv2d`` (inputs unfolded into patches, the weight read as the matrix
``C_out × C_in·k_h·k_w``). Per sample ``n``:

* ``Ã_n ∈ R^{T × (d_in + 1)}`` (the ``1`` column only with bias),
* ``G_n ∈ R^{T × d_out}``, and the per-sample gradient is :math:`G_n^\top Ã_n = [∇W \mid ∇b]`.

**Parameter order** of a dense block: ``parameters_to_vector(module.parameters())``, i.e. the
weight flattened row-major, then the bias. Kronecker code works on ``vec_r(W̃)`` (rows of
``W̃ = [W | b]``), where ``vec_r(g ãᵀ) = g ⊗ ã``; :meth:`Layer.kron_to_param_index` converts.

Adding a layer type means writing one :class:`LayerAdapter` and registering it in ``ADAPTERS``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fisherlab.conventions import FisherlabError, UnsupportedLayerError


class LayerAdapter:
    """Reads ``Ã`` and ``G`` of one module type. Subclasses implement the three hooks below."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this module's configuration is not supported, or ``None``."""
        return None

    def homogeneous_inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """``Ã`` of shape ``[N, T, d_in (+1)]`` from the module's input."""
        raise NotImplementedError

    def output_rows(self, module: nn.Module, g: Tensor) -> Tensor:
        """``G`` of shape ``[N, T, d_out]`` from a gradient w.r.t. the module's output."""
        raise NotImplementedError


def _append_ones(a: Tensor, bias: bool) -> Tensor:
    if not bias:
        return a
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on ``[N, d_in]`` or ``[N, *, d_in]`` (every leading position shares ``W``)."""

    def homogeneous_inputs(self, module: nn.Linear, x: Tensor) -> Tensor:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        return _append_ones(a, module.bias is not None)

    def output_rows(self, module: nn.Linear, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with any stride, padding (numbers, ``"valid"``, ``"same"``) and dilation."""

    def unsupported_reason(self, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        return None

    def homogeneous_inputs(self, module: nn.Conv2d, x: Tensor) -> Tensor:
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
        return _append_ones(patches.transpose(1, 2), module.bias is not None)

    def output_rows(self, module: nn.Conv2d, g: Tensor) -> Tensor:
        return g.flatten(start_dim=2).transpose(1, 2)


#: Module types fisherlab preconditions, mapped to their adapters.
ADAPTERS: dict[type[nn.Module], LayerAdapter] = {
    nn.Linear: LinearAdapter(),
    nn.Conv2d: Conv2dAdapter(),
}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a module; subclasses qualify only if they keep the base ``forward``."""
    for base in type(module).__mro__:
        if base in ADAPTERS:
            return ADAPTERS[base] if type(module).forward is base.forward else None
    return None


@dataclass(frozen=True)
class Layer:
    """A supported module of a model, with its name from ``model.named_modules()``.

    ``bias=False`` views a layer with a bias as one without (an optimizer whose layer has a
    frozen bias preconditions the weight alone); its ``Ã`` then has no ``1`` column.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    bias: bool = True

    @property
    def kind(self) -> str:
        """The module's class name, e.g. ``"Linear"``."""
        return type(self.module).__name__

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (a homogeneous ``1`` coordinate in ``Ã``)."""
        return self.bias and self.module.bias is not None

    def without_bias(self) -> Layer:
        """The same layer with its bias left out (weight-only block)."""
        return dataclasses.replace(self, bias=False)

    @property
    def d_out(self) -> int:
        """Rows of the weight matrix."""
        return self.module.weight.shape[0]

    @property
    def d_in(self) -> int:
        """Columns of the weight matrix (``C_in·k_h·k_w`` for a convolution), without bias."""
        return self.module.weight[0].numel()

    @property
    def num_params(self) -> int:
        """Size ``P`` of the layer's block."""
        return self.d_out * (self.d_in + self.has_bias)

    def parameters(self) -> list[nn.Parameter]:
        """The layer's parameters in block order: weight, then bias."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def kron_to_param_index(self) -> Tensor:
        """Index ``i`` with ``θ_param = θ_kron[i]`` for ``θ_kron = vec_r([W | b])``."""
        width = self.d_in + self.has_bias
        rows = torch.arange(self.d_out).unsqueeze(1) * width
        index = (rows + torch.arange(self.d_in)).flatten()
        if self.has_bias:
            index = torch.cat([index, rows.squeeze(1) + self.d_in])
        return index

    def gradients_from_rows(self, A: Tensor, G: Tensor) -> Tensor:
        """Per-row gradients in parameter order, ``[..., P]``, from ``A`` and ``G``.

        Shapes: ``A [N, T, D]`` and ``G [..., N, T, d_out]``. ``G_nᵀ Ã_n`` is split into the
        weight gradient (flattened row-major in the weight's own shape) and the bias gradient.
        """
        m = torch.einsum("...ntd,nte->...nde", G, A)
        grads = m[..., : self.d_in].flatten(start_dim=-2)
        if self.has_bias:
            grads = torch.cat([grads, m[..., self.d_in]], dim=-1)
        return grads


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
    return None


def find_layers(
    model: nn.Module, skip_unsupported: bool = False, for_optimizer: bool = False
) -> dict[str, Layer]:
    """The supported layers of a model, keyed by their names in ``model.named_modules()``.

    Args:
        model: Any ``nn.Module`` graph.
        skip_unsupported: Skip modules with parameters that fisherlab does not support (with a
            warning naming them) instead of raising.
        for_optimizer: The layers an optimizer preconditions: BatchNorm and Dropout in training
            mode are accepted (optimizers approximate anyway), unsupported modules are always
            skipped with a warning, and a layer sharing a parameter with a skipped module is
            left out (plain gradient) instead of refused.

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
    for name, module in model.named_modules():
        problem = _training_mode_problem(name, module)
        if problem is not None and not for_optimizer:
            raise FisherlabError(problem)
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        adapter = adapter_for(module)
        if adapter is None:
            reason = (
                "this layer type is not supported (supported: "
                + ", ".join(t.__name__ for t in ADAPTERS)
                + ")"
            )
        else:
            reason = adapter.unsupported_reason(module)
            extra = {n for n, _ in own} - {"weight", "bias"}
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
        for _, p in own:
            if id(p) in owner:
                raise UnsupportedLayerError(
                    f"a parameter is shared by modules {owner[id(p)]!r} and {name!r}; "
                    "tied weights are not supported"
                )
            owner[id(p)] = name
        layers[name] = Layer(name, module, adapter)
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
    if not layers:
        raise FisherlabError(
            f"model {type(model).__name__} has no supported layer (Linear or Conv2d)"
        )
    return layers
