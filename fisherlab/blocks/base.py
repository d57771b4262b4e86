r"""The one interface of every curvature block, its registry, and how blocks are built.

A block represents a ``P×P`` matrix ``F̂`` for one layer, indexed in parameter order (weight
row-major, then bias). A method is one file in this package that defines

* an :class:`Options` dataclass (typed, validated once, parsed from ``key=value`` text);
* a :class:`BlockBuilder`, which accumulates the layer's statistics from the captures of a
  data set's batches (one or more passes) and builds the block;
* a :class:`CurvatureBlock` subclass with ``method = "name"``, ``Options`` and ``Builder``;
  defining it registers the method in :data:`REGISTRY`.

Subclasses work in Kronecker order ``vec_r([W | b])`` on matrices ``V ∈ R^{k × d_out × D}``
(``D = d_in + 1`` with bias) and implement a few private kernels:

* ``_matmat(V)``: ``F̂ V``;
* ``_solve(V, damping)``: ``(F̂ + λI)⁻¹ V``;
* ``_eigvalsh()``: all ``P`` eigenvalues, ascending;
* ``_nbytes()``: memory held;
* optionally ``_dense_kron()``: ``F̂`` in Kronecker order (default: ``_matmat`` of the identity);
* optionally the two terms of the at-scale Frobenius error
  ``‖F − F̂‖² = ‖F‖² − 2⟨F, F̂⟩ + ‖F̂‖²`` (:mod:`fisherlab.metrics`): :meth:`norm_sq`
  (``‖F̂‖²_F``) and :meth:`inner_with_rows` (``Σ_rows jᵀ F̂ j`` over captured rows); the
  defaults go through the dense block and ``_matmat``.

The public methods take vectors ``[P]`` or matrices ``[P, k]`` in parameter order.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from fisherlab.conventions import (
    DEFAULT_MAX_BYTES,
    FisherlabError,
    check_choice,
    check_damping,
    check_memory,
)
from fisherlab.layers import Layer
from fisherlab.linalg import sample_chunks

#: Every method, by name: filled in by defining a :class:`CurvatureBlock` subclass.
REGISTRY: dict[str, type[CurvatureBlock]] = {}


# ---------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Options:
    """Typed options of a method (subclasses are frozen dataclasses with defaults).

    ``CHOICES`` maps string options to their valid values; :meth:`validate` checks the rest.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        self.validate()

    def validate(self) -> None:
        """Checks beyond ``CHOICES`` (subclasses)."""

    @classmethod
    def names(cls) -> list[str]:
        """The option names."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def parse(cls, method: str, options: Mapping[str, Any], text: bool = False) -> Options:
        """Options from keyword arguments (or, with ``text``, from ``key=value`` strings).

        Raises:
            FisherlabError: for unknown names, values that do not parse as the option's type,
                or invalid values.
        """
        unknown = set(options) - set(cls.names())
        if unknown:
            raise FisherlabError(
                f"unknown option(s) {sorted(unknown)} for method {method!r}; valid options: "
                f"{cls.names() or 'none'}"
            )
        values = dict(options)
        if text:
            hints = typing.get_type_hints(cls)
            values = {k: _from_text(method, k, v, hints[k]) for k, v in values.items()}
        return cls(**values)

    def __getitem__(self, name: str) -> Any:
        if name not in self.names():
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _from_text(method: str, name: str, value: str, hint: Any) -> Any:
    """Convert ``value`` from text by the option's type (``int``, ``float``, ``str``, optional)."""
    kinds = typing.get_args(hint) or (hint,)
    if value.lower() == "none" and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is int:
            try:
                return int(value)
            except ValueError:
                continue
        if kind is float:
            try:
                return float(value)
            except ValueError:
                continue
        if kind is str:
            return value
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise FisherlabError(f"option {name}={value!r} of method {method!r} must be {expected}")


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


# ---------------------------------------------------------------------------------- builders
@dataclass(frozen=True)
class BuildContext:
    """What a builder knows about the data it accumulates.

    Attributes:
        fisher_type: The Fisher type of the captured rows.
        max_bytes: Memory budget of each large object the builder allocates.
        num_samples: ``N`` of the data when known before the pass (else ``None``).
        all_reduce: Sums a tensor over the ranks holding shards of the data (identity
            without ``torch.distributed``).
        all_gather: Concatenates a tensor along a dimension over those ranks.
    """

    fisher_type: str
    max_bytes: int = DEFAULT_MAX_BYTES
    num_samples: int | None = None
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t
    all_gather: Callable[[Tensor, int], Tensor] = lambda t, dim: t


class BlockBuilder(ABC):
    """Accumulates one layer's statistics over the batches of a data set; builds the block.

    The engine (:func:`fisherlab.blocks.assemble`) calls :meth:`add` with each batch's
    :class:`~fisherlab.capture.LayerCapture` for ``passes`` passes, :meth:`end_pass` after
    each, and :meth:`finish` with ``ν`` and ``N`` of the whole data. Sums are unnormalised
    (rows in units of the per-sample summed loss) until :meth:`finish`.
    """

    #: Passes over the data the builder needs.
    passes: int = 1

    def __init__(self, layer: Layer, options: Options, context: BuildContext):
        self.layer, self.options, self.context = layer, options, context

    @abstractmethod
    def add(self, A: Tensor, G: Tensor, pass_index: int) -> None:
        """Accumulate a batch's ``A [N_b, T, D]`` and ``G [R, N_b, T, d_out]``."""

    def end_pass(self, pass_index: int, normaliser: float) -> None:  # noqa: B027
        """Called after each complete pass with ``ν`` of the data.

        E.g. EKFAC fixes its basis after the first pass.
        """

    @abstractmethod
    def finish(self, normaliser: float, num_samples: int) -> CurvatureBlock:
        """The block of the whole data (sums all-reduced over ranks, divided by ``ν``)."""

    def _check_rows_memory(
        self,
        what: str,
        held_samples: int,
        bytes_per_sample: int,
        gram_rows_per_sample: int,
        itemsize: int,
        hint: str,
    ) -> None:
        """Refuse before the per-sample rows held over a data set exceed the budget.

        Counts the rows of ``max(held_samples, N)`` samples (``N`` when known before the
        pass), plus the ``M×M`` Gram and its eigenvectors (``M`` = samples ×
        ``gram_rows_per_sample``; zero for no Gram). ``what`` may use ``{n}`` and ``{m}``.
        """
        n = max(held_samples, self.context.num_samples or 0)
        m = n * gram_rows_per_sample
        nbytes = n * bytes_per_sample + 2 * m * m * itemsize
        check_memory(what.format(n=n, m=m), nbytes, self.context.max_bytes, hint)


# ------------------------------------------------------------------------------------ blocks
class CurvatureBlock(ABC):
    """A ``P×P`` curvature matrix of one layer (see the module docstring).

    Attributes:
        layer: The layer the block belongs to.
        method: The method name, e.g. ``"kfac"``.
        fisher_type: The Fisher type of the captured statistics.
        options: The options the block was built with.
    """

    method: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    Builder: ClassVar[type[BlockBuilder]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):
            REGISTRY[cls.method] = cls

    def __init__(self, layer: Layer, fisher_type: str, options: Options | Mapping[str, Any]):
        self.layer = layer
        self.fisher_type = fisher_type
        if not isinstance(options, Options):
            options = type(self).Options.parse(self.method, options)
        self.options = options

    # ------------------------------------------------------------------ shapes
    @property
    def size(self) -> int:
        """``P``, the number of parameters of the layer."""
        return self.layer.num_params

    @property
    def kron_shape(self) -> tuple[int, int]:
        """``(d_out, D)``: the shape of ``[W | b]``."""
        return self.layer.d_out, self.layer.d_in + self.layer.has_bias

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the block computes in."""
        return self._reference().dtype

    @property
    def device(self) -> torch.device:
        """Where the block's tensors live."""
        return self._reference().device

    @property
    def is_exact(self) -> bool:
        """Whether the block is the exact Fisher block of the data it was built from."""
        return False

    @abstractmethod
    def _reference(self) -> Tensor:
        """Any tensor the block holds (for dtype and device)."""

    def _to_kron(self, v: Tensor) -> tuple[Tensor, bool]:
        """``[P]`` or ``[P, k]`` in parameter order → ``[k, d_out, D]`` in Kronecker order."""
        if not isinstance(v, Tensor):
            v = torch.as_tensor(v, dtype=self.dtype, device=self.device)
        vector = v.ndim == 1
        if v.ndim not in (1, 2) or v.shape[0] != self.size:
            raise FisherlabError(
                f"expected a vector [{self.size}] or a matrix [{self.size}, k] in parameter "
                f"order for layer {self.layer.name!r}, got shape {tuple(v.shape)}"
            )
        cols = v.reshape(self.size, -1).T.to(self.dtype)  # [k, P]
        d_out, d_in = self.layer.d_out, self.layer.d_in
        if not self.layer.adapter.standard_layout:  # the adapter's own order (e.g. Embedding)
            kron = cols.new_empty(cols.shape)
            kron[:, self.layer.kron_to_param_index().to(cols.device)] = cols
            return kron.reshape(-1, d_out, d_in + self.layer.has_bias), vector
        kron = cols[:, : d_out * d_in].reshape(-1, d_out, d_in)
        if self.layer.has_bias:  # [W | b]: the bias is the last column
            kron = torch.cat([kron, cols[:, d_out * d_in :].unsqueeze(-1)], dim=-1)
        return kron, vector

    def _to_param(self, u: Tensor, vector: bool) -> Tensor:
        """``[k, d_out, D]`` in Kronecker order → ``[P]`` or ``[P, k]`` in parameter order."""
        k, d_out, d_in = u.shape[0], self.layer.d_out, self.layer.d_in
        if not self.layer.adapter.standard_layout:
            out = self.layer.to_param_order(u)
        elif self.layer.has_bias:  # one copy: weight columns, then the bias column
            out = u.new_empty(k, self.size)
            out[:, : d_out * d_in].view(k, d_out, d_in).copy_(u[..., :d_in])
            out[:, d_out * d_in :].copy_(u[..., d_in])
        else:
            out = u.reshape(k, -1)
        out = out.T
        return out.squeeze(1) if vector else out

    # ------------------------------------------------------------- public API
    def matvec(self, v: Tensor) -> Tensor:
        """``F̂ v`` for ``v`` of shape ``[P]`` or ``[P, k]`` (parameter order)."""
        kron, vector = self._to_kron(v)
        return self._to_param(self._matmat(kron), vector)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """``(F̂ + λI)⁻¹ v`` for ``v`` of shape ``[P]`` or ``[P, k]``, ``λ = damping > 0``."""
        damping = check_damping(damping)
        kron, vector = self._to_kron(v)
        return self._to_param(self._solve(kron, damping), vector)

    def eigvalsh(self, max_bytes: int = DEFAULT_MAX_BYTES) -> Tensor:
        """All ``P`` eigenvalues of ``F̂``, ascending.

        ``max_bytes`` bounds any dense matrix the computation forms (only representations
        without a structured spectrum form one).
        """
        return self._eigvalsh(max_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory the block holds."""
        return self._nbytes()

    def dense_peak_bytes(self) -> int:
        """Bytes :meth:`to_dense` allocates at its peak.

        Three ``P×P`` matrices: the Kronecker-order one, the row-permuted copy and the result.
        """
        return 3 * self.size**2 * torch.finfo(self.dtype).bits // 8

    def to_dense(self, max_bytes: int = DEFAULT_MAX_BYTES) -> Tensor:
        """``F̂`` as a dense ``[P, P]`` tensor in parameter order."""
        check_memory(
            f"the dense {self.method} block of layer {self.layer.name!r} ({self.size}×{self.size}, "
            "three such matrices at the peak)",
            self.dense_peak_bytes(),
            max_bytes,
            "use matvec()/solve() instead, or raise max_bytes=",
        )
        dense = self._dense_kron()
        index = self.layer.kron_to_param_index().to(dense.device)  # only here: P int64s
        return dense[index][:, index]

    def as_linear_operator(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` applying ``F̂`` (float64, on the CPU)."""

        def matmat(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return self.matvec(v).detach().cpu().double().numpy()

        return LinearOperator(
            (self.size, self.size),
            matvec=matmat,
            matmat=matmat,
            rmatvec=matmat,
            dtype=np.float64,
        )

    # ------------------------------------------------------- at-scale Frobenius terms
    def norm_sq(self) -> float:
        """``‖F̂‖²_F`` (default: from the dense block)."""
        return float((self._dense_kron() ** 2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        """``Σ_rows jᵀ F̂ j`` over the rows ``j = vec_r(G_rnᵀ Ã_n)`` of a capture.

        With the rows of a reference Fisher ``F = (1/ν) Σ j jᵀ``, ``⟨F, F̂⟩_F`` is this over
        ``ν``. Default: ``_matmat`` of the rows, in chunks of samples.
        """
        total = 0.0
        for chunk in sample_chunks(A.shape[0], G.shape[0] * self.size * 2):
            rows = self.layer.gradient_rows(A[chunk], G[:, chunk])
            flat = rows.reshape(-1, *self.kron_shape)
            total += float((flat * self._matmat(flat)).sum())
        return total

    # ---------------------------------------------------------------- kernels
    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor: ...

    @abstractmethod
    def _solve(self, V: Tensor, damping: float) -> Tensor: ...

    @abstractmethod
    def _eigvalsh(self, max_bytes: int) -> Tensor: ...

    @abstractmethod
    def _nbytes(self) -> int: ...

    def _dense_kron(self) -> Tensor:
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self._matmat(eye.reshape(self.size, *self.kron_shape)).reshape(self.size, -1).T

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer.name!r}, P={self.size}, "
            f"fisher_type={self.fisher_type!r}, options={self.options.as_dict()})"
        )


def tensor_bytes(*tensors: Tensor | None) -> int:
    """Total bytes of the given tensors (``None`` counts as zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


__all__ = [
    "REGISTRY",
    "BlockBuilder",
    "BuildContext",
    "CurvatureBlock",
    "NoOptions",
    "Options",
    "check_damping",
    "tensor_bytes",
]
