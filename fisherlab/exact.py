r"""Exact Fisher matrices: dense per-layer blocks and the full matrix, the ground truth.

Both come from the square-root rows ``J`` of each batch (one row per sample and output row, one
column per parameter, in units of the per-sample summed loss), accumulated batch by batch as
``Σ_b J_bᵀJ_b`` and divided by the data's ``ν`` at the end: memory is that of the result and of
one batch's rows, independent of ``N``. Two backends produce the rows:

* ``"backpack"``: BackPACK's ``BatchGrad`` (empirical), ``SqrtGGNExact`` (true) or
  ``SqrtGGNMC`` (mc), run on a deep copy of the model (the caller's model is never extended).
  Used for ``nn.Sequential`` models of known modules, or graphs BackPACK's converter turns
  into a chain of known modules.
* ``"torch.func"``: ``vmap`` over samples of ``vjp`` of the network output with the output
  rows of :mod:`fisherlab.losses`, for any graph.

``backend="auto"`` takes BackPACK where it can and says so in ``result.backend``. The ``"mc"``
rows are drawn the same way on both paths (with the problem's per-batch seed), so they give the
same matrix.

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


def _rows_backpack(problem: Problem, net: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Rows ``[M_b, numel]`` per parameter name (units of the summed loss), by BackPACK.

    ``net`` is the extended copy of the model (see :func:`_row_source`).
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SqrtGGNExact, SqrtGGNMC

    names = {id(p): n for n, p in net.named_parameters()}
    wanted = {
        _key(layer_name, p_name)
        for layer_name, layer in problem.layers.items()
        for p_name in layer.parameter_names()
    }
    extension, savefield = {
        "empirical": (BatchGrad(), "grad_batch"),
        "true": (SqrtGGNExact(), "sqrt_ggn_exact"),
        "mc": (SqrtGGNMC(mc_samples=problem.mc_samples), "sqrt_ggn_mc"),
    }[problem.fisher_type]
    loss_fn = extend(copy.deepcopy(problem.loss_fn))
    for p in net.parameters():  # BackPACK adds to quantities left from an earlier batch
        p.requires_grad_(True)
        p.grad = None
        if hasattr(p, savefield):
            delattr(p, savefield)
    with backpack(extension), torch.enable_grad(), warnings.catch_warnings():
        # BackPACK's full backward hooks warn when no input requires grad; that is intended
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        outputs = net(batch.inputs)
        problem.loss.check_outputs(outputs, batch.targets)
        with problem.seeded(batch):
            loss_fn(outputs, batch.targets).backward()
    rows = {}
    for p in net.parameters():
        name = names[id(p)]
        if name not in wanted:
            continue
        value = getattr(p, savefield)
        if problem.fisher_type == "empirical":  # BatchGrad carries the reduction's 1/ν
            rows[name] = value.flatten(start_dim=1) * batch.normaliser
        else:  # square roots carry 1/√ν
            rows[name] = value.flatten(start_dim=2).flatten(end_dim=1) * math.sqrt(batch.normaliser)
    return rows


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


@contextlib.contextmanager
def _row_source(
    problem: Problem, backend: str
) -> Iterator[tuple[Callable[[Batch], dict[str, Tensor]], str, str]]:
    """A function giving a batch's rows per parameter name, the backend used, why not BackPACK.

    BackPACK's hooks live on a deep copy of the model for the duration of the block.
    """
    if backend not in BACKENDS:
        raise FisherlabError(f"unknown backend {backend!r}; valid backends are {BACKENDS}")
    if backend in ("auto", "backpack"):
        net, reason = _backpack_net(problem.model)
        if net is not None:
            from backpack import extend
            from backpack.context import CTX

            n_handles = len(CTX.hook_handles)
            try:
                net = extend(net)
                yield (lambda batch: _rows_backpack(problem, net, batch)), "backpack", ""
            finally:
                for handle in CTX.hook_handles[n_handles:]:
                    handle.remove()
                del CTX.hook_handles[n_handles:]
            return
        if backend == "backpack":
            raise FisherlabError(reason + "; use backend='torch.func' or 'auto'")
    else:
        reason = "backend='torch.func' requested"
    yield (lambda batch: _rows_torch_func(problem, batch)), "torch.func", reason


def _layer_rows(problem: Problem, rows: dict[str, Tensor], name: str) -> Tensor:
    """One layer's rows ``[M, P]`` in parameter order (weight, then bias)."""
    layer = problem.layers[name]
    return torch.cat([rows[_key(name, p_name)] for p_name in layer.parameter_names()], dim=1)


def _itemsize(problem: Problem) -> int:
    for p in problem.model.parameters():
        return p.element_size() if p.is_floating_point() else 4
    return 4


def _stream(
    problem: Problem, backend: str, columns_of: Callable[[dict[str, Tensor]], dict[str, Tensor]]
) -> tuple[dict[str, Tensor], str, str]:
    """``Σ_b JᵀJ`` of the row matrices ``columns_of(rows of batch b)``, over ranks, over ``ν``.

    Accumulated in place on the upper block triangle and mirrored once at the end.
    """
    sums: dict[str, Tensor] = {}
    with analysis_scope(), _row_source(problem, backend) as (rows_of, used, reason):
        for batch in problem.batches(f"exact Fisher ({used})"):
            for key, rows in columns_of(rows_of(batch)).items():
                if key not in sums:
                    sums[key] = rows.new_zeros(rows.shape[1], rows.shape[1])
                gram_accumulate(rows, sums[key])
    blocks = {
        key: problem.all_reduce(mirror_upper(total)).div_(problem.normaliser)
        for key, total in sums.items()
    }
    return blocks, used, reason


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
    check_memory(
        "the dense blocks " + ", ".join(f"{n!r} ({p}×{p})" for n, p in sizes.items()),
        sum(p * p for p in sizes.values()) * _itemsize(problem),
        max_bytes,
        "raise max_bytes= if the machine has the memory",
    )
    blocks, used, reason = _stream(
        problem,
        backend,
        lambda rows: {name: _layer_rows(problem, rows, name) for name in problem.layers},
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
    check_memory(
        f"the full Fisher ({total}×{total})",
        total * total * _itemsize(problem),
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
