r"""The one interface of every curvature block, with damping and input handling done once.

A block represents a ``P×P`` matrix ``F̂`` for one layer, indexed in parameter order (weight
row-major, then bias). Subclasses work in Kronecker order ``vec_r([W | b])`` on matrices
``V ∈ R^{k × d_out × D}`` (``D = d_in + 1`` with bias) and implement a few private kernels:

* ``_matmat(V)``: ``F̂ V``;
* ``_solve(V, damping)``: ``(F̂ + λI)⁻¹ V``;
* ``_eigvalsh()``: all ``P`` eigenvalues, ascending;
* ``_nbytes()``: memory held;
* optionally ``_dense_kron()``: ``F̂`` in Kronecker order (default: ``_matmat`` of the identity).

The public methods take vectors ``[P]`` or matrices ``[P, k]`` in parameter order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, check_memory
from fisherlab.layers import Layer


def check_damping(damping: float) -> float:
    """A positive, finite damping ``λ``, or a clear error."""
    value = float(damping)
    if not math.isfinite(value) or value <= 0:
        raise FisherlabError(f"damping must be positive and finite, got {damping!r}")
    return value


class CurvatureBlock(ABC):
    """A ``P×P`` curvature matrix of one layer (see the module docstring).

    Attributes:
        layer: The layer the block belongs to.
        method: The method name, e.g. ``"kfac"``.
        fisher_type: The Fisher type of the captured statistics.
        options: The options the block was built with.
    """

    method: str = ""

    def __init__(self, layer: Layer, fisher_type: str, options: dict[str, Any]):
        self.layer = layer
        self.fisher_type = fisher_type
        self.options = dict(options)

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
        kron = cols[:, : d_out * d_in].reshape(-1, d_out, d_in)
        if self.layer.has_bias:  # [W | b]: the bias is the last column
            kron = torch.cat([kron, cols[:, d_out * d_in :].unsqueeze(-1)], dim=-1)
        return kron, vector

    def _to_param(self, u: Tensor, vector: bool) -> Tensor:
        d_in = self.layer.d_in
        out = u[..., :d_in].reshape(u.shape[0], -1)
        if self.layer.has_bias:
            out = torch.cat([out, u[..., d_in]], dim=-1)
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

    def eigvalsh(self) -> Tensor:
        """All ``P`` eigenvalues of ``F̂``, ascending."""
        return self._eigvalsh()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory the block holds."""
        return self._nbytes()

    def to_dense(self, max_bytes: int = DEFAULT_MAX_BYTES) -> Tensor:
        """``F̂`` as a dense ``[P, P]`` tensor in parameter order."""
        check_memory(
            f"the dense {self.method} block of layer {self.layer.name!r} ({self.size}×{self.size})",
            self.size**2 * torch.finfo(self.dtype).bits // 8,
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

    # ---------------------------------------------------------------- kernels
    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor: ...

    @abstractmethod
    def _solve(self, V: Tensor, damping: float) -> Tensor: ...

    @abstractmethod
    def _eigvalsh(self) -> Tensor: ...

    @abstractmethod
    def _nbytes(self) -> int: ...

    def _dense_kron(self) -> Tensor:
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self._matmat(eye.reshape(self.size, *self.kron_shape)).reshape(self.size, -1).T

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer.name!r}, P={self.size}, "
            f"fisher_type={self.fisher_type!r}, options={self.options})"
        )


def tensor_bytes(*tensors: Tensor | None) -> int:
    """Total bytes of the given tensors (``None`` counts as zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
