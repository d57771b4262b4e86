"""The optimizers' per-layer state: one typed record per layer, and one walk over its tensors.

Each preconditioned layer keeps a :class:`LayerState`, a mapping from entry names to
:data:`Entry` values: a tensor (``builder.aa``, ``X``), a tuple of tensors and numbers (an
eigenbasis ``(λ, U)``; factored inverses ``(λ_damping, Γ⁻¹, Ω⁻¹)``), or a dict of them (FNGD's
weights by step index). The mapping refuses any other kind of value when it is set, so every
entry is something :func:`map_tensors` — the one walk used to clone, cast, compare and select
state (:mod:`fisherlab.optim.rollback`, ``state_dict``/``load_state_dict``) — understands.

Example:
    >>> import torch
    >>> state = LayerState(eig=(torch.ones(2), torch.eye(2)), inverses=(1e-3, torch.eye(2)))
    >>> doubled = map_tensors(lambda t: 2 * t, dict(state))
    >>> doubled["inverses"][0], doubled["eig"][0].tolist()
    (0.001, [2.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor

from fisherlab.conventions import FisherlabError

#: Leaves of an entry besides tensors: numbers the tensors were formed with (e.g. the damping
#: of factored inverses), flags, names.
Scalar: TypeAlias = bool | int | float | str | None
#: A value of a layer's state: a tensor, or tuples, lists and dicts of entries and scalars.
Entry: TypeAlias = Tensor | tuple["Entry | Scalar", ...] | list[Any] | dict[Any, "Entry | Scalar"]
_SCALARS = (bool, int, float, str, type(None))


class StructureMismatch(ValueError):
    """Trees given to :func:`map_tensors` together differ in structure or in a scalar leaf."""


def map_tensors(fn: Callable[..., Tensor], *trees: Any) -> Any:
    """``fn`` applied to the tensors at the same place in ``trees``, in a tree of their structure.

    The one walk over optimizer state. A tree is a tensor, a scalar (:data:`Scalar`) or a
    tuple, list or dict of trees; the result has the first tree's structure, with ``fn(*leaves)``
    at each tensor and the first tree's scalars (dicts come back as plain ``dict``).

    Args:
        fn: Takes one tensor per tree, returns the new leaf.
        *trees: At least one tree; the others must have the same structure: the same container
            types, the same dict keys, the same lengths, tensors at the same places and equal
            scalars.

    Returns:
        The mapped tree.

    Raises:
        StructureMismatch: when the trees differ in structure or in a scalar.
        TypeError: for a leaf that is neither a tensor nor a scalar (e.g. a module).
    """
    first, others = trees[0], trees[1:]
    if isinstance(first, Tensor):
        if not all(isinstance(t, Tensor) for t in others):
            raise StructureMismatch("a tensor against a non-tensor")
        return fn(*trees)
    if isinstance(first, dict):
        if not all(isinstance(t, dict) and t.keys() == first.keys() for t in others):
            raise StructureMismatch("dicts with other keys")
        return {k: map_tensors(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, tuple | list):
        kind = tuple if isinstance(first, tuple) else list
        if not all(isinstance(t, kind) and len(t) == len(first) for t in others):
            raise StructureMismatch(f"{kind.__name__}s of other lengths or types")
        return type(first)(map_tensors(fn, *leaves) for leaves in zip(*trees))
    if isinstance(first, _SCALARS):
        if any(isinstance(t, Tensor) or t != first for t in others):
            raise StructureMismatch(f"scalars {[first, *others]} differ")
        return first
    raise TypeError(f"optimizer state holds a {type(first).__name__}, not a tensor or scalar")


def tensors(tree: Any) -> list[Tensor]:
    """The tensors of a tree, in walk order."""
    found: list[Tensor] = []

    def collect(t: Tensor) -> Tensor:
        found.append(t)
        return t

    map_tensors(collect, tree)
    return found


def same_structure(new: Any, old: Any) -> bool:
    """Whether ``old`` has ``new``'s structure, scalars and tensor shapes (``where`` fits)."""

    def check(a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise StructureMismatch("tensors of other shapes")
        return a

    try:
        map_tensors(check, new, old)
    except StructureMismatch:
        return False
    return True


def clone(tree: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """A detached copy of a tree, on ``device`` and, for floating tensors, in ``dtype`` if given."""

    def copy(t: Tensor) -> Tensor:
        t = t.detach().clone()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    return map_tensors(copy, tree)


def _checked(key: Any, value: Any) -> Any:
    """``value`` if it is an :data:`Entry` under a string key, else a clear error."""
    if not isinstance(key, str):
        raise FisherlabError(f"optimizer state entries are named by strings, got {key!r}")
    if isinstance(value, Tensor):  # the common case, checked at the cost of one isinstance
        return value
    try:
        map_tensors(lambda t: t, value)
    except TypeError as err:
        raise FisherlabError(f"optimizer state entry {key!r}: {err}") from None
    return value


class LayerState(dict[str, Entry]):
    """One layer's state: entry name → :data:`Entry` (checked on every write).

    A ``dict`` (``state_dict()`` saves it as a plain one); writes by ``[]``, ``update`` and
    ``setdefault`` refuse values that are not entries, so :func:`map_tensors` walks all of it.
    """

    def __init__(self, entries: Mapping[str, Entry] | Iterable = (), **named: Entry):
        super().__init__()
        self.update(entries, **named)

    def __setitem__(self, key: str, value: Entry) -> None:
        super().__setitem__(key, _checked(key, value))

    def update(self, entries: Mapping[str, Entry] | Iterable = (), **named: Entry) -> None:  # type: ignore[override]
        for key, value in dict(entries, **named).items():
            self[key] = value

    def setdefault(self, key: str, default: Entry = None) -> Entry:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    @classmethod
    def of_checked(cls, entries: Mapping[str, Entry]) -> LayerState:
        """A state of entries taken from states already (no second check: every step)."""
        state = cls.__new__(cls)
        dict.update(state, entries)
        return state


class LayerStates(dict[str, LayerState]):
    """The optimizer's state of all layers: layer name → :class:`LayerState`.

    Plain mappings stored into it (``states[name] = {}``) become :class:`LayerState` s.
    """

    def __init__(self, states: Mapping[str, Mapping[str, Entry]] | Iterable = ()):
        super().__init__()
        for name, state in dict(states).items():
            self[name] = state

    def __setitem__(self, name: str, state: Mapping[str, Entry]) -> None:
        super().__setitem__(name, state if isinstance(state, LayerState) else LayerState(state))

    def setdefault(self, name: str, default: Mapping[str, Entry] | None = None) -> LayerState:  # type: ignore[override]
        if name not in self:
            self[name] = {} if default is None else default
        return self[name]

    def update(self, states: Mapping[str, Mapping[str, Entry]] | Iterable = (), **named) -> None:  # type: ignore[override]
        for name, state in dict(states, **named).items():
            self[name] = state

    @classmethod
    def of_checked(cls, states: Mapping[str, LayerState]) -> LayerStates:
        """The states of layers given as :class:`LayerState` s already (no second check)."""
        held = cls.__new__(cls)
        dict.update(held, states)
        return held


__all__ = [
    "Entry",
    "LayerState",
    "LayerStates",
    "StructureMismatch",
    "clone",
    "map_tensors",
    "same_structure",
    "tensors",
]
