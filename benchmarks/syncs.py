"""Counting host synchronisations: the calls that make the host wait for a device's result.

On a GPU each one stalls the queue; on a CPU they cost nothing, but counting them there shows
what a step would do on a GPU. Counted: ``Tensor.__bool__``, ``item``, ``tolist``,
``__float__`` and ``__int__`` (Python-level conversions of tensor values; waits inside C++
kernels are not seen).

Example:
    >>> import torch
    >>> from syncs import counting_syncs
    >>> with counting_syncs() as count:
    ...     _ = bool(torch.ones(2).sum() > 0)
    >>> count[0]
    1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_CONVERSIONS = ("__bool__", "item", "tolist", "__float__", "__int__")


@contextlib.contextmanager
def counting_syncs() -> Iterator[list[int]]:
    """Within the block, count the host synchronisations (``count[0]``)."""
    originals = {name: getattr(torch.Tensor, name) for name in _CONVERSIONS}
    count = [0]

    def counted(original):
        def call(self, *args):
            count[0] += 1
            return original(self, *args)

        return call

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield count
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
