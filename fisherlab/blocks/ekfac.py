r"""EKFAC: KFAC's eigenbasis with exact second moments (George et al., NeurIPS 2018).

With the Kronecker-factored eigenbasis ``Q = U_Γ ⊗ U_Ω`` of the KFAC factors,

.. math::
    F̂ = Q \,\mathrm{diag}(s)\, Q^\top, \qquad s = \frac1ν \sum_{n,r} (Q^\top j_{n,r})^2,

the best approximation of ``F`` (in Frobenius norm) among matrices diagonal in ``Q``; hence
``‖F − F̂_ekfac‖ ≤ ‖F − F̂_kfac‖`` and ``‖F − F̂_ekfac‖² = ‖F‖² − ‖s‖²``. Over a data set (its
definition) the basis comes from the factors of the whole data (first pass) and the scalings from
a second pass. The basis may instead be given (``basis=``: an earlier ``ekfac`` result or
``{name: (U_Γ, U_Ω)}``), to study a stale basis with fresh scalings; then one pass suffices.
At-scale Frobenius terms: ``‖s‖²`` and ``Σ_rows jᵀF̂j = ⟨s, Σ_rows (Qᵀj)²⟩``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fisherlab.blocks.assemble import SCALE_SHIFT_BLOCKS
from fisherlab.blocks.base import BlockBuilder, CurvatureBlock, Options, tensor_bytes
from fisherlab.blocks.factors import KFAC_APPROX, KroneckerSums
from fisherlab.conventions import FisherlabError
from fisherlab.linalg import sample_chunks, symmetric_eigh


def kfe_squares(A: Tensor, G: Tensor, u_gamma: Tensor, u_omega: Tensor) -> Tensor:
    """``Σ_{n,r} (Qᵀ j_{n,r})²`` as ``[d_out, D]`` for ``Q = U_Γ ⊗ U_Ω`` (unnormalised)."""
    A_rot = A @ u_omega  # [N, T, D]
    G_rot = G @ u_gamma  # [R, N, T, d_out]
    if A.shape[1] == 1:  # one position: (g ⊗ a)² = g² ⊗ a², a single product
        return torch.einsum("rnd,ne->de", G_rot[:, :, 0] ** 2, A_rot[:, 0] ** 2)
    s = A.new_zeros(u_gamma.shape[0], u_omega.shape[0])
    row = G.shape[0] * u_gamma.shape[0] * u_omega.shape[0]
    for chunk in sample_chunks(A.shape[0], row):
        rotated = torch.einsum("rntd,nte->rnde", G_rot[:, chunk], A_rot[chunk])
        s += (rotated**2).sum(dim=(0, 1))
    return s


def kfe_scalings(
    A: Tensor, G: Tensor, u_gamma: Tensor, u_omega: Tensor, normaliser: float
) -> Tensor:
    """``s`` as ``[d_out, D]``: second moments of the gradient rows in the basis ``U_Γ ⊗ U_Ω``."""
    return kfe_squares(A, G, u_gamma, u_omega) / normaliser


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
    """First pass: the factors (unless a basis is given); second pass: the scalings."""

    def __init__(self, layer, options: EKFACOptions, context):
        super().__init__(layer, options, context)
        self.basis: tuple[Tensor, Tensor] | None = None
        if options.basis is not None:
            self.basis = basis_entry(options.basis, layer)
        self.passes = 1 if self.basis is not None else 2
        self.sums = KroneckerSums(options.kfac_approx)
        self.squares: Tensor | None = None

    def add(self, A: Tensor, G: Tensor, pass_index: int) -> None:
        A = self.layer.kron_inputs(A)
        if self.basis is None:
            self.sums.add(A, G)
            return
        u_gamma, u_omega = (u.to(A) for u in self.basis)
        part = kfe_squares(A, G, u_gamma, u_omega)
        self.squares = part if self.squares is None else self.squares.add_(part)

    def end_pass(self, pass_index: int, normaliser: float) -> None:
        if self.basis is None:
            gamma, omega = self.sums.factors(normaliser, self.context.all_reduce)
            self.basis = (symmetric_eigh(gamma)[1], symmetric_eigh(omega)[1])

    def finish(self, normaliser: float, num_samples: int) -> EKFACBlock:
        scalings = self.context.all_reduce(self.squares) / normaliser
        u_gamma, u_omega = (u.to(scalings) for u in self.basis)
        return EKFACBlock(
            self.layer, u_gamma, u_omega, scalings, self.context.fisher_type, self.options
        )


class EKFACBlock(CurvatureBlock):
    """``Q diag(s) Qᵀ`` with ``Q = U_Γ ⊗ U_Ω``; damping ``1/(s + λ)`` in that basis."""

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
        self.u_gamma, self.u_omega, self.scalings = u_gamma, u_omega, scalings

    @property
    def basis(self) -> tuple[Tensor, Tensor]:
        """``(U_Γ, U_Ω)``, to pass as ``basis=`` to a later ``"ekfac"`` call."""
        return self.u_gamma, self.u_omega

    def _reference(self) -> Tensor:
        return self.scalings

    def _rotate(self, V: Tensor, weights: Tensor) -> Tensor:
        return self.u_gamma @ ((self.u_gamma.T @ V @ self.u_omega) * weights) @ self.u_omega.T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._rotate(V, self.scalings)

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._rotate(V, 1.0 / (self.scalings.clamp_min(0) + damping))

    def _eigvalsh(self, max_bytes: int) -> Tensor:
        return torch.sort(self.scalings.flatten()).values

    def _nbytes(self) -> int:
        return tensor_bytes(self.u_gamma, self.u_omega, self.scalings)

    def norm_sq(self) -> float:
        return float((self.scalings**2).sum())

    def inner_with_rows(self, A: Tensor, G: Tensor) -> float:
        A = self.layer.kron_inputs(A)
        return float((self.scalings * kfe_squares(A, G, self.u_gamma, self.u_omega)).sum())
