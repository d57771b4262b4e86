r"""A curvature problem: a model, a loss, data (one batch or a data set of batches), a Fisher type.

Every entry point of fisherlab (exact blocks, the approximations, the metrics, ``compare``,
``verify``, the command line) takes a :class:`Problem`. The model is validated once, when the
problem is built; each batch is validated as it streams. Over a data set the Fisher is

.. math::
    F = \frac1ν \sum_{\text{batches } b} J_b^\top J_b,

with ``ν`` the loss's normaliser over all ``N`` samples (``N`` for mean cross-entropy, ``N·C``
for mean MSE, ``1`` for ``reduction="sum"``): curvlinops' convention for a list of batches.

Example:
    >>> import torch, fisherlab as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> batches = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(3)]
    >>> problem = fl.Problem(model, torch.nn.CrossEntropyLoss(), batches, fisher_type="empirical")
    >>> blocks = fl.exact_blocks(problem)
    >>> problem.num_samples, blocks["0"].shape
    (15, torch.Size([15, 15]))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.conventions import (
    DEFAULT_CACHE_BYTES,
    FisherlabError,
    check_fisher_type,
    check_int,
    check_max_bytes,
)
from fisherlab.layers import Layer, find_layers
from fisherlab.losses import LossSpec, keyed_draws


@dataclass(frozen=True)
class Batch:
    """One validated batch of a problem's data.

    Attributes:
        index: Position of the batch in the pass (0, 1, …).
        inputs: ``[N_b, ...]``, on the model's device.
        targets: ``[N_b, ...]``, on the model's device.
        normaliser: ``ν`` of this batch alone.
        start: Position of its first sample in this rank's pass over the data.
    """

    index: int
    inputs: Tensor
    targets: Tensor
    normaliser: float
    start: int = 0

    @property
    def size(self) -> int:
        """``N_b``, the samples in the batch."""
        return self.inputs.shape[0]


@dataclass(frozen=True)
class PassRecord:
    """What one complete pass over the data saw (to check that later passes see the same).

    Attributes:
        sizes: ``N_b`` of every batch, in order.
        checksums: :func:`_checksum` of every batch, in order: ``[B, 2, K]`` (moment sums and
            the sums of their magnitudes, for the rounding tolerance).
    """

    sizes: tuple[int, ...]
    checksums: Tensor

    def same_batches(self, other: PassRecord) -> bool:
        """Whether ``other`` saw the same batches in the same order (up to rounding)."""
        return _close(self.checksums, other.checksums)

    def same_samples(self, other: PassRecord) -> bool:
        """Whether ``other`` saw the same samples, in any order or batching (up to rounding)."""
        return _close(self.checksums.sum(0, keepdim=True), other.checksums.sum(0, keepdim=True))


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], Tensor)
        and isinstance(item[1], Tensor)
    )


def _data_sharded(data: Any) -> bool:
    sampler = getattr(data, "sampler", None)
    return isinstance(sampler, torch.utils.data.DistributedSampler)


class Problem:
    """A model, a loss and data, validated once and accepted by every fisherlab entry point.

    Args:
        model: The network; its ``Linear``/``Conv2d`` layers get curvature blocks. It is never
            changed (hooks, parameters, ``requires_grad``, ``.grad`` and modes are restored).
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (``reduction`` ``"mean"``/``"sum"``).
        data: One ``(inputs, targets)`` pair, or any iterable of such pairs (a list, a
            ``DataLoader``); batches may differ in size, not in feature shape. Methods that need
            two passes (EKFAC) need data that can be iterated twice (not a generator).
        fisher_type: ``"true"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels drawn per input for ``"mc"``.
        seed: Seed of the Monte-Carlo labels. The labels of a sample depend on ``(seed, its
            global index)`` alone (:func:`~fisherlab.losses.keyed_draws`; the caller's RNG state
            is untouched), so every pass, every method and both exact backends see the same
            labels, and sharded data gives the Monte-Carlo Fisher of one process over all the
            data (:meth:`sample_indices` says which index a sample has).
        skip_unsupported: Leave out unsupported parametrised modules with a warning.
        sharded: Whether each ``torch.distributed`` rank holds a different part of the data,
            so that sums over the data are all-reduced. ``None``: when ``data`` is a
            ``DataLoader`` with a ``DistributedSampler`` and a process group is initialised.
        progress: Show a progress bar over batches (``None``: on a terminal, for more than one
            batch).
        cache_bytes: Computations that pass over the data more than once (EKFAC, several
            methods, ``compare``) keep the captures of a pass in memory up to this size and
            replay them instead of running the model again; beyond it they capture again, so
            memory stays bounded whatever ``N``. ``0`` never keeps them. Default
            :data:`~fisherlab.conventions.DEFAULT_CACHE_BYTES` (256 MiB).

    Attributes:
        loss: What fisherlab read from ``loss_fn`` (kind and reduction).
        layers: The supported layers, ``{module name: Layer}``.
        num_samples: ``N`` of the data (of all ranks when sharded), once a pass completed.
        output_shape: The network output's shape per sample, once a batch was probed.
        normaliser: ``ν`` of the data, once a pass completed.

    Raises:
        FisherlabError: on an invalid Fisher type, loss, model (unsupported or tied layers,
            BatchNorm or Dropout in training mode) or data that is not a pair or an iterable.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Any,
        fisher_type: str = "true",
        mc_samples: int = 1,
        seed: int = 0,
        skip_unsupported: bool = False,
        sharded: bool | None = None,
        progress: bool | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if not isinstance(model, nn.Module):
            raise FisherlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.mc_samples = check_fisher_type(fisher_type, mc_samples)
        self.fisher_type = fisher_type
        self.seed = check_int("seed", seed)
        self.loss = LossSpec.from_module(loss_fn)
        self.layers: dict[str, Layer] = find_layers(model, skip_unsupported=skip_unsupported)
        self.skip_unsupported = skip_unsupported
        if _is_pair(data):
            self._batches: Iterable = [tuple(data)]
            self.single_batch = True
        elif isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise FisherlabError(
                "data must be an (inputs, targets) pair of tensors or an iterable of such "
                f"pairs (a list, a DataLoader), got {type(data).__name__}"
            )
        else:
            self._batches = data
            self.single_batch = False
        self.reiterable = not isinstance(self._batches, Iterator)  # generators serve once
        if sharded is None:
            sharded = _data_sharded(data) and dist.is_available() and dist.is_initialized()
        self.sharded = bool(sharded)
        self.progress = progress
        self.cache_bytes = check_max_bytes(cache_bytes) if cache_bytes else 0
        self._record: PassRecord | None = None
        self._passes_started = 0
        self._feature_shapes: tuple | None = None
        self._probed = False
        self._calls_checked = False  # set by fisherlab.capture.capture_batch
        self.output_shape: tuple[int, ...] | None = None
        self.num_samples: int | None = None
        self.normaliser: float | None = None
        self._cache: Any = None  # set by fisherlab.capture.cached_captures
        self._rank_offset: tuple[int, int] | None = None  # (offset, stride) of sample indices
        self._sampler_indices: Tensor | None = None  # of this pass (DistributedSampler)

    # ----------------------------------------------------------------------- variants
    def with_fisher_type(self, fisher_type: str, mc_samples: int | None = None) -> Problem:
        """The same model, loss and data with another Fisher type (validation is reused)."""
        clone = object.__new__(Problem)
        clone.__dict__.update(self.__dict__)
        clone.mc_samples = check_fisher_type(
            fisher_type, self.mc_samples if mc_samples is None else mc_samples
        )
        clone.fisher_type = fisher_type
        clone._cache = None
        return clone

    # ---------------------------------------------------------------------- iteration
    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (batches are moved there)."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _check_batch(self, index: int, item: Any, start: int = 0) -> Batch:
        if not _is_pair(item):
            raise FisherlabError(
                f"batch {index} of the data is not an (inputs, targets) pair of tensors "
                f"(got {type(item).__name__})"
            )
        inputs, targets = item
        try:
            self.loss.check_batch(inputs, targets)
        except FisherlabError as err:
            raise FisherlabError(f"batch {index}: {err}") from None
        shapes = (tuple(inputs.shape[1:]), tuple(targets.shape[1:]), inputs.dtype, targets.dtype)
        if self._feature_shapes is None:
            self._feature_shapes = shapes
        elif shapes != self._feature_shapes:
            first = self._feature_shapes
            raise FisherlabError(
                f"batch {index} has inputs of shape [N, {', '.join(map(str, shapes[0]))}] "
                f"({shapes[2]}) and targets [N, {', '.join(map(str, shapes[1]))}] ({shapes[3]}), "
                f"but the first batch had inputs [N, {', '.join(map(str, first[0]))}] "
                f"({first[2]}) and targets [N, {', '.join(map(str, first[1]))}] ({first[3]}); "
                "all batches must share their feature shapes and dtypes"
            )
        device = self.device
        inputs, targets = inputs.to(device), targets.to(device)
        return Batch(index, inputs, targets, self.loss.batch_normaliser(targets), start)

    def batches(self, desc: str = "batches", quiet: bool = False) -> Iterator[Batch]:
        """One pass over the data: validated batches, with a progress bar for long work.

        The first batch of the first pass also probes the model (every supported layer runs
        exactly once; two forward passes agree, i.e. no random op is active). At the end of a
        complete pass, ``num_samples`` and ``normaliser`` hold ``N`` and ``ν`` of the whole data
        (of all ranks when ``sharded``); a later pass must see the same batch sizes and the
        same samples (checked by order-independent checksums: a reshuffling ``DataLoader``
        passes, one with ``drop_last=True`` or random augmentation does not) and, for ``"mc"``,
        the same batches in the same order (labels are drawn per batch).

        Raises:
            FisherlabError: for an empty iterable, a consumed iterator, a bad batch, or data
                that changed between passes.
        """
        if self._passes_started and not self.reiterable:
            raise FisherlabError(
                "the data is an iterator (e.g. a generator) that the first pass over it "
                "consumed; this computation needs another pass: pass a list of batches or a "
                "DataLoader"
            )
        self._passes_started += 1
        if self.fisher_type == "mc":
            self._start_keyed_pass()
        sizes, checksums, normalisers = [], [], []  # checksums: one [2, K] tensor per batch
        show = False if self.single_batch or quiet else self.progress
        # one iterator per pass: tqdm.auto would call iter() on an iterable once more (a
        # DataLoader then starts its workers and draws its shuffling order twice)
        bar = iter(self._batches)
        if show is not False:  # None: tqdm shows the bar on a terminal only
            try:
                total = len(self._batches)
            except TypeError:  # no length (a generator, an IterableDataset's loader)
                total = None
            bar = tqdm(
                bar, desc=desc, total=total, disable=None if show is None else False, leave=False
            )
        for index, item in enumerate(bar):
            batch = self._check_batch(index, item, sum(sizes))
            if not self._probed:
                self._probe(batch)
            sizes.append(batch.size)
            checksums.append(_checksum(batch))
            normalisers.append(batch.normaliser)
            yield batch
        if not sizes:
            raise FisherlabError(
                "the data yielded no batch"
                + (" on this pass (an exhausted iterator?)" if self._record else "")
            )
        record = PassRecord(tuple(sizes), torch.stack(checksums).cpu())
        if self._record is None:
            self._record = record
            count = self.all_reduce(torch.tensor([float(sum(sizes))], dtype=torch.float64))
            self.num_samples = int(count.item())
            local = torch.tensor([sum(normalisers)], dtype=torch.float64)
            total = self.all_reduce(local).item() if self.loss.reduction == "mean" else 1.0
            self.normaliser = self.loss.total_normaliser([total])
        else:
            self._check_same_data(record)

    def _check_same_data(self, record: PassRecord) -> None:
        """Refuse a pass that saw other data than the first pass (every Fisher type).

        Every Fisher type needs the same samples on every pass (the passes of EKFAC, of several
        methods, of ``compare``, or of two calls on one problem are summed or compared as one
        data set); ``"mc"`` needs the same batches in the same order too (its labels are drawn
        per batch).
        """
        first = self._record
        remedy = (
            "use data that yields the same samples on every pass (a fixed order: shuffle=False; "
            "no random augmentation); within one call of EKFAC or of several methods, a "
            "Problem(cache_bytes=...) that holds a pass's captures also works (later passes "
            "replay the first from memory)"
        )
        if record.sizes != first.sizes:
            raise FisherlabError(
                f"the data changed between passes: the first pass had {len(first.sizes)} batches "
                f"of {sum(first.sizes)} samples, this one {len(record.sizes)} batches of "
                f"{sum(record.sizes)}; {remedy}"
            )
        if self.fisher_type == "mc" and not first.same_batches(record):
            raise FisherlabError(
                "the data changed between passes (a shuffling DataLoader?): Monte-Carlo labels are "
                "drawn per batch, so every pass must see the same batches in the same order; "
                + remedy
            )
        if not first.same_samples(record):
            raise FisherlabError(
                "the data changed between passes: this pass saw other samples than the first (a "
                "DataLoader with shuffle=True and drop_last=True, or random augmentation?), so "
                "the passes' statistics belong to different data sets; " + remedy
            )

    def _probe(self, batch: Batch) -> None:
        """Check once that every layer runs and that the forward is deterministic.

        A layer recorded through another module's forward (``nn.MultiheadAttention``'s
        projections) counts that module's calls. A module called several times is one layer
        used several times (its calls are more positions of the same samples).
        """
        calls = dict.fromkeys(self.layers, 0)

        def counter(name: str):
            def hook(*_: Any) -> None:
                calls[name] += 1

            return hook

        def recorded_by(layer: Layer) -> nn.Module:
            recording = layer.adapter.recording_module(layer.module)
            return layer.module if recording is None else recording[0]

        handles = [
            recorded_by(layer).register_forward_hook(counter(name))
            for name, layer in self.layers.items()
        ]
        try:
            with torch.no_grad(), self._forked_rng(1):
                first = self.model(batch.inputs)
        except Exception as err:
            self._refuse_input_dtype(batch, err)
            raise
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad(), self._forked_rng(2):
            second = self.model(batch.inputs)
        if not isinstance(first, Tensor):
            raise FisherlabError(
                f"the model returns {type(first).__name__}; fisherlab needs a tensor of network "
                "outputs [N, ...]"
            )
        missing = [name for name, n in calls.items() if n == 0]
        if missing:
            raise FisherlabError(f"layers {missing} were not called in the forward pass")
        if not torch.allclose(first, second, rtol=1e-6, atol=1e-12, equal_nan=True):
            raise FisherlabError(
                "two forward passes on the same batch gave different outputs: a random op (e.g. "
                "functional dropout) is active; the curvature would be that of one random draw. "
                "Call model.eval() or remove the randomness"
            )
        self.loss.check_outputs(first, batch.targets)
        self.output_shape = tuple(first.shape[1:])
        self._probed = True

    def _refuse_input_dtype(self, batch: Batch, err: Exception) -> None:
        """A clear error when the forward failed on inputs of another dtype than the model's.

        Integer inputs are valid for models that embed them (a skipped ``nn.Embedding``), so
        they are refused only once the model has failed on them.
        """
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        if len(dtypes) != 1 or batch.inputs.dtype in dtypes:
            return
        (dtype,) = dtypes
        raise FisherlabError(
            f"the inputs have dtype {batch.inputs.dtype} but the model's parameters are {dtype}, "
            f"and the forward pass failed on them ({type(err).__name__}: {err}); convert the "
            f"inputs, e.g. inputs.to({dtype})"
        ) from err

    # ------------------------------------------------------------------------- random
    def _forked_rng(self, seed: int):
        devices = [self.device] if self.device.type == "cuda" else []
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(seed)
        return stack

    def seeded(self, batch: Batch):
        """Context in which the Monte-Carlo labels of ``batch`` are drawn (keyed per sample)."""
        if self.fisher_type != "mc":
            return contextlib.nullcontext()
        return keyed_draws(self.seed, self.sample_indices(batch))

    def sample_indices(self, batch: Batch) -> Tensor:
        """``[N_b]`` global indices of a batch's samples: the keys of their Monte-Carlo labels.

        * Data from a ``DataLoader`` whose sampler is a ``DistributedSampler``: the indices
          into the dataset that the sampler gives this rank (any number of ranks, shuffled or
          not, gives the labels of one process over the dataset).
        * Otherwise: the sample's position in the pass, continued over the ranks in rank order
          when the data is sharded (rank ``r`` starts after the samples of ranks ``< r``, each
          rank's count from a list of batches or the sampler's length): shards that split the
          data into consecutive parts give the labels of one process over all of it.
        * Sharded data whose size a rank cannot tell before the pass (e.g. a generator):
          position ``p`` of rank ``r`` of ``W`` has index ``p·W + r`` (distinct on every rank).
        """
        if self._sampler_indices is None and self._rank_offset is None:
            self._start_keyed_pass()
        stop = batch.start + batch.size
        if self._sampler_indices is not None:
            if stop > self._sampler_indices.shape[0]:
                raise FisherlabError(
                    f"the data yielded more samples ({stop}) than its DistributedSampler "
                    f"holds ({self._sampler_indices.shape[0]})"
                )
            return self._sampler_indices[batch.start : stop]
        offset, stride = self._rank_offset
        return offset + stride * torch.arange(batch.start, stop)

    def _start_keyed_pass(self) -> None:
        """Where this rank's samples sit in the data (:meth:`sample_indices`), at a pass start.

        Sharded: one small collective on the first pass (every rank starts its passes
        together, as the sums at the end of a pass already require).
        """
        sampler = getattr(self._batches, "sampler", None)
        by_sampler = isinstance(sampler, torch.utils.data.DistributedSampler)
        if self._rank_offset is None:
            self._rank_offset = (0, 1)
            hint = self.num_samples_hint
            if self.sharded and dist.is_initialized() and dist.get_world_size() > 1:
                mine = torch.tensor([[int(by_sampler), -1 if hint is None else hint]])
                ranks = self.all_gather(mine.to(self.device)).cpu()
                if len(set(ranks[:, 0].tolist())) > 1:
                    raise FisherlabError(
                        "some ranks read their data through a DistributedSampler and others do "
                        "not; the Monte-Carlo labels need one layout of the data over the ranks"
                    )
                rank, world = dist.get_rank(), dist.get_world_size()
                counts = ranks[:, 1]
                if bool((counts < 0).any()):
                    self._rank_offset = (rank, world)
                else:
                    self._rank_offset = (int(counts[:rank].sum()), 1)
        self._sampler_indices = (
            torch.tensor(list(sampler), dtype=torch.long) if by_sampler else None
        )

    # -------------------------------------------------------------------- distribution
    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all ranks when the data is sharded (else itself)."""
        if not self.sharded or not dist.is_initialized() or dist.get_world_size() == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """``tensor`` of every rank concatenated along ``dim`` when the data is sharded.

        Ranks may hold different sizes along ``dim`` (they are padded for the collective).
        """
        if not self.sharded or not dist.is_initialized() or dist.get_world_size() == 1:
            return tensor
        world = dist.get_world_size()
        size = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        largest = int(max(s.item() for s in sizes))
        pad = list(tensor.shape)
        pad[dim] = largest - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat(
            [part.narrow(dim, 0, int(s.item())) for part, s in zip(parts, sizes)], dim=dim
        )

    @property
    def rows_per_sample(self) -> int:
        """``R``, the gradient rows per sample of the Fisher type (once a batch was probed)."""
        if self.fisher_type == "true":
            if self.output_shape is None:
                raise FisherlabError("rows_per_sample is known once a batch was probed")
            return math.prod(self.output_shape)
        return self.mc_samples if self.fisher_type == "mc" else 1

    @property
    def num_samples_hint(self) -> int | None:
        """``N`` (of this rank) before a pass, where the data tells it cheaply, else ``None``."""
        if self.num_samples is not None and not self.sharded:
            return self.num_samples
        if isinstance(self._batches, list | tuple) and all(_is_pair(b) for b in self._batches):
            return sum(b[0].shape[0] for b in self._batches)
        sampler = getattr(self._batches, "sampler", None)
        try:
            return len(sampler) if sampler is not None else None
        except TypeError:
            return None

    def __repr__(self) -> str:
        data = "one batch" if self.single_batch else type(self._batches).__name__
        return (
            f"Problem(model={type(self.model).__name__}, loss={self.loss.kind}/"
            f"{self.loss.reduction}, data={data}, fisher_type={self.fisher_type!r}, "
            f"layers={list(self.layers)})"
        )


#: Relative tolerance of checksums: float64 sums of the same numbers in another order agree to
#: ~N·1e-16 of their magnitude; any changed sample moves them far more.
_CHECKSUM_RTOL = 1e-9


def _projection(size: int, device: torch.device, phase: float) -> Tensor:
    """A fixed quasi-random vector ``[size]`` in ``[-1, 1]`` (no random number generator)."""
    index = torch.arange(size, dtype=torch.float64, device=device)
    return torch.cos(index * 0.7548776662466927 + phase)


def _checksum(batch: Batch) -> Tensor:
    r"""Moment sums of a batch's samples, ``[2, 5]`` float64: cheap and order-independent.

    Each sample ``n`` is reduced to two keys ``k = x_n·u + y_n·v`` (fixed projections of its
    inputs and targets); the batch's checksum is ``Σ_n (k_1, k_2, k_1², k_2², k_1 k_2)`` and,
    for the rounding tolerance, ``Σ_n |…|``. Sums over batches are those of the samples, in
    any order or batching; a sample changed, added or left out moves them.
    """
    x = batch.inputs.reshape(batch.size, -1).double()
    y = batch.targets.reshape(batch.size, -1).double()
    keys = [
        x @ _projection(x.shape[1], x.device, phase) + y @ _projection(y.shape[1], y.device, phase)
        for phase in (0.3, 1.9)
    ]
    k1, k2 = keys
    moments = torch.stack([k1, k2, k1 * k1, k2 * k2, k1 * k2])  # [5, N_b]
    return torch.stack([moments.sum(1), moments.abs().sum(1)])


def _close(a: Tensor, b: Tensor) -> bool:
    """Whether checksums ``[..., 2, K]`` agree up to the rounding of their sums."""
    scale = a[..., 1, :] + b[..., 1, :]
    return bool(((a[..., 0, :] - b[..., 0, :]).abs() <= _CHECKSUM_RTOL * scale).all())


def as_problem(
    problem_or_model: Problem | nn.Module,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    fisher_type: str | None = None,
    mc_samples: int | None = None,
    skip_unsupported: bool | None = None,
) -> Problem:
    """A :class:`Problem`, or one built from the classic ``(model, loss_fn, inputs, targets)``.

    The one-batch shorthand of every entry point. With a Problem, the other arguments must be
    left out (they are the Problem's own).
    """
    kwargs = {
        "fisher_type": fisher_type,
        "mc_samples": mc_samples,
        "skip_unsupported": skip_unsupported,
    }
    if isinstance(problem_or_model, Problem):
        given = [k for k, v in kwargs.items() if v is not None]
        if loss_fn is not None or inputs is not None or targets is not None or given:
            raise FisherlabError(
                "pass either a Problem, or model, loss_fn, inputs and targets (with fisher_type "
                "etc.), not both; the Problem already holds "
                + ", ".join(["loss_fn, inputs, targets", *given])
            )
        return problem_or_model
    if loss_fn is None or inputs is None or targets is None:
        raise FisherlabError(
            "pass a Problem, or a model with loss_fn, inputs and targets; got "
            f"{type(problem_or_model).__name__} without the rest"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return Problem(problem_or_model, loss_fn, (inputs, targets), **kwargs)
