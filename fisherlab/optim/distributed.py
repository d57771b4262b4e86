"""``torch.distributed`` for the optimizers: ranks combine statistics into one batch's.

Ranks with local batches ``b_r`` (equal or not) take the step of one process with the
concatenated batch: optimizers that need every sample gather ``Ã`` and ``G``
(:func:`gather_samples`: sizes first, then one padded collective), KFAC and EKFAC average their
batch factors and scalings weighted by each rank's share (:func:`all_reduce_mean`) and share
out the eigen-decompositions or inverses of the factors (:func:`computed_once`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist
from torch import Tensor

from fisherlab.conventions import FisherlabError


def distributed() -> bool:
    """Whether ``torch.distributed`` runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: Tensor, weight: float = 1.0) -> Tensor:
    """``Σ_r w_r t_r / Σ_r w_r`` over all ranks (``tensor`` itself without ``torch.distributed``).

    With ``w_r`` the rank's share of the concatenated batch (its samples for a mean over
    samples, its ``ν`` for a sum over ``ν``), the mean of the ranks' batch statistics is the
    statistic of the concatenated batch, whatever the local batch sizes.
    """
    if distributed():
        flat = torch.cat([tensor.flatten() * weight, tensor.new_full((1,), weight)])
        dist.all_reduce(flat)
        tensor = (flat[:-1] / flat[-1]).view_as(tensor)
    return tensor


def _samples_first(stats: dict[str, tuple[Tensor, Tensor]]) -> list[Tensor]:
    """``Ã [N, T, D]`` and ``G`` as ``[N, R, T, d_out]`` of every layer, in order."""
    return [t for A, G in stats.values() for t in (A, G.movedim(1, 0))]


def _layout(names: list[str], tensors: list[Tensor], normaliser: float) -> Tensor:
    """What a rank gathers: ``[3 + K]`` float64.

    A checksum of the layer names and of the tensors' shapes (less the samples) and dtypes,
    ``K``, ``ν``, then the samples of each of the ``K`` tensors.
    """
    signature = repr([names] + [(tuple(t.shape[1:]), t.dtype) for t in tensors]).encode()
    head = [float(zlib.crc32(signature)), float(len(tensors)), float(normaliser)]
    return torch.tensor(head + [float(t.shape[0]) for t in tensors], dtype=torch.float64)


def gather_samples(
    stats: dict[str, tuple[Tensor, Tensor]], normaliser: float
) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """All ranks' ``Ã`` and ``G`` concatenated along the samples, and the global ``ν = Σ_r ν_r``.

    Ranks may hold different numbers of samples. Three collectives, whatever the number of
    layers: a checksum of each rank's shapes (less the samples) and dtypes, then its sample
    counts and ``ν``, then every tensor at once, each rank's flat buffer padded to the largest
    and trimmed after the gather (collectives need the same size on every rank).

    Raises:
        FisherlabError: on every rank, when the ranks' statistics differ in more than their
            samples (layers, positions per sample, features, dtypes).
    """
    world = dist.get_world_size()
    tensors = _samples_first(stats)
    device = tensors[0].device if tensors else torch.device("cpu")
    layout = _layout(list(stats), tensors, normaliser).to(device)
    heads = [torch.empty(3, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(heads, layout[:3].contiguous())
    if len({tuple(h[:2].tolist()) for h in heads}) > 1:
        raise FisherlabError(
            "the ranks recorded statistics of different layers, shapes or dtypes since the last "
            "step (not only different numbers of samples); the optimizer combines only batches "
            "of the same model and feature shapes"
        )
    layouts = [torch.empty_like(layout) for _ in range(world)]
    dist.all_gather(layouts, layout)
    counts = [t[3:].long().tolist() for t in layouts]  # per rank, samples of each tensor
    total = float(sum(t[2].item() for t in layouts))
    if not tensors:
        return {}, total
    widths = [math.prod(t.shape[1:]) for t in tensors]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    sizes = [sum(n * w for n, w in zip(c, widths)) for c in counts]
    padded = tensors[0].new_zeros(max(sizes), dtype=dtype)
    padded[: sizes[dist.get_rank()]] = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces: list[list[Tensor]] = [[] for _ in tensors]
    for part, count, size in zip(parts, counts, sizes):
        chunks = part[:size].split([n * w for n, w in zip(count, widths)])
        for k, (chunk, like) in enumerate(zip(chunks, tensors)):
            pieces[k].append(chunk.view(count[k], *like.shape[1:]).to(like.dtype))
    joined = [torch.cat(p, dim=0) for p in pieces]
    gathered = {
        name: (joined[2 * i], joined[2 * i + 1].movedim(0, 1)) for i, name in enumerate(stats)
    }
    return gathered, total


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
