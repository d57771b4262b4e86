r"""EKFAC: KFAC's eigenbasis with exact second moments (George et al., NeurIPS 2018).

With the Kronecker-factored eigenbasis ``Q = U_Γ ⊗ U_Ω`` of the KFAC factors,

.. math::
    F̂ = Q \,\mathrm{diag}(s)\, Q^\top, \qquad s = \frac1ν \sum_{n,r} (Q^\top j_{n,r})^2,

the best approximation of ``F`` (in Frobenius norm) among matrices diagonal in ``Q``; hence
``‖F − F̂_ekfac‖ ≤ ‖F − F̂_kfac‖`` and ``‖F − F̂_ekfac‖² = ‖F‖² − ‖s‖²``. Over a data set (its
definition) the basis comes from the factors of the whole data (first pass) and the scalings from
a second pass; as a running average (an optimizer's) the factors and the scalings are weighted
averages of the batches' own (:class:`EKFACBuilder`). The basis may instead be given
(``basis=``: an earlier ``ekfac`` result or ``{name: (U_Γ, U_Ω)}``), to study a stale basis
with fresh scalings; then one pass suffices.
At-scale Frobenius terms: ``‖s‖²`` and ``Σ_rows jᵀF̂j = ⟨s, Σ_rows (Qᵀj)²⟩``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.assemble import SCALE_SHIFT_BLOCKS
from fisherlab.blocks.base import (
    BlockBuilder,
    CurvatureBlock,
    LayerStats,
    Options,
    WeightedSum,
    check_weights,
    tensor_bytes,
)
from fisherlab.blocks.factors import KFAC_APPROX, KroneckerSums
from fisherlab.blocks.kfac import KFACBuilder, KFACOptions
from fisherlab.blocks.kronecker import KroneckerEigenbasis
from fisherlab.conventions import FisherlabError
from fisherlab.linalg import outer_rows, sample_chunks


def kfe_squares(A: Tensor, G: Tensor, u_gamma: Tensor, u_omega: Tensor) -> Tensor:
    """``Σ_{n,r} (Qᵀ j_{n,r})²`` as ``[d_out, D]`` for ``Q = U_Γ ⊗ U_Ω`` (unnormalised)."""
    A_rot = A @ u_omega  # [N, T, D]
    G_rot = G @ u_gamma  # [R, N, T, d_out]
    if A.shape[1] == 1:  # one position: (g ⊗ a)² = g² ⊗ a², a single product
        return torch.einsum("rnd,ne->de", G_rot[:, :, 0] ** 2, A_rot[:, 0] ** 2)
    s = A.new_zeros(u_gamma.shape[0], u_omega.shape[0])
    row = G.shape[0] * u_gamma.shape[0] * u_omega.shape[0]
    for chunk in sample_chunks(A.shape[0], row):
        rotated = outer_rows(G_rot[:, chunk], A_rot[chunk])
        s += rotated.square_().sum(dim=(0, 1))
    return s


def kfe_scalings(
    A: Tensor, G: Tensor, u_gamma: Tensor, u_omega: Tensor, normaliser: float
) -> Tensor:
    """``s`` as ``[d_out, D]``: second moments of the gradient rows in the basis ``U_Γ ⊗ U_Ω``."""
    return kfe_squares(A, G, u_gamma, u_omega) / normaliser


def pool_null_spaces(s: Tensor, values_gamma: Tensor, values_omega: Tensor) -> Tensor:
    r"""Scalings ``[d_out, D]`` averaged over the factors' null spaces: basis-independent.

    Where a factor is singular (a batch below the layer's size), its eigenvectors with zero
    eigenvalue are an arbitrary basis of the null space, and scalings of samples outside the
    factor's range (later batches) depend on that choice. Replacing them by their mean over
    the null space — per range eigenvector of the other factor, and over the null × null
    rectangle — gives ``(s̄ + λ)⁻¹`` times the projector there: the same for every basis (the
    mean is a trace over the subspace). Null: eigenvalues ``≤ D·ε·λ_max`` of the factor's dtype.
    No synchronisation (masks on the device).

    Args:
        s: Scalings ``[d_out, D]`` in the basis ``U_Γ ⊗ U_Ω``.
        values_gamma: Eigenvalues of the output-gradient factor ``Γ`` ``[d_out]``.
        values_omega: Eigenvalues of the input factor ``Ω`` ``[D]``.
    """
    for dim, values in ((1, values_omega), (0, values_gamma)):
        values = values.to(s.device)
        eps = torch.finfo(values.dtype).eps
        null = values <= len(values) * eps * values.abs().max()
        shape = (1, -1) if dim == 1 else (-1, 1)
        mask = null.reshape(shape).to(s.dtype)
        mean = (s * mask).sum(dim, keepdim=True) / mask.sum().clamp_min(1)
        s = torch.where(null.reshape(shape), mean, s)
    return s


def basis_entry(basis: Any, layer) -> tuple[Tensor, Tensor]:
    """``(U_Γ, U_Ω)`` of one layer from a ``basis=`` option, checked against the layer's shape."""
    try:
        entry = basis[layer.name]
    except (KeyError, TypeError, IndexError):
        raise FisherlabError(
            f"the basis passed to 'ekfac' has no entry for layer {layer.name!r}"
        ) from None
    u_gamma, u_omega = entry.basis if isinstance(entry, EKFACBlock) else tuple(entry)
    expected = (layer.d_out, layer.d_in + layer.has_bias)
    if u_gamma.shape != (expected[0],) * 2 or u_omega.shape != (expected[1],) * 2:
        raise FisherlabError(
            f"the EKFAC basis for layer {layer.name!r} has shapes {tuple(u_gamma.shape)} "
            f"and {tuple(u_omega.shape)}, but the layer's [W | b] is {expected}: it comes "
            "from a layer of another shape"
        )
    return u_gamma, u_omega


@dataclass(frozen=True)
class EKFACOptions(Options):
    """Options of ``ekfac``.

    Attributes:
        kfac_approx: Factors the basis comes from (``"expand"``, the default, or ``"reduce"``).
        basis: A given basis (an earlier ``ekfac`` result or ``{name: (U_Γ, U_Ω)}``), or
            ``None`` for the basis of the data's own factors.
        scale_shift: The block of a scale-and-shift layer (BatchNorm, LayerNorm,
            GroupNorm): ``"diagonal"`` or ``"full"`` (:mod:`fisherlab.blocks.scale_shift`).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "kfac_approx": KFAC_APPROX,
        "scale_shift": SCALE_SHIFT_BLOCKS,
    }
    kfac_approx: str = "expand"
    basis: Any = None
    scale_shift: str = "diagonal"


class EKFACBuilder(BlockBuilder):
    r"""KFAC's basis (a :class:`~fisherlab.blocks.kfac.KFACBuilder` inside) plus the scalings.

    Two weighted statistics: the KFAC factors (:meth:`add_factors`), whose eigenbasis is the
    basis, and the scalings' squares ``Σ (Qᵀj)²`` in the current basis (:meth:`add_scalings`,
    normalised as the factors: by the data's ``ν`` or per batch). :meth:`add` adds to the
    factors while there is no basis and to the scalings once there is one, so that over a data
    set (``passes = 2``) the first pass gives the factors, :meth:`end_pass` their basis
    (:meth:`update_basis`), and the second pass the scalings in it; with a given basis
    (``basis=``) one pass. An optimizer adds to both every step with its own weights and calls
    :meth:`update_basis` when its schedule says (EKFAC-ra: the scalings' running average
    restarts there).
    """

    state_names = (
        *(f"factors.{n}" for n in KroneckerSums.STATE_NAMES),
        "u_gamma",
        "u_omega",
        "squares",
        "squares_mass",
    )

    def __init__(self, layer, options: EKFACOptions, context, normalise: str = "data"):
        super().__init__(layer, options, context, normalise)
        self.basis: tuple[Tensor, Tensor] | None = None
        if options.basis is not None:
            self.basis = basis_entry(options.basis, layer)
        self.passes = 1 if self.basis is not None else 2
        kfac = KFACOptions(kfac_approx=options.kfac_approx)
        self.factors = KFACBuilder(layer, kfac, context, normalise)
        self.squares = WeightedSum()

    def _add(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        if self.basis is None:
            self.factors._add(stats, old_weight, new_weight)
        else:
            self._add_scalings(stats, old_weight, new_weight)

    def add_factors(
        self, stats: LayerStats, old_weight: float = 1.0, new_weight: float = 1.0
    ) -> None:
        """Update the KFAC factors the basis comes from (:meth:`BlockBuilder.add`)."""
        self.factors.add(stats, old_weight, new_weight)

    def add_scalings(
        self, stats: LayerStats, old_weight: float = 1.0, new_weight: float = 1.0
    ) -> None:
        """Update the scalings' squares ``Σ (Qᵀj)²`` in the current basis (one is needed)."""
        old, new = check_weights(old_weight, new_weight)
        if self.basis is None:
            raise FisherlabError(
                f"the EKFAC builder of layer {self.layer.name!r} has no basis yet: add factors "
                "and call update_basis() (or pass basis=) before adding scalings"
            )
        self._add_scalings(stats, old, new)

    def _add_scalings(self, stats: LayerStats, old_weight: float, new_weight: float) -> None:
        A = self.layer.kron_inputs(stats.A)
        u_gamma, u_omega = (u.to(A) for u in self.basis)
        part = kfe_squares(A, stats.G, u_gamma, u_omega)
        self.squares.add(part, old_weight, new_weight, self.batch_scale(stats))

    def update_basis(self, normaliser: float | None = None) -> None:
        """Basis ← the eigenbasis of the current factors' KFAC block; the scalings restart.

        ``normaliser``: as :meth:`block` (the data's ``ν`` for sums over a data set).
        """
        basis = self.factors.block(normaliser).eigenbasis()
        self.basis = (basis.u_gamma, basis.u_omega)
        self.squares = WeightedSum()

    def end_pass(self, normaliser: float | None = None) -> None:
        if self.basis is None:
            self.update_basis(normaliser)
        super().end_pass(normaliser)

    def scalings(self, normaliser: float | None = None) -> Tensor:
        """``s`` ``[d_out, D]`` of the state: the squares over ``ν`` or over their mass."""
        self._require(self.squares.value is not None)
        if self.per_batch:
            return self.squares.value / self.divisor(normaliser, self.squares.mass)
        return self.context.all_reduce(self.squares.value) / self.divisor(normaliser, 0.0)

    def block(self, normaliser: float | None = None) -> EKFACBlock:
        scalings = self.scalings(normaliser)
        u_gamma, u_omega = (u.to(scalings) for u in self.basis)
        return EKFACBlock(
            self.layer, u_gamma, u_omega, scalings, self.context.fisher_type, self.options
        )

    def _state(self) -> dict[str, Tensor | None]:
        u_gamma, u_omega = self.basis if self.basis is not None else (None, None)
        factors = {f"factors.{k}": v for k, v in self.factors._state().items()}
        return {**factors, "u_gamma": u_gamma, "u_omega": u_omega, **self.squares.state("squares")}

    def _load(self, state) -> None:
        d_out, d = self.layer.d_out, self.layer.d_in + self.layer.has_bias
        self._check_shape("u_gamma", state.get("u_gamma"), (d_out, d_out))
        self._check_shape("u_omega", state.get("u_omega"), (d, d))
        self._check_shape("squares", state.get("squares"), (d_out, d))
        prefix = len("factors.")
        self.factors._load({k[prefix:]: v for k, v in state.items() if k.startswith("factors.")})
        if state.get("u_gamma") is not None and state.get("u_omega") is not None:
            self.basis = (state["u_gamma"], state["u_omega"])
        elif self.options.basis is None:
            self.basis = None
        self.squares.load(state, "squares")


class EKFACBlock(CurvatureBlock):
    """``Q diag(s) Qᵀ`` with ``Q = U_Γ ⊗ U_Ω`` (KFAC's eigenbasis); damping ``1/(s + λ)`` in it.

    Products and solves go through the Kronecker-eigenbasis kernel
    (:class:`~fisherlab.blocks.kronecker.KroneckerEigenbasis`), as KFAC's.
    """

    method = "ekfac"
    Options: ClassVar = EKFACOptions
    Builder = EKFACBuilder

    def __init__(
        self, layer, u_gamma: Tensor, u_omega: Tensor, scalings: Tensor, fisher_type, options=None
    ):
        super().__init__(layer, fisher_type, options or {})
        expected = self.kron_shape
        if (
            tuple(scalings.shape) != expected
            or u_gamma.shape != (expected[0],) * 2
            or u_omega.shape != (expected[1],) * 2
        ):
            raise FisherlabError(
                f"EKFAC basis of shapes {tuple(u_gamma.shape)} and {tuple(u_omega.shape)} does not "
                f"fit layer {layer.name!r} with [W | b] of shape {expected}"
            )
        self.scalings = scalings
        self._eigenbasis = KroneckerEigenbasis(u_gamma, u_omega)

    @property
    def u_gamma(self) -> Tensor:
        """``U_Γ``."""
        return self._eigenbasis.u_gamma

    @property
    def u_omega(self) -> Tensor:
        """``U_Ω``."""
        return self._eigenbasis.u_omega

    @property
    def basis(self) -> tuple[Tensor, Tensor]:
        """``(U_Γ, U_Ω)``, to pass as ``basis=`` to a later ``"ekfac"`` call."""
        return self.u_gamma, self.u_omega

    def eigenbasis(self) -> KroneckerEigenbasis:
        """``Q = U_Γ ⊗ U_Ω`` (its eigenvalues on ``Q`` are :attr:`scalings`)."""
        return self._eigenbasis

    def _reference(self) -> Tensor:
        return self.scalings

    def _matmat(self, V: Tensor) -> Tensor:
        return self._eigenbasis.apply(V, self.scalings)

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._eigenbasis.apply(V, 1.0 / (self.scalings.clamp_min(0) + damping))

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return torch.sort(self.scalings.flatten()).values

    def _nbytes(self) -> int:
        return tensor_bytes(self.u_gamma, self.u_omega, self.scalings)

    def norm_sq(self) -> float:
        return float((self.scalings**2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        A = self.layer.kron_inputs(A)
        return float((self.scalings * kfe_squares(A, G, self.u_gamma, self.u_omega)).sum())
