r"""Exact Fisher matrices: dense per-layer blocks and the full matrix, the ground truth.

Both come from the square-root rows ``J`` of each batch (one row per sample and output row, one
column per parameter, in units of the per-sample summed loss), accumulated batch by batch as
``Σ_b J_bᵀJ_b`` and divided by the data's ``ν`` at the end: memory is that of the result and of
one batch's rows, independent of ``N``. Two backends produce the rows:

* ``"backpack"``: BackPACK's ``BatchGrad`` (empirical; mc, of each sampled output row) or
  ``SqrtGGNExact`` (true), run on a deep copy of the model (the caller's model is never
  extended). Used for ``nn.Sequential`` models of known modules, or graphs BackPACK's
  converter turns into a chain of known modules, with a loss BackPACK takes (MSE on outputs
  ``[N, C]`` only).
* ``"torch.func"``: ``vmap`` over samples of ``vjp`` of the network output with the output
  rows of :mod:`fisherlab.losses`, for any graph.

``backend="auto"`` takes BackPACK where it can and says so in ``result.backend`` (and why not
in ``result.backend_reason``); it decides at the first batch. The ``"mc"`` rows are drawn the
same way on both paths (keyed by the problem's seed and each sample's global index), so they
give the same matrix.

Example:
    >>> import torch, fisherlab as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    >>> blocks = fl.exact_blocks(model, torch.nn.CrossEntropyLoss(), x, y, fisher_type="true")
    >>> blocks["0"].shape, blocks.backend
    (torch.Size([15, 15]), 'backpack')
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisherlab.capture import analysis_scope
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, check_memory
from fisherlab.linalg import gram_accumulate, mirror_upper
from fisherlab.problem import Batch, Problem, as_problem

BACKENDS = ("auto", "backpack", "torch.func")


class BlockDict(dict):
    """``{module_name: Tensor[P, P]}`` that also records how the blocks were computed.

    Attributes:
        fisher_type: The Fisher type.
        mc_samples: Labels drawn per input (``"mc"`` only).
        backend: ``"backpack"`` or ``"torch.func"``.
        backend_reason: Why ``"auto"`` did not take BackPACK (empty otherwise).
        normaliser: ``ν`` of the loss over the data.
        num_samples: ``N``, the samples of the data.
    """

    def __init__(
        self,
        blocks: dict[str, Tensor],
        *,
        fisher_type: str,
        mc_samples: int,
        backend: str,
        backend_reason: str,
        normaliser: float,
        num_samples: int,
    ):
        super().__init__(blocks)
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.backend = backend
        self.backend_reason = backend_reason
        self.normaliser = normaliser
        self.num_samples = num_samples


@dataclass(frozen=True)
class ExactFisher:
    """The full dense Fisher of a network's supported layers, in ``model.parameters()`` order.

    Attributes:
        matrix: ``Tensor[P, P]``.
        slices: Where each layer's block sits, ``{module_name: slice}`` (weight then bias).
        fisher_type: The Fisher type.
        mc_samples: Labels drawn per input (``"mc"`` only).
        backend: ``"backpack"`` or ``"torch.func"``.
        backend_reason: Why ``"auto"`` did not take BackPACK (empty otherwise).
        normaliser: ``ν`` of the loss over the data.
        num_samples: ``N``, the samples of the data.
    """

    matrix: Tensor = field(repr=False)
    slices: dict[str, slice]
    fisher_type: str
    mc_samples: int
    backend: str
    backend_reason: str
    normaliser: float
    num_samples: int

    def block(self, name: str) -> Tensor:
        """The diagonal block of one layer."""
        s = self.slices[name]
        return self.matrix[s, s]


# ---------------------------------------------------------------------------- rows: backpack
#: Leaf modules the BackPACK path accepts (tested against the torch.func path).
_BACKPACK_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.LeakyReLU,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Identity,
    nn.BatchNorm1d,  # eval mode (training mode is refused before: it couples the samples)
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


def _backpack_leaves() -> tuple[type[nn.Module], ...]:
    from backpack.custom_module.branching import SumModule
    from backpack.custom_module.permute import Permute
    from backpack.custom_module.scale_module import ScaleModule

    return (*_BACKPACK_LEAVES, SumModule, ScaleModule, Permute)


def _leaf_problem(name: str, module: nn.Module) -> str:
    """Why BackPACK cannot take this leaf module (empty if it can)."""
    if isinstance(module, nn.Embedding):
        # BackPACK 1.7's Embedding extensions fail in float64 and refuse padding_idx (tested)
        return f"module {name!r} (Embedding) is left to torch.func"
    if type(module) not in _backpack_leaves():
        return f"module {name!r} ({type(module).__name__}) is not supported"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    ):
        return f"module {name!r} ({type(module).__name__}) normalises with batch statistics"
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
        # BackPACK 1.7 returns wrong second-order blocks for string padding (tested)
        return f"module {name!r} uses padding={module.padding!r}"
    return ""


def _chain_problem(net: nn.Module) -> str:
    """Why BackPACK cannot take ``net`` as a chain of known modules (empty if it can)."""
    seen: dict[int, str] = {}
    if isinstance(net, torch.fx.GraphModule):
        for node in net.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_module":
                return f"graph node {node.name!r} ({node.op} {node.target}) is not a module"
            module = net.get_submodule(node.target)
            reason = _leaf_problem(node.target, module) or _reuse_problem(
                f"{node.target}@{node.name}", module, seen
            )
            if reason:
                return reason
        return ""
    for name, module in net.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Sequential):
            continue
        reason = _leaf_problem(name, module) or _reuse_problem(name, module, seen)
        if reason:
            return reason
    return ""


def _reuse_problem(name: str, module: nn.Module, seen: dict[int, str]) -> str:
    """Why BackPACK cannot take a module called a second time (it keeps one call's input)."""
    first = seen.setdefault(id(module), name)
    if first != name and any(True for _ in module.parameters(recurse=False)):
        first, again = first.split("@")[0], name.split("@")[0]
        where = "" if again == first else f" (again as {again!r})"
        return f"module {first!r} is used more than once{where}; BackPACK keeps one call per module"
    return ""


def _backpack_net(model: nn.Module) -> tuple[nn.Module | None, str]:
    """A BackPACK-extended deep copy of ``model``, or ``None`` and the reason."""
    from backpack import extend

    net = copy.deepcopy(model)
    if not isinstance(net, nn.Sequential):
        try:
            with warnings.catch_warnings():  # we vet the converted graph ourselves below
                warnings.simplefilter("ignore")
                net = extend(net, use_converter=True)
        except Exception as err:  # the converter's tracer refuses many graphs
            return None, f"BackPACK's converter rejected the model ({type(err).__name__}: {err})"
    reason = _chain_problem(net)
    if reason:
        return None, "BackPACK cannot take the model: " + reason
    return net, ""


def _loss_problem(problem: Problem, batch: Batch) -> str:
    """Why BackPACK cannot take the problem's loss on this batch (empty if it can)."""
    if problem.loss.kind == "mse" and batch.targets.ndim != 2:
        shape = ", ".join(["N", *map(str, batch.targets.shape[1:])])
        return (
            f"BackPACK cannot take the loss: its MSELoss supports outputs [N, C] only, and the "
            f"network outputs [{shape}]"
        )
    return ""


def _rows_backpack(problem: Problem, net: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Rows ``[M_b, numel]`` per parameter name (units of the summed loss), by BackPACK.

    ``net`` is the extended copy of the model (see :func:`_row_source`). For ``"mc"`` the rows
    are ``BatchGrad`` of each sampled output row ``s_r`` (the per-sample gradients of
    ``Σ_n s_{n,r}·f_n``, i.e. ``J_nᵀ s_{n,r}``), with the labels drawn as on the other paths:
    BackPACK's ``SqrtGGNMC`` draws the whole batch's labels from torch's RNG, which cannot key
    them per sample.
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SqrtGGNExact

    names = {id(p): n for n, p in net.named_parameters()}
    wanted = {
        _key(layer_name, p_name)
        for layer_name, layer in problem.layers.items()
        for p_name in layer.parameter_names()
    }
    extension, savefield = {
        "empirical": (BatchGrad(), "grad_batch"),
        "true": (SqrtGGNExact(), "sqrt_ggn_exact"),
        "mc": (BatchGrad(), "grad_batch"),
    }[problem.fisher_type]
    loss_fn = extend(copy.deepcopy(problem.loss_fn))
    params = [p for p in net.parameters() if names[id(p)] in wanted]

    def clear() -> None:  # BackPACK adds to quantities left from an earlier backward pass
        for p in net.parameters():
            p.requires_grad_(True)
            p.grad = None
            if hasattr(p, savefield):
                delattr(p, savefield)

    clear()
    parts: dict[str, list[Tensor]] = {names[id(p)]: [] for p in params}
    several = problem.fisher_type == "mc"  # one backward pass per output row: keep the IO
    with backpack(extension, retain_graph=several), torch.enable_grad(), warnings.catch_warnings():
        # BackPACK's full backward hooks warn when no input requires grad; that is intended
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        outputs = net(batch.inputs)
        problem.loss.check_outputs(outputs, batch.targets)
        if problem.fisher_type != "mc":
            loss_fn(outputs, batch.targets).backward()
            for p in params:
                value = getattr(p, savefield)
                if problem.fisher_type == "empirical":  # BatchGrad carries the reduction's 1/ν
                    value = value.flatten(start_dim=1) * batch.normaliser
                else:  # square roots carry 1/√ν
                    value = value.flatten(start_dim=2).flatten(end_dim=1)
                    value = value * math.sqrt(batch.normaliser)
                parts[names[id(p)]].append(value)
        else:
            with problem.seeded(batch):
                out_rows = problem.loss.output_rows(
                    outputs, batch.targets, problem.fisher_type, problem.mc_samples
                )  # [R, N, ...]
            for r in range(out_rows.shape[0]):
                (outputs * out_rows[r]).sum().backward(retain_graph=r < out_rows.shape[0] - 1)
                for p in params:
                    parts[names[id(p)]].append(getattr(p, savefield).flatten(start_dim=1))
                clear()
    return {name: torch.cat(values) for name, values in parts.items()}


# -------------------------------------------------------------------------- rows: torch.func
def _rows_torch_func(problem: Problem, batch: Batch) -> dict[str, Tensor]:
    """Rows ``[M_b, numel]`` per parameter name (units of the summed loss), by vmap of vjp."""
    from torch.func import functional_call, vjp, vmap

    model = problem.model
    wanted = {
        _key(layer_name, p_name): p.detach()
        for layer_name, layer in problem.layers.items()
        for p_name, p in zip(layer.parameter_names(), layer.parameters())
    }
    with torch.no_grad():
        outputs = model(batch.inputs)
    problem.loss.check_outputs(outputs, batch.targets)
    with problem.seeded(batch):
        out_rows = problem.loss.output_rows(
            outputs, batch.targets, problem.fisher_type, problem.mc_samples
        )  # [R, N, ...]

    def per_sample(x: Tensor, s: Tensor) -> dict[str, Tensor]:
        def f(params: dict[str, Tensor]) -> Tensor:
            return functional_call(model, params, (x.unsqueeze(0),), strict=False).squeeze(0)

        _, pullback = vjp(f, wanted)
        return vmap(pullback)(s)[0]

    with warnings.catch_warnings():  # e.g. attention: no batching rule, a loop (correct)
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        rows = vmap(per_sample, in_dims=(0, 1))(batch.inputs, out_rows)  # name -> [N, R, ...]
    return {name: r.flatten(start_dim=2).flatten(end_dim=1) for name, r in rows.items()}


# ------------------------------------------------------------------------------ public API
def _key(layer_name: str, param_name: str) -> str:
    return f"{layer_name}.{param_name}" if layer_name else param_name


class _RowSource:
    """A batch's rows per parameter name, by the backend chosen at the first batch.

    Attributes:
        backend: ``"backpack"`` or ``"torch.func"`` (``None`` before the first batch).
        reason: Why not BackPACK (empty when BackPACK is used).
    """

    def __init__(self, problem: Problem, requested: str):
        if requested not in BACKENDS:
            raise FisherlabError(f"unknown backend {requested!r}; valid backends are {BACKENDS}")
        self.problem = problem
        self.requested = requested
        self.backend: str | None = None
        self.reason = ""
        self._net: nn.Module | None = None
        self._n_handles: int | None = None

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        if self.backend is None:
            self._choose(batch)
        if self._net is not None:
            return _rows_backpack(self.problem, self._net, batch)
        return _rows_torch_func(self.problem, batch)

    def _choose(self, batch: Batch) -> None:
        """BackPACK where it can take the model and the loss (``"auto"``), else torch.func.

        Raises:
            FisherlabError: for ``"backpack"`` on a model or loss BackPACK cannot take.
        """
        if self.requested == "torch.func":
            self.backend, self.reason = "torch.func", "backend='torch.func' requested"
            return
        net, reason = None, _loss_problem(self.problem, batch)
        if not reason:
            net, reason = _backpack_net(self.problem.model)
        if net is None:
            if self.requested == "backpack":
                raise FisherlabError(reason + "; use backend='torch.func' or 'auto'")
            self.backend, self.reason = "torch.func", reason
            return
        from backpack import extend
        from backpack.context import CTX

        self._n_handles = len(CTX.hook_handles)
        self._net = extend(net)
        self.backend = "backpack"

    def close(self) -> None:
        """Remove BackPACK's hooks from the deep copy."""
        if self._n_handles is None:
            return
        from backpack.context import CTX

        for handle in CTX.hook_handles[self._n_handles :]:
            handle.remove()
        del CTX.hook_handles[self._n_handles :]
        self._n_handles, self._net = None, None


@contextlib.contextmanager
def _row_source(problem: Problem, backend: str) -> Iterator[_RowSource]:
    """The rows of each batch, by the backend chosen at the first batch (see :class:`_RowSource`).

    BackPACK's hooks live on a deep copy of the model for the duration of the block.
    """
    source = _RowSource(problem, backend)
    try:
        yield source
    finally:
        source.close()


def _layer_rows(problem: Problem, rows: dict[str, Tensor], name: str) -> Tensor:
    """One layer's rows ``[M, P]`` in parameter order (weight, then bias)."""
    layer = problem.layers[name]
    return torch.cat([rows[_key(name, p_name)] for p_name in layer.parameter_names()], dim=1)


def _itemsize(problem: Problem) -> int:
    for p in problem.model.parameters():
        return p.element_size() if p.is_floating_point() else 4
    return 4


def _check_rows_memory(problem: Problem, batch: Batch, held: int, max_bytes: int) -> None:
    """Refuse a batch whose rows ``[R·N_b, P]`` (and their copy in block order) exceed the budget.

    The peak of a batch is its rows of every parameter, their concatenation per block, and the
    blocks held (``held`` bytes).
    """
    rows = problem.rows_per_sample
    params = sum(layer.num_params for layer in problem.layers.values())
    per_sample = 2 * rows * params * _itemsize(problem)
    fits = (max_bytes - held) // per_sample
    hint = (
        f"split the data into batches of at most {fits} samples (the blocks are the same sums)"
        if fits >= 1
        else "use fisher_type='mc' or 'empirical' (fewer rows per sample), or an approximation "
        "(fl.curvature('kfac'/'ekfac'/'diag', ...))"
    )
    check_memory(
        f"the gradient rows of batch {batch.index} ({rows} per sample × {batch.size} samples × "
        f"{params} parameters, twice: as computed and in block order) beside the blocks",
        held + batch.size * per_sample,
        max_bytes,
        hint + ", or raise max_bytes= if the machine has the memory",
    )


def _stream(
    problem: Problem,
    backend: str,
    columns_of: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    held: int,
    max_bytes: int,
) -> tuple[dict[str, Tensor], str, str]:
    """``Σ_b JᵀJ`` of the row matrices ``columns_of(rows of batch b)``, over ranks, over ``ν``.

    Accumulated in place on the upper block triangle and mirrored once at the end. Each
    batch's rows are pre-flighted against ``max_bytes`` beside the ``held`` bytes of the sums.
    """
    sums: dict[str, Tensor] = {}
    desc = "exact Fisher" + ("" if backend == "auto" else f" ({backend})")
    with analysis_scope(), _row_source(problem, backend) as rows_of:
        for batch in problem.batches(desc):
            _check_rows_memory(problem, batch, held, max_bytes)
            for key, rows in columns_of(rows_of(batch)).items():
                if key not in sums:
                    sums[key] = rows.new_zeros(rows.shape[1], rows.shape[1])
                gram_accumulate(rows, sums[key])
    blocks = {
        key: problem.all_reduce(mirror_upper(total)).div_(problem.normaliser)
        for key, total in sums.items()
    }
    overflowed = [key for key, block in blocks.items() if not _finite(block)]
    if overflowed:
        dtype = blocks[overflowed[0]].dtype
        what = (
            "the full exact Fisher overflows"
            if overflowed == [""]
            else f"the exact blocks {overflowed} overflow"
        )
        raise FisherlabError(
            f"{what} {dtype} (NaN or Inf "
            "entries): the data's gradient rows are too large for it; rescale the data or "
            "compute in float64 (model.double() and double inputs)"
        )
    return blocks, rows_of.backend, rows_of.reason


def _finite(matrix: Tensor) -> bool:
    """Whether every entry is finite (no temporary of the matrix's size)."""
    low, high = torch.aminmax(matrix)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def exact_blocks(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    fisher_type: str | None = None,
    mc_samples: int | None = None,
    backend: str = "auto",
    skip_unsupported: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> BlockDict:
    """Dense exact per-layer Fisher blocks ``(1/ν) Σ j jᵀ`` in parameter order.

    Over a problem's data set the blocks are accumulated batch by batch: memory is that of the
    blocks and one batch's rows, independent of ``N``.

    Args:
        model: A :class:`~fisherlab.problem.Problem`, or the network (left unchanged)
            followed by ``loss_fn``, ``inputs``, ``targets`` for one batch.
        loss_fn: With a model: ``nn.CrossEntropyLoss`` or ``nn.MSELoss``.
        inputs: With a model: batch inputs ``[N, ...]``.
        targets: With a model: batch targets.
        fisher_type: With a model: ``"true"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: With a model: labels drawn per input for ``"mc"``.
        backend: ``"auto"`` (BackPACK where it can), ``"backpack"`` or ``"torch.func"``.
        skip_unsupported: With a model: leave out unsupported modules with a warning.
        max_bytes: Memory budget for the dense blocks (default 2 GiB).

    Returns:
        A :class:`BlockDict` ``{module_name: Tensor[P, P]}`` recording the Fisher type and
        the backend used.

    Raises:
        MemoryBudgetError: when the blocks would exceed ``max_bytes`` (the message gives the
            size).
    """
    problem = as_problem(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    sizes = {name: layer.num_params for name, layer in problem.layers.items()}
    held = sum(p * p for p in sizes.values()) * _itemsize(problem)
    check_memory(
        "the dense blocks " + ", ".join(f"{n!r} ({p}×{p})" for n, p in sizes.items()),
        held,
        max_bytes,
        "raise max_bytes= if the machine has the memory",
    )
    blocks, used, reason = _stream(
        problem,
        backend,
        lambda rows: {name: _layer_rows(problem, rows, name) for name in problem.layers},
        held,
        max_bytes,
    )
    return BlockDict(
        blocks,
        fisher_type=problem.fisher_type,
        mc_samples=problem.mc_samples,
        backend=used,
        backend_reason=reason,
        normaliser=problem.normaliser,
        num_samples=problem.num_samples,
    )


def exact_fisher(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    fisher_type: str | None = None,
    mc_samples: int | None = None,
    backend: str = "auto",
    skip_unsupported: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ExactFisher:
    """The full dense Fisher of all supported layers, in ``model.parameters()`` order.

    Arguments as for :func:`exact_blocks`. Parameters of skipped layers are left out.

    Raises:
        MemoryBudgetError: when the ``P×P`` matrix would exceed ``max_bytes`` (the message
            states ``P`` and the size).
    """
    problem = as_problem(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    owner = {}
    for name, layer in problem.layers.items():
        for p_name, p in zip(layer.parameter_names(), layer.parameters()):
            owner[id(p)] = (name, _key(name, p_name))
    params = [p for p in problem.model.parameters() if id(p) in owner]
    order = [owner[id(p)] for p in params]
    total = sum(p.numel() for p in params)
    held = total * total * _itemsize(problem)
    check_memory(
        f"the full Fisher ({total}×{total})",
        held,
        max_bytes,
        "raise max_bytes= if the machine has the memory, or use fl.exact_blocks(...) for the "
        "per-layer blocks",
    )
    starts, offset = {}, 0
    for (name, _), p in zip(order, params):
        starts.setdefault(name, offset)
        offset += p.numel()
    sums, used, reason = _stream(
        problem,
        backend,
        lambda rows: {"": torch.cat([rows[key] for _, key in order], dim=1)},
        held,
        max_bytes,
    )
    slices = {
        name: slice(start, start + problem.layers[name].num_params)
        for name, start in starts.items()
    }
    return ExactFisher(
        matrix=sums[""],
        slices=slices,
        fisher_type=problem.fisher_type,
        mc_samples=problem.mc_samples,
        backend=used,
        backend_reason=reason,
        normaliser=problem.normaliser,
        num_samples=problem.num_samples,
    )
