r"""The layer-adapter interface and :class:`Layer`, a supported module of a model.

A layer's block is a ``P×P`` matrix over its parameters. Every adapter presents the layer's
parameters as one matrix ``W̃ ∈ R^{d_out × D}`` (its *matrix view*, ``D = d_in + 1`` with a
bias column) and provides, from what the capture recorded,

* ``inputs(module, x)`` → ``A``: what the capture stores per call (``[N, T, …]``);
* ``output_rows(module, g)`` → ``G [N, T, d_out]``: rows of the gradient w.r.t. the output;
* ``gradient_rows(A, G)`` → ``[R, N, d_out, D]``: per-sample gradients in the matrix view
  (for a Kronecker-structured layer ``z_t = W̃ ã_t``: ``G_nᵀ Ã_n``, the outer-product sum);
* ``kron_inputs(module, A)`` → ``Ã [N, T, D]`` with ``gradient_rows(A, G) = Gᵀ Ã`` per sample,
  for layers that have such a structure (:attr:`LayerAdapter.kronecker`; the Kronecker methods
  KFAC, EKFAC, SKFAC and Woodbury's covariance Gram need it);
* ``kron_to_param_index`` → the permutation between ``vec_r(W̃)`` and parameter order.

**Parameter order** of a dense block: the layer's parameters (:meth:`LayerAdapter.parameter_names`)
flattened and concatenated, i.e. ``parameters_to_vector`` of them — weight, then bias. Kronecker
code works on ``vec_r(W̃)``, where ``vec_r(g ãᵀ) = g ⊗ ã``.

Adding a layer type is one file in this package that defines a :class:`LayerAdapter` subclass
with ``module_types`` (defining it registers it in :data:`ADAPTERS`), plus entries in the
(method, layer kind) table of :mod:`fisherlab.blocks.assemble`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fisherlab.linalg import outer_rows

#: Module types with an adapter, mapped to it (filled in by defining adapter subclasses).
ADAPTERS: dict[type[nn.Module], LayerAdapter] = {}


class LayerAdapter:
    """How fisherlab reads one module type (see the module docstring).

    Subclasses set :attr:`kind` and :attr:`module_types` and implement :meth:`inputs`,
    :meth:`output_rows` and :meth:`matrix_shape`; the defaults below are those of a layer
    ``z_t = W ã_t (+ b)`` with parameters ``weight [d_out, …]`` and ``bias [d_out]``.
    """

    #: The layer kind, the column of the (method, layer kind) table, e.g. ``"linear"``.
    kind: ClassVar[str] = ""
    #: Module types this adapter reads (subclasses qualify only if they keep ``forward``).
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Whether per-sample gradients are ``G_nᵀ Ã_n`` for ``Ã = kron_inputs(A)``.
    kronecker: ClassVar[bool] = True
    #: Whether parameter order is the matrix view row-major with the bias last (then the
    #: conversions are reshapes, not gathers).
    standard_layout: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("module_types"):
            adapter = cls()
            for module_type in cls.module_types:
                ADAPTERS[module_type] = adapter

    # -------------------------------------------------------------- parameters
    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this module's configuration is not supported, or ``None``."""
        return None

    def parameter_names(self, module: nn.Module) -> tuple[str, str | None]:
        """Names of the weight and the bias (``None``: no bias) of the module."""
        return "weight", ("bias" if getattr(module, "bias", None) is not None else None)

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of the matrix view (``d_in`` without the bias column)."""
        weight = getattr(module, self.parameter_names(module)[0])
        return weight.shape[0], weight[0].numel()

    def kron_to_param_index(self, d_out: int, d_in: int, bias: bool) -> Tensor:
        """Index ``i`` with ``θ_param = θ_kron[i]`` for ``θ_kron = vec_r([W | b])``."""
        width = d_in + bias
        rows = torch.arange(d_out).unsqueeze(1) * width
        index = (rows + torch.arange(d_in)).flatten()
        if bias:
            index = torch.cat([index, rows.squeeze(1) + d_in])
        return index

    # -------------------------------------------------------------- statistics
    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """What the capture stores of the module's input ``x`` (``A``, ``[N, T, …]``)."""
        raise NotImplementedError

    def output_rows(self, module: nn.Module, g: Tensor) -> Tensor:
        """``G`` of shape ``[N, T, d_out]`` from a gradient w.r.t. the module's output."""
        raise NotImplementedError

    def kron_inputs(self, module: nn.Module, A: Tensor) -> Tensor:
        """``Ã [N, T, D]`` with per-sample gradients ``G_nᵀ Ã_n`` (Kronecker layers only)."""
        if not self.kronecker:
            raise NotImplementedError(f"{type(self).__name__} has no Kronecker structure")
        return A

    def gradient_rows(self, module: nn.Module, A: Tensor, G: Tensor) -> Tensor:
        """Per-row gradients ``[..., N, d_out, D]`` in the matrix view from ``A`` and ``G``.

        ``G [..., N, T, d_out]``. Default (Kronecker layers): ``Σ_t g_t ã_tᵀ``, the one place
        this outer-product sum is written.
        """
        return outer_rows(G, self.kron_inputs(module, A))

    # ------------------------------------------- modules that use parameters functionally
    # (``nn.MultiheadAttention``: :mod:`fisherlab.layers.attention`)
    def training_problem(self, module: nn.Module) -> str | None:
        """Why the module's training mode makes its curvature undefined (``None``: it does not)."""
        return None

    def sublayers(self, module: nn.Module) -> dict[str, LayerAdapter]:
        """Submodules whose parameters this module uses functionally, with their adapters.

        Keyed by their names within the module; their own ``forward`` is not called.
        """
        return {}

    def recording_module(self, module: nn.Module) -> tuple[nn.Module, Callable[..., Any]] | None:
        """Where a layer is recorded when not by its own module's forward hook.

        ``None`` (the default): by ``module``'s hook (:meth:`inputs`, :meth:`output_rows`).
        Otherwise ``(owner, record_forward)``: the recorder replaces ``owner``'s output by
        ``record_forward(owner, args, kwargs, record)``, a re-run of its forward that hands
        every use of a layer's parameters to ``record(param_module, A, z, rows) → z'``
        (:class:`fisherlab.capture.Recorder`).
        """
        return None


def append_ones(a: Tensor, bias: bool) -> Tensor:
    """``[a, 1]`` along the last dimension (the homogeneous coordinate), if ``bias``."""
    if not bias:
        return a
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


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
    def layer_kind(self) -> str:
        """The adapter's kind, the column of the (method, layer kind) table."""
        return self.adapter.kind

    @property
    def kronecker(self) -> bool:
        """Whether per-sample gradients are ``G_nᵀ Ã_n`` (Kronecker methods apply)."""
        return self.adapter.kronecker

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter."""
        return getattr(self.module, self.adapter.parameter_names(self.module)[0])

    @property
    def bias_parameter(self) -> nn.Parameter | None:
        """The bias parameter, if the layer has one (and is not viewed without it)."""
        name = self.adapter.parameter_names(self.module)[1]
        return getattr(self.module, name) if self.bias and name is not None else None

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (a homogeneous ``1`` coordinate in ``Ã``)."""
        return self.bias_parameter is not None

    def without_bias(self) -> Layer:
        """The same layer with its bias left out (weight-only block)."""
        return dataclasses.replace(self, bias=False)

    @property
    def d_out(self) -> int:
        """Rows of the matrix view."""
        return self.adapter.matrix_shape(self.module)[0]

    @property
    def d_in(self) -> int:
        """Columns of the matrix view (``C_in·k_h·k_w`` for a convolution), without bias."""
        return self.adapter.matrix_shape(self.module)[1]

    @property
    def num_params(self) -> int:
        """Size ``P`` of the layer's block."""
        return self.d_out * (self.d_in + self.has_bias)

    def parameter_names(self) -> list[str]:
        """Names of the layer's parameters within its module, in block order."""
        weight, bias = self.adapter.parameter_names(self.module)
        return [weight] + ([bias] if self.has_bias else [])

    def parameters(self) -> list[nn.Parameter]:
        """The layer's parameters in block order: weight, then bias."""
        return [self.weight] + ([self.bias_parameter] if self.has_bias else [])

    def kron_to_param_index(self) -> Tensor:
        """Index ``i`` with ``θ_param = θ_kron[i]`` for ``θ_kron = vec_r([W | b])``."""
        return self.adapter.kron_to_param_index(self.d_out, self.d_in, self.has_bias)

    def kron_inputs(self, A: Tensor) -> Tensor:
        """``Ã [N, T, D]`` of a capture's ``A`` (Kronecker layers)."""
        return self.adapter.kron_inputs(self.module, A)

    def gradient_rows(self, A: Tensor, G: Tensor) -> Tensor:
        """Per-row gradients ``[..., N, d_out, D]`` in the matrix (Kronecker) order."""
        return self.adapter.gradient_rows(self.module, A, G)

    def to_param_order(self, kron: Tensor) -> Tensor:
        """``[..., d_out, D]`` in the matrix view → ``[..., P]`` in parameter order."""
        if not self.adapter.standard_layout:
            index = self.kron_to_param_index().to(kron.device)
            return kron.flatten(start_dim=-2)[..., index]
        grads = kron[..., : self.d_in].flatten(start_dim=-2)
        if self.has_bias:
            grads = torch.cat([grads, kron[..., self.d_in]], dim=-1)
        return grads

    def gradients_from_rows(self, A: Tensor, G: Tensor) -> Tensor:
        """Per-row gradients in parameter order, ``[..., P]``, from ``A`` and ``G``.

        Shapes: ``A`` as captured and ``G [..., N, T, d_out]``.
        """
        return self.to_param_order(self.gradient_rows(A, G))

    def split_parameters(self, flat: Tensor) -> list[Tensor]:
        """``[..., P]`` in parameter order → one tensor per parameter, in its own shape."""
        out, start = [], 0
        for p in self.parameters():
            out.append(flat[..., start : start + p.numel()].reshape(*flat.shape[:-1], *p.shape))
            start += p.numel()
        return out


def names_of(layers: Sequence[Layer]) -> list[str]:
    """The names of some layers."""
    return [layer.name for layer in layers]
