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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.conventions import FisherlabError, check_fisher_type, check_int, check_max_bytes
from fisherlab.layers import Layer, find_layers
from fisherlab.losses import LossSpec


@dataclass(frozen=True)
class Batch:
    """One validated batch of a problem's data.

    Attributes:
        index: Position of the batch in the pass (0, 1, …).
        inputs: ``[N_b, ...]``, on the model's device.
        targets: ``[N_b, ...]``, on the model's device.
        normaliser: ``ν`` of this batch alone.
    """

    index: int
    inputs: Tensor
    targets: Tensor
    normaliser: float

    @property
    def size(self) -> int:
        """``N_b``, the samples in the batch."""
        return self.inputs.shape[0]


@dataclass(frozen=True)
class PassRecord:
    """What one complete pass over the data saw (to check that later passes see the same)."""

    sizes: tuple[int, ...]
    checksums: tuple[float, ...]


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
        seed: Seed of the Monte-Carlo labels: batch ``b`` draws with seed
            ``seed·1_000_003 + b`` under a forked RNG (the caller's RNG state is untouched), so
            every pass, every method and both exact backends see the same labels.
        skip_unsupported: Leave out unsupported parametrised modules with a warning.
        sharded: Whether each ``torch.distributed`` rank holds a different part of the data,
            so that sums over the data are all-reduced. ``None``: when ``data`` is a
            ``DataLoader`` with a ``DistributedSampler`` and a process group is initialised.
        progress: Show a progress bar over batches (``None``: on a terminal, for more than one
            batch).
        cache_bytes: Computations that pass over the data more than once (EKFAC, several
            methods, ``compare``) keep the captures of a pass in memory up to this size and
            replay them instead of running the model again; beyond it they capture again, so
            memory stays bounded whatever ``N``. ``0`` never keeps them.

    Attributes:
        loss: What fisherlab read from ``loss_fn`` (kind and reduction).
        layers: The supported layers, ``{module name: Layer}``.
        num_samples: ``N`` of the data (of all ranks when sharded), once a pass completed.
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
        cache_bytes: int = 2**28,
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
        self.num_samples: int | None = None
        self.normaliser: float | None = None
        self._cache: Any = None  # set by fisherlab.capture.cached_captures

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

    def _check_batch(self, index: int, item: Any) -> Batch:
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
        return Batch(index, inputs, targets, self.loss.batch_normaliser(targets))

    def batches(self, desc: str = "batches", quiet: bool = False) -> Iterator[Batch]:
        """One pass over the data: validated batches, with a progress bar for long work.

        The first batch of the first pass also probes the model (every supported layer runs
        exactly once; two forward passes agree, i.e. no random op is active). At the end of a
        complete pass, ``num_samples`` and ``normaliser`` hold ``N`` and ``ν`` of the whole data
        (of all ranks when ``sharded``); a later pass must see the same batch sizes (and, for
        ``"mc"``, the same batches, whose labels are drawn per batch).

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
        sizes, checksums, normalisers = [], [], []
        show = False if self.single_batch or quiet else self.progress
        bar = self._batches
        if show is not False:  # None: tqdm shows the bar on a terminal only
            bar = tqdm(bar, desc=desc, disable=None if show is None else False, leave=False)
        for index, item in enumerate(bar):
            batch = self._check_batch(index, item)
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
        record = PassRecord(tuple(sizes), tuple(checksums))
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
        first = self._record
        if record.sizes != first.sizes:
            raise FisherlabError(
                f"the data changed between passes: the first pass had {len(first.sizes)} batches "
                f"of {sum(first.sizes)} samples, this one {len(record.sizes)} batches of "
                f"{sum(record.sizes)}; use data that yields the same batches on every pass"
            )
        if self.fisher_type == "mc" and record.checksums != first.checksums:
            raise FisherlabError(
                "the data changed between passes (a shuffling DataLoader?): Monte-Carlo labels are "
                "drawn per batch, so every pass must see the same batches in the same order; use "
                "shuffle=False"
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
        self._probed = True

    # ------------------------------------------------------------------------- random
    def _forked_rng(self, seed: int):
        devices = [self.device] if self.device.type == "cuda" else []
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(seed)
        return stack

    def seeded(self, batch: Batch):
        """Context in which the Monte-Carlo labels of ``batch`` are drawn (a forked RNG)."""
        if self.fisher_type != "mc":
            return contextlib.nullcontext()
        return self._forked_rng(self.seed * 1_000_003 + batch.index)

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


def _checksum(batch: Batch) -> float:
    return float(batch.inputs.double().sum()) + float(batch.targets.double().sum())


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
