"""The conventions every fisherlab module shares, and the checks that enforce them.

Fisher types (``fisher_type=``):

* ``"true"``: the expectation over the model's predictive distribution, computed exactly from a
  square root of the loss Hessian w.r.t. the network output (``R = C`` rows per sample).
* ``"mc"``: labels sampled from the model, ``k = mc_samples`` per input (``R = k`` rows, each
  scaled by ``1/√k``).
* ``"empirical"``: gradients with the true labels (``R = 1``).

Normalisation follows the loss as the user wrote it: ``F = (1/ν) JᵀJ`` where ``J`` stacks the
gradient rows of the per-sample *summed* loss and ``ν`` is the loss's own normaliser (``N`` for
mean cross-entropy, ``N·C`` for mean MSE, ``1`` for ``reduction="sum"``). See
:class:`fisherlab.losses.LossSpec`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FISHER_TYPES: tuple[str, ...] = ("true", "mc", "empirical")

#: Default memory budget for dense matrices built by fisherlab (bytes).
DEFAULT_MAX_BYTES: int = 2 * 2**30


class FisherlabError(ValueError):
    """Base class for errors raised on bad input to fisherlab."""


class UnsupportedLayerError(FisherlabError):
    """A module with parameters whose type or configuration fisherlab cannot handle."""


class MemoryBudgetError(FisherlabError):
    """A dense object would exceed the caller's memory budget."""


def check_fisher_type(fisher_type: str, mc_samples: int = 1) -> None:
    """Raise a clear error for an unknown Fisher type or an invalid number of MC samples."""
    if fisher_type not in FISHER_TYPES:
        raise FisherlabError(
            f"unknown fisher_type {fisher_type!r}; valid types are "
            + ", ".join(repr(t) for t in FISHER_TYPES)
        )
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise FisherlabError(f"mc_samples must be a positive integer, got {mc_samples!r}")


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise if a floating tensor holds NaN or Inf values (before any computation uses it)."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            count = int(bad.sum())
            raise FisherlabError(
                f"{name} contain {count} non-finite value(s) (NaN or Inf) of {tensor.numel()}; "
                "clean the batch before computing curvature"
            )


def format_bytes(n: float) -> str:
    """Human-readable size, e.g. ``'2.00 GiB'``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0 if n <= 0 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.2f} {units[i]}"


def check_memory(what: str, nbytes: int, max_bytes: int, hint: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it exceeds ``max_bytes``."""
    if nbytes > max_bytes:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(nbytes)}, more than the budget of "
            f"{format_bytes(max_bytes)}; {hint}"
        )
