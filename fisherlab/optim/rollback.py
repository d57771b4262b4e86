"""Undoing a bad step: snapshots of the layer state, non-finite tests, ``where``, skipped steps.

A step replaces the entries of the per-layer state (:mod:`fisherlab.optim.state`), it never
mutates a tensor in place, so a snapshot of references is enough to roll back. Whether a step
was bad (a NaN/Inf in a gradient, a new statistic or a direction) is decided in one of two ways:

* **synchronised**: one host synchronisation reads :func:`all_finite`; a bad step restores the
  snapshot, and :func:`non_finite` names the layers (only then: it synchronises per tensor);
* **sync-free**: the flag ``ok`` stays on the device, each replaced entry becomes
  ``where(ok, new, old)`` (:func:`keep_where`) and the parameter update applies under the same
  flag (:mod:`fisherlab.optim.update`); the skipped step is counted on the device
  (:class:`SkippedSteps`). This needs an old value of the same structure and shapes for every
  replaced entry (:func:`restorable`).

Example:
    >>> import torch
    >>> from fisherlab.optim.state import LayerStates
    >>> states = LayerStates({"0": {"X": torch.zeros(2)}})
    >>> saved = snapshot(states)
    >>> states["0"]["X"] = torch.tensor([1.0, float("nan")])
    >>> replaced = changes(states, saved)
    >>> ok = all_finite(changed_tensors(replaced))
    >>> keep_where(ok, states, replaced); states["0"]["X"].tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from fisherlab.optim.state import (
    Entry,
    LayerState,
    LayerStates,
    map_tensors,
    same_structure,
    tensors,
)


class Change(NamedTuple):
    """An entry a step replaced: ``layer``, ``key``, the ``new`` value, the ``old`` (or None)."""

    layer: str
    key: str
    new: Entry
    old: Entry | None


def snapshot(states: LayerStates) -> LayerStates:
    """References to every entry of every layer (dict entries copied one level down).

    Entries are replaced, never mutated, except that a dict entry may gain keys (FNGD adds its
    weights of a step to its dict): its top level is copied.
    """
    return LayerStates.of_checked(
        {
            name: LayerState.of_checked(
                {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
            )
            for name, state in states.items()
        }
    )


def changes(states: LayerStates, saved: LayerStates) -> list[Change]:
    """Every entry of ``states`` that is not the one in the snapshot ``saved`` (by identity)."""
    found = []
    for name, state in states.items():
        before = saved.get(name, {})
        for key, value in state.items():
            old = before.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                if len(old) != len(value) or any(old.get(k) is not v for k, v in value.items()):
                    found.append(Change(name, key, value, old))
            elif value is not old:
                found.append(Change(name, key, value, old))
    return found


def restorable(replaced: Iterable[Change]) -> bool:
    """Whether every replaced entry has an old value ``where`` can fall back to (no sync).

    False at a layer's first step and when a shape, a key or a kept number (a damping) changed.
    """
    return all(same_structure(c.new, c.old) for c in replaced)


def changed_tensors(replaced: Iterable[Change]) -> list[Tensor]:
    """The tensors of the new values."""
    return [t for c in replaced for t in tensors(c.new)]


def finite(t: Tensor) -> Tensor:
    """Whether all entries are finite, as a 0-dim tensor (sparse tensors: their values)."""
    return torch.isfinite(t.coalesce().values() if t.is_sparse else t).all()


def _total(t: Tensor) -> Tensor:
    """The sum of a tensor's entries: non-finite if any entry is (or if the sum overflows)."""
    return (t._values() if t.is_sparse else t).sum().float()


def all_finite(leaves: Iterable[Tensor]) -> Tensor:
    """Whether every tensor is finite, as one 0-dim flag on the device (no synchronisation).

    One sum per tensor: an overflowing sum of finite entries also counts as non-finite.
    """
    return torch.isfinite(torch.stack([_total(t) for t in leaves])).all()


def non_finite(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The sorted names of the tensors holding NaN/Inf (one synchronisation per tensor)."""
    return sorted({name for name, t in named if not bool(finite(t))})


def keep_where(ok: Tensor, states: LayerStates, replaced: Iterable[Change]) -> None:
    """Each replaced entry becomes ``where(ok, new, old)`` (its old value must be restorable)."""
    for c in replaced:
        states[c.layer][c.key] = map_tensors(lambda n, o: torch.where(ok, n, o), c.new, c.old)


class SkippedSteps:
    """Steps skipped: counted on the host, or on the device by sync-free steps.

    Args:
        count: Steps skipped before (a loaded state's).
    """

    def __init__(self, count: int = 0):
        self.host = count
        self.device: Tensor | None = None  # sync-free steps: read only when asked

    def add(self) -> None:
        """One more skipped step (known on the host)."""
        self.host += 1

    def add_unless(self, ok: Tensor) -> None:
        """One more unless ``ok`` (a 0-dim flag on the device; no synchronisation)."""
        skipped = (~ok).long()
        self.device = skipped if self.device is None else self.device + skipped

    def __int__(self) -> int:
        """The count; waits for the device's part if there is one."""
        return self.host + (0 if self.device is None else int(self.device))


__all__ = [
    "Change",
    "SkippedSteps",
    "all_finite",
    "changed_tensors",
    "changes",
    "finite",
    "keep_where",
    "non_finite",
    "restorable",
    "snapshot",
]
