"""The conventions every fisherlab module shares, and the checks that enforce them.

Fisher types (``fisher_type=``):

* ``"true"``: the expectation over the model's predictive distribution, computed exactly from a
  square root of the loss Hessian w.r.t. the network output (``R = C`` rows per sample).
* ``"mc"``: labels sampled from the model, ``k = mc_samples`` per input (``R = k`` rows, each
  scaled by ``1/√k``).
* ``"empirical"``: gradients with the true labels (``R = 1``).

Normalisation follows the loss as the user wrote it: ``F = (1/ν) JᵀJ`` where ``J`` stacks the
gradient rows of the per-sample *summed* loss and ``ν`` is the loss's own normaliser over the
whole data (``N`` for mean cross-entropy, ``N·C`` for mean MSE, ``1`` for ``reduction="sum"``).
See :class:`fisherlab.losses.LossSpec`.

Every ``check_*`` validator lives here, so that a number is refused with the same words
wherever it is passed.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

FISHER_TYPES: tuple[str, ...] = ("true", "mc", "empirical")

#: Default memory budget for dense matrices built by fisherlab (bytes).
DEFAULT_MAX_BYTES: int = 2 * 2**30

#: Default size of a :class:`~fisherlab.problem.Problem`'s capture cache (bytes, 256 MiB): the
#: captures of one pass over the data are kept up to this size and replayed by later passes of
#: the same call (the README states it once; a test compares the two).
DEFAULT_CACHE_BYTES: int = 2**28


class FisherlabError(ValueError):
    """Base class for errors raised on bad input to fisherlab."""


class FisherlabWarning(UserWarning):
    """Base class of fisherlab's own warnings (the command line prints them as one line)."""


class UnsupportedLayerError(FisherlabError):
    """A module with parameters whose type or configuration fisherlab cannot handle."""


class MemoryBudgetError(FisherlabError):
    """A dense object would exceed the caller's memory budget."""


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer ≥ 1 (numpy integers too), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise FisherlabError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_range(
    name: str, value: Any, low: float, high: float | None = None, open_low: bool = False
) -> float:
    """``value`` if it is a finite real in ``[low, high)`` (``(low, high)`` when ``open_low``).

    Otherwise a clear error naming the interval (``high=None``: unbounded above).
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else '∞'})"
        raise FisherlabError(f"{name} must lie in {bounds}, got {value!r}")
    return value


def check_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer (numpy integers too), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FisherlabError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_keys(where: str, given: Iterable[Any], valid: Iterable[str]) -> None:
    """Refuse keys of a settings dict that are not in ``valid``, naming the nearest valid one.

    Example: ``check_keys("grid", {"seed"}, ("seeds", "select"))`` raises
    ``grid: unknown key 'seed' (did you mean 'seeds'?); valid keys: 'seeds', 'select'``.
    """
    valid = sorted(valid)
    for key in sorted(given, key=str):
        if key in valid:
            continue
        near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FisherlabError(
            f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(map(repr, valid))}"
        )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a clear error listing them."""
    if not isinstance(value, str) or value not in choices:
        raise FisherlabError(f"{name}={value!r} is not valid; choose one of {choices}")
    return value


def check_fisher_type(fisher_type: str, mc_samples: Any = 1) -> int:
    """Raise a clear error for an unknown Fisher type or an invalid number of MC samples.

    Returns:
        ``mc_samples`` as an ``int``.
    """
    if not isinstance(fisher_type, str) or fisher_type not in FISHER_TYPES:
        raise FisherlabError(
            f"unknown fisher_type {fisher_type!r}; valid types are "
            + ", ".join(repr(t) for t in FISHER_TYPES)
        )
    return check_positive_int("mc_samples", mc_samples)


def check_damping(damping: Any) -> float:
    """A positive, finite damping ``λ`` as a ``float`` (numpy numbers too), or a clear error.

    Booleans, strings and tensors with more than one element are refused.
    """
    if isinstance(damping, Tensor) and damping.numel() == 1 and damping.dtype != torch.bool:
        damping = damping.item()
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise FisherlabError(f"damping must be a positive finite number, got {damping!r}")
    value = float(damping)
    if not math.isfinite(value) or value <= 0:
        raise FisherlabError(f"damping must be a positive finite number, got {damping!r}")
    return value


def check_max_bytes(max_bytes: Any) -> int:
    """A positive memory budget in bytes as an ``int`` (numpy numbers and ``2e9`` too)."""
    if (
        isinstance(max_bytes, bool)
        or not isinstance(max_bytes, numbers.Real)
        or not math.isfinite(float(max_bytes))
        or max_bytes <= 0
    ):
        raise FisherlabError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    return int(max_bytes)


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
    max_bytes = check_max_bytes(max_bytes)
    if nbytes > max_bytes:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(nbytes)}, more than the budget of "
            f"{format_bytes(max_bytes)}; {hint}"
        )
