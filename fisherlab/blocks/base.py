r"""The one interface of every curvature block, its registry, and how blocks are built.

A block represents a ``P×P`` matrix ``F̂`` for one layer, indexed in parameter order (weight
row-major, then bias). A method is one file in this package that defines

* an :class:`Options` dataclass (typed, validated once, parsed from ``key=value`` text);
* a :class:`BlockBuilder`, which keeps the layer's statistics under weighted updates
  ``add(stats, old_weight, new_weight)`` (a sum over a data set's batches, in one or more
  passes, or a running average: the same call) and gives the block at any time;
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
    check_range,
)
from fisherlab.layers import Layer
from fisherlab.linalg import gram_accumulate, mirror_upper, sample_chunks

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


@dataclass(frozen=True)
class LayerStats:
    """One batch's statistics of one layer, what :meth:`BlockBuilder.add` takes.

    Attributes:
        A: Homogeneous inputs ``[N_b, T, D]``.
        G: Output-gradient rows ``[R, N_b, T, d_out]`` of the per-sample summed loss.
        normaliser: ``ν_b`` of the batch (the loss's normaliser; ``F_b = (1/ν_b) Σ j jᵀ``).
    """

    A: Tensor
    G: Tensor
    normaliser: float = 1.0

    @classmethod
    def of(cls, capture: Any, name: str) -> LayerStats:
        """Layer ``name`` of a :class:`~fisherlab.capture.Capture` (its ``ν`` included)."""
        lc = capture[name]
        return cls(lc.A, lc.G, capture.normaliser)


#: What a builder's state holds (see :class:`BlockBuilder`).
NORMALISATIONS = ("data", "batch")


def check_weights(old_weight: Any, new_weight: Any) -> tuple[float, float]:
    """The pair of weights of :meth:`BlockBuilder.add`: finite reals ``≥ 0``, or a clear error."""
    return (
        float(check_range("old_weight", old_weight, 0.0)),
        float(check_range("new_weight", new_weight, 0.0)),
    )


class WeightedSum:
    r"""``S = Σ_k w_k x_k`` under the weighted update ``S ← α S + β x`` (and its mass).

    After updates ``(α_k, β_k, x_k)``, ``k = 1…K``, from an empty state (zero),

    .. math::
        S_K = \sum_k w_k x_k, \qquad W_K = \sum_k w_k, \qquad
        w_k = β_k \prod_{j > k} α_j .

    ``α = 0`` forgets the state (it is dropped, not multiplied: no ``0·∞``).

    Attributes:
        value: ``S`` (``None`` while empty).
        mass: ``W``, the same recurrence applied to the number 1.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.mass = 0.0

    def add(
        self, x: Tensor, old_weight: float = 1.0, new_weight: float = 1.0, scale: float = 1.0
    ) -> None:
        """``S ← α S + β·scale·x`` in place; ``x`` is taken over (it must not be used elsewhere).

        ``scale`` multiplies ``x`` in the same pass (a normalisation such as ``1/ν_b``); unlike
        ``β`` it is not counted in the mass.
        """
        weight = new_weight * scale
        if self.value is None or old_weight == 0:
            self.value = x if weight == 1 else x.mul_(weight)
        else:
            if old_weight != 1:
                self.value.mul_(old_weight)
            if weight == 1:
                self.value.add_(x)
            else:
                self.value.add_(x, alpha=weight)
        self.mass = old_weight * self.mass + new_weight

    def add_gram(
        self, rows: Tensor, old_weight: float = 1.0, new_weight: float = 1.0, scale: float = 1.0
    ) -> None:
        """``S ← α S + β·scale·rowsᵀrows`` for ``rows: [M, P]``: one pass over ``S``.

        The weights are folded into the products (``addmm``'s ``beta`` and ``alpha``), computed
        on the upper triangle of tiles and mirrored
        (:func:`~fisherlab.linalg.gram_accumulate`): no ``P×P`` temporary, about
        ``(k+1)/(2k)`` of the full product for ``k`` tiles.
        """
        weight = new_weight * scale
        if self.value is None or old_weight == 0:
            size = rows.shape[1]
            self.value = rows.new_empty(size, size)
            gram_accumulate(rows, self.value, alpha=weight, beta=0.0)
        else:
            gram_accumulate(rows, self.value, alpha=weight, beta=old_weight)
        mirror_upper(self.value)
        self.mass = old_weight * self.mass + new_weight

    def state(self, prefix: str) -> dict[str, Tensor | None]:
        """``{prefix: S, prefix_mass: W}`` (tensors only)."""
        return {prefix: self.value, f"{prefix}_mass": torch.tensor(self.mass, dtype=torch.float64)}

    def load(self, state: Mapping[str, Tensor | None], prefix: str) -> None:
        """Restore from :meth:`state`."""
        self.value = state.get(prefix)
        mass = state.get(f"{prefix}_mass")
        self.mass = 0.0 if mass is None else float(mass)


class BlockBuilder(ABC):
    r"""One layer's weighted statistics: ``add`` batches, take the block at any time.

    **The update.** ``add(stats, old_weight=α, new_weight=β)`` updates every statistic the
    builder keeps (``Σ j jᵀ``, ``Σ g gᵀ`` and ``Σ ã ãᵀ``, ``Σ (Qᵀj)²``, ``Σ j²``, the factor rows…)
    by ``S ← α S + β x_b``, where ``x_b`` is the batch's statistic: after ``K`` calls,
    ``S = Σ_k w_k x_k`` with ``w_k = β_k Π_{j>k} α_j`` (:class:`WeightedSum`). A sum over a data
    set and a running average are the same call with other weights (kfac-jax's
    ``update_curvature_matrix_estimate(state, data, ema_old, ema_new, batch_size)``).

    **What the state means** is fixed at construction by ``normalise``:

    * ``"data"`` (a sum over a data set; the engine's :func:`~fisherlab.blocks.assemble`):
      ``x_b`` is the batch's *unnormalised* statistic, in units of the per-sample summed loss
      (``Σ_{n,r} j jᵀ`` over the batch), and :meth:`block` divides by the ``ν`` it is given.
      With weights ``(1, 1)`` for every batch and ``ν`` of the whole data, the block is the data
      set's, ``F̂`` of ``F = (1/ν) Σ_batches JᵀJ``, bit for bit what a single sum gives. Factors
      normalised by a count of rows (KFAC's ``Ω = Σ ããᵀ / (N·T)``) carry their count through the
      same recurrence: ``Ω = (Σ_k w_k Σ ããᵀ) / (Σ_k w_k N_k T)``.
    * ``"batch"`` (a running average, as the optimizers keep): ``x_b`` is the batch's own
      *normalised* estimate (``(1/ν_b) Σ j jᵀ``; ``Ω_b = Σ ããᵀ / (N_b T)``), and :meth:`block`
      divides by the mass ``W = Σ_k w_k``: the block is the weighted *average*
      ``Σ_k w_k F̂_k / Σ_k w_k`` of the per-batch estimates. With ``(0, 1)`` on the first call
      (or after a reset) and ``(decay, 1 − decay)`` after it, ``W = 1`` and the block is the
      exponential running average ``S ← decay·S + (1 − decay)·F̂_b`` of the optimizers; with
      ``(decay, 1 − decay)`` from the start it is that average bias-corrected (as Adam's); with
      ``(1, 1)`` the plain mean of the batches' estimates. No reduction over ranks is applied:
      callers combine a batch's statistics across ranks before ``add`` (as the optimizers do).

    Representations that hold rows (``woodbury``, ``skfac``) realise the weights on the rows
    (``√w_k`` times the batch's rows, so that their Grams are weighted by ``w_k``); their memory
    grows with every call whose ``old_weight`` is not 0.

    **Passes.** A builder that needs several passes over a data set (EKFAC: the basis from the
    factors of the whole data, then the scalings in it) has ``passes > 1`` and is told the end of
    each by :meth:`end_pass`. :meth:`block` may be called any number of times and leaves the
    state as it is; :meth:`finish` (the engine's last call) may release the state.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the state as tensors only
    (``torch.save`` works; references to the live tensors, as ``torch``'s own ``state_dict``).

    Args:
        layer: The layer.
        options: The method's options.
        context: What the builder knows about the data.
        normalise: ``"data"`` or ``"batch"`` (above).
    """

    #: Passes over the data the builder needs.
    passes: int = 1

    def __init__(
        self, layer: Layer, options: Options, context: BuildContext, normalise: str = "data"
    ):
        self.layer, self.options, self.context = layer, options, context
        self.normalise = check_choice("normalise", normalise, NORMALISATIONS)
        #: Complete passes seen (:meth:`end_pass`).
        self.pass_index = 0

    @property
    def per_batch(self) -> bool:
        """Whether each batch's statistic is normalised by its own ``ν_b`` (``"batch"``)."""
        return self.normalise == "batch"

    def add(self, stats: LayerStats, old_weight: float = 1.0, new_weight: float = 1.0) -> None:
        """``S ← old_weight·S + new_weight·x(stats)`` for every statistic kept (class docstring).

        Args:
            stats: The batch's ``A``, ``G`` and ``ν_b`` (e.g. :meth:`LayerStats.of` a capture).
            old_weight: ``α ≥ 0``; ``0`` forgets the state.
            new_weight: ``β ≥ 0``.
        """
        old, new = check_weights(old_weight, new_weight)
        self._add(stats, old, new)

    @abstractmethod
    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        """The update, with checked weights."""

    def end_pass(self, normaliser: float | None = None) -> None:
        """Called after each complete pass over a data set, with the data's ``ν``.

        E.g. EKFAC fixes its basis after the first pass.
        """
        self.pass_index += 1

    @abstractmethod
    def block(self, normaliser: float | None = None) -> CurvatureBlock:
        """The block of the state as it is now (the state is left unchanged).

        Args:
            normaliser: With ``normalise="data"``, ``ν`` of the data the sums ran over
                (required); with ``"batch"``, nothing (the mass of the weights is used).
        """

    def finish(self, normaliser: float, num_samples: int) -> CurvatureBlock:
        """The engine's last call: the block of the whole data (may release the state)."""
        return self.block(normaliser)

    def batch_scale(self, stats: LayerStats) -> float:
        """The factor of a batch's loss-normalised statistics: ``1/ν_b`` (``"batch"``) or 1."""
        return 1.0 / float(stats.normaliser) if self.per_batch else 1.0

    def divisor(self, normaliser: float | None, mass: float) -> float:
        """What the state's loss-normalised sums are divided by: ``ν`` or the mass ``W``."""
        if self.per_batch:
            if normaliser is not None and normaliser != 1:
                raise FisherlabError(
                    f"the builder of layer {self.layer.name!r} normalises each batch "
                    f"(normalise='batch'): its block takes no normaliser, got {normaliser!r}"
                )
            return mass
        if normaliser is None:
            raise FisherlabError(
                f"the builder of layer {self.layer.name!r} holds sums over a data set "
                "(normalise='data'): pass the data's ν, block(normaliser=ν)"
            )
        return normaliser

    def _require(self, ready: bool) -> None:
        if not ready:
            raise FisherlabError(
                f"the {type(self).__name__} of layer {self.layer.name!r} has no statistics yet: "
                "add() a batch before asking for its block"
            )

    # ------------------------------------------------------------------ state
    #: The tensors of :meth:`state_dict` (besides ``pass_index`` and ``per_batch``).
    state_names: ClassVar[tuple[str, ...]] = ()

    def _state(self) -> dict[str, Tensor | None]:
        return {}

    def _load(self, state: Mapping[str, Tensor | None]) -> None:  # noqa: B027
        """Restore the tensors of :meth:`_state` (absent ones are ``None``)."""

    def state_dict(self) -> dict[str, Tensor]:
        """The state as ``{name: Tensor}`` (tensors only; ``torch.save`` works)."""
        out = {
            "pass_index": torch.tensor(self.pass_index),
            "per_batch": torch.tensor(self.per_batch),
        }
        out.update({k: v for k, v in self._state().items() if v is not None})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` of a builder of the same method, layer and mode.

        Raises:
            FisherlabError: for unknown entries, non-tensors or another ``normalise`` mode.
        """
        names = {"pass_index", "per_batch", *self.state_names}
        unknown = sorted(set(state) - names)
        if unknown or not all(isinstance(v, Tensor) for v in state.values()):
            raise FisherlabError(
                f"not a state of {type(self).__name__} (layer {self.layer.name!r}): "
                + (f"unknown entries {unknown}" if unknown else "entries must be tensors")
                + f"; expected some of {sorted(names)}"
            )
        if "per_batch" in state and bool(state["per_batch"]) != self.per_batch:
            raise FisherlabError(
                f"the state of layer {self.layer.name!r} was saved with normalise="
                f"{'batch' if bool(state['per_batch']) else 'data'!r}, this builder has "
                f"normalise={self.normalise!r}"
            )
        self.pass_index = int(state.get("pass_index", 0))
        self._load({name: state.get(name) for name in self.state_names})

    def _check_shape(self, name: str, tensor: Tensor | None, shape: tuple[int, ...]) -> None:
        """Refuse a loaded tensor whose shape does not fit the layer."""
        if tensor is not None and tuple(tensor.shape) != shape:
            raise FisherlabError(
                f"the saved {name!r} of layer {self.layer.name!r} has shape "
                f"{tuple(tensor.shape)}, the layer needs {shape}"
            )

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
    "NORMALISATIONS",
    "REGISTRY",
    "BlockBuilder",
    "BuildContext",
    "CurvatureBlock",
    "LayerStats",
    "NoOptions",
    "Options",
    "WeightedSum",
    "check_damping",
    "check_weights",
    "tensor_bytes",
]
