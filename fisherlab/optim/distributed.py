"""``torch.distributed`` for the optimizers: ranks combine statistics into one batch's.

``W`` ranks with batch ``b`` take the step of one process with batch ``W·b``: optimizers that
need every sample gather ``Ã`` and ``G`` (:func:`gather_samples`), KFAC and EKFAC average their
batch factors and scalings (:func:`all_reduce_mean`) and share out the eigen-decompositions or
inverses of the factors (:func:`computed_once`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist
from torch import Tensor

from fisherlab.conventions import FisherlabError


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


def assign_owners(costs: dict[Hashable, float], world: int) -> dict[Hashable, int]:
    """One rank per job, greedily: the costliest job first, to the least-loaded rank."""
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], str(n))):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def computed_once(
    work: dict[Hashable, Callable[[], tuple[Tensor, ...]]],
    like: dict[Hashable, tuple[Tensor, ...]],
    costs: dict[Hashable, float],
    spread: bool = True,
) -> dict[Hashable, tuple[Tensor, ...]]:
    """Every job's tensors, identical on every rank, each job computed by one rank.

    Without ``torch.distributed`` (or with ``spread=False``) every job runs here. Otherwise
    each job goes to one rank (greedy by ``costs``), which runs it and broadcasts its tensors,
    shaped as ``like`` (as kfac-pytorch does with inverses): the ranks work in parallel instead
    of repeating each other. A job that fails on its rank gives NaNs, which the step's
    finiteness check turns into a skipped step on every rank (a broadcast never waits on an
    error).
    """
    if not (spread and distributed()):
        return {name: job() for name, job in work.items()}
    rank = dist.get_rank()
    owners = assign_owners(costs, dist.get_world_size())
    results = {}
    for name, job in work.items():
        if owners[name] == rank:
            try:
                results[name] = tuple(t.contiguous() for t in job())
            except (FisherlabError, RuntimeError):
                results[name] = tuple(torch.full_like(t, math.nan) for t in like[name])
        else:
            results[name] = tuple(
                torch.empty_like(t, memory_format=torch.contiguous_format) for t in like[name]
            )
    for name, tensors in results.items():
        for tensor in tensors:
            dist.broadcast(tensor, src=owners[name])
    return results
