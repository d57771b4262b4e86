"""``torch.distributed`` for the optimizers: ranks combine statistics into one batch's.

``W`` ranks with batch ``b`` take the step of one process with batch ``W·b``: optimizers that
need every sample gather ``Ã`` and ``G`` (:func:`gather_samples`), KFAC and EKFAC average their
batch factors and scalings (:func:`all_reduce_mean`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed() -> bool:
    """Whether ``torch.distributed`` runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over all ranks (itself without ``torch.distributed``)."""
    if distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def gather_samples(
    stats: dict[str, tuple[Tensor, Tensor]], normaliser: float
) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """All ranks' ``Ã`` and ``G`` concatenated along the samples, and the global ``ν``.

    Every rank must use the same local batch size.
    """
    gathered = {}
    for name, (A, G) in stats.items():
        parts_a = [torch.empty_like(A) for _ in range(dist.get_world_size())]
        parts_g = [torch.empty_like(G) for _ in range(dist.get_world_size())]
        dist.all_gather(parts_a, A.contiguous())
        dist.all_gather(parts_g, G.contiguous())
        gathered[name] = (torch.cat(parts_a, dim=0), torch.cat(parts_g, dim=1))
    return gathered, normaliser * dist.get_world_size()
