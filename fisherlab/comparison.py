"""``fl.compare``: every approximation against the exact Fisher of a data set, per layer.

All blocks are built from the problem's data (one batch, or a data set streamed in batches) and
compared with the exact Fisher of the same data:

* **Frobenius error** at scale (:func:`fisherlab.metrics.frobenius_at_scale`): ``‖F‖²`` from the
  exact reference and ``⟨F, F̂⟩`` from one pass over the captured rows;
* **spectrum distance** of the sorted eigenvalues;
* **direction quality** of ``(F̂ + λI)⁻¹g`` against ``(F + λI)⁻¹g`` for the loss gradient ``g``
  of the data (the empirical rows summed, ``g = Jᵀ1/ν``).

The exact reference of each layer is the cheaper exact representation that fits the budget:
the dense ``exact`` block (``P×P``, eigen-decomposition ``O(P³)``) or the ``woodbury`` block
(``M×M`` Gram, ``M = R·N`` rows, ``O(M³)``); ``reference`` in each row says which. Methods whose
memory over the data would exceed ``max_bytes`` are reported with the reason instead of numbers.
Captures of a pass are kept in memory when they fit, so that each method is built (and timed) on
its own without running the model again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.blocks import curvatures, parse_method
from fisherlab.blocks.base import CurvatureBlock
from fisherlab.capture import Capture, cached_captures, captures
from fisherlab.conventions import DEFAULT_MAX_BYTES, MemoryBudgetError, check_damping
from fisherlab.metrics import direction_agreement, spectrum_distance
from fisherlab.problem import Problem, as_problem

DEFAULT_METHODS = ("kfac", "ekfac", "woodbury", "woodbury:conv_gram=reduce_sum", "skfac", "diag")


def batch_gradients(cap: Capture) -> dict[str, Tensor]:
    """The mini-batch loss gradient per layer (parameter order) from an empirical capture."""
    return {name: lc.jacobian_rows().sum(dim=(0, 1)) / cap.normaliser for name, lc in cap.items()}


def data_gradients(problem: Problem) -> dict[str, Tensor]:
    """The loss gradient of the problem's data per layer (parameter order), ``g = Jᵀ1/ν``.

    Computed from the empirical rows of every batch (a pass of its own unless the problem's
    Fisher type is empirical).
    """
    source = (
        problem if problem.fisher_type == "empirical" else problem.with_fisher_type("empirical")
    )
    sums: dict[str, Tensor] = {}
    with cached_captures(source):
        for cap in captures(source, "gradient"):
            for name, lc in cap.items():
                part = lc.jacobian_rows().sum(dim=(0, 1))
                sums[name] = part if name not in sums else sums[name] + part
    return {name: source.all_reduce(g) / source.normaliser for name, g in sums.items()}


def _reference_method(size: int, rows: int, itemsize: int, max_bytes: int) -> str | None:
    """``"exact"`` or ``"woodbury"``: the cheaper exact representation that fits the budget."""
    dense_fits = 3 * size * size * itemsize <= max_bytes
    gram_fits = 2 * rows * rows * itemsize <= max_bytes
    if dense_fits and (size <= rows or not gram_fits):
        return "exact"
    return "woodbury" if gram_fits else None


def _build(
    problem: Problem, spec: str, names: list[str], max_bytes: int
) -> tuple[dict[str, CurvatureBlock | str], float]:
    """Blocks of one method per layer (or the reason it was refused), and the build time."""
    start = time.perf_counter()
    try:
        built = curvatures(problem, [spec], names, max_bytes, missing="skip")[spec]
        blocks: dict[str, CurvatureBlock | str] = dict(built)
        blocks.update(built.missing)  # layers the method has no block for: the reason
    except MemoryBudgetError:
        blocks = {}
        for name in names:  # which layers fit
            try:
                built = curvatures(problem, [spec], [name], max_bytes, missing="skip")[spec]
                blocks[name] = built[name] if name in built else built.missing[name]
            except MemoryBudgetError as err:
                blocks[name] = str(err)
    return blocks, time.perf_counter() - start


def compare(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    fisher_type: str | None = None,
    damping: float = 1e-3,
    mc_samples: int | None = None,
    skip_unsupported: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """A row per layer × method: errors against the exact Fisher of the data, timings, memory.

    Args:
        model: A :class:`~fisherlab.problem.Problem` (one batch or a data set), or a model
            followed by ``loss_fn``, ``inputs``, ``targets`` (and ``fisher_type``, …).
        loss_fn: With a model: ``nn.CrossEntropyLoss`` or ``nn.MSELoss``.
        inputs: With a model: batch inputs.
        targets: With a model: batch targets.
        methods: Method specs, ``"name"`` or ``"name:option=value,…"``.
        fisher_type: With a model: Fisher type of every block and of the reference.
        damping: ``λ`` of the damped solves.
        mc_samples: With a model: labels drawn per input for ``"mc"``.
        skip_unsupported: With a model: leave out unsupported modules with a warning.
        max_bytes: Memory budget of each block.
        progress: Show a progress bar over methods.

    Returns:
        Rows with columns ``layer, method, P, reference, rel_frobenius, spectrum_distance,
        direction_cosine, direction_rel_error, build_s, solve_s, memory_mb, note`` (numbers are
        NaN and ``note`` says why for a refused method). ``build_s`` is the method's build over
        the data for all layers (the same in each of its rows), ``solve_s`` the layer's first
        damped solve.
    """
    damping = check_damping(damping)
    for spec in methods:
        parse_method(spec)
    problem = as_problem(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    names = list(problem.layers)
    rows: list[dict[str, Any]] = []
    with cached_captures(problem):
        first = None
        for cap in captures(problem, "capture"):  # fills N, ν and the cache
            first = first or cap
        grads = data_gradients(problem)
        references = {
            name: _reference(problem, name, first, grads[name], damping, max_bytes)
            for name in names
        }
        for spec in tqdm(methods, desc="compare", disable=not progress):
            blocks, build_s = _build(problem, spec, names, max_bytes)
            inner = {
                name: 0.0 for name, block in blocks.items() if isinstance(block, CurvatureBlock)
            }
            for cap in captures(problem, quiet=True):
                for name in inner:
                    inner[name] += blocks[name].inner_with_rows(cap[name].A, cap[name].G)
            for name in names:
                rows.append(
                    _row(
                        name,
                        spec,
                        blocks[name],
                        references[name],
                        inner.get(name, math.nan) / problem.normaliser,
                        grads[name],
                        damping,
                        build_s,
                        max_bytes,
                    )
                )
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda r: order[r["layer"]])


@dataclass(frozen=True)
class _Reference:
    """What the rows need of a layer's exact Fisher: its norm, spectrum and damped direction."""

    method: str
    norm_sq: float
    spectrum: Tensor
    direction: Tensor


def _reference(
    problem: Problem, name: str, first: Capture, gradient: Tensor, damping: float, max_bytes: int
) -> _Reference | None:
    layer = problem.layers[name]
    rows = first[name].G.shape[0] * problem.num_samples
    itemsize = first[name].A.element_size()
    method = _reference_method(layer.num_params, rows, itemsize, max_bytes)
    if method is None:
        return None
    block = curvatures(problem, [method], [name], max_bytes)[method][name]
    return _Reference(
        method,
        block.norm_sq(),
        block.eigvalsh(max_bytes).flip(0),
        block.solve(gradient, damping),
    )


def _row(
    name: str,
    spec: str,
    block: CurvatureBlock | str,
    reference: _Reference | None,
    inner: float,
    gradient: Tensor,
    damping: float,
    build_s: float,
    max_bytes: int,
) -> dict[str, Any]:
    nan = math.nan
    row: dict[str, Any] = {
        "layer": name,
        "method": spec,
        "P": nan,
        "reference": reference.method if reference is not None else "none",
        "rel_frobenius": nan,
        "spectrum_distance": nan,
        "direction_cosine": nan,
        "direction_rel_error": nan,
        "build_s": nan,
        "solve_s": nan,
        "memory_mb": nan,
        "note": "",
    }
    if isinstance(block, str):
        row["note"] = "refused: " + block
        return row
    start = time.perf_counter()
    direction = block.solve(gradient, damping)
    row.update(
        P=block.size,
        build_s=build_s,
        solve_s=time.perf_counter() - start,
        memory_mb=block.nbytes / 2**20,
    )
    if reference is None:
        row["note"] = "no exact reference fits the budget"
        return row
    if block.is_exact:
        row["rel_frobenius"] = 0.0
    elif reference.norm_sq > 0:
        err_sq = reference.norm_sq - 2 * inner + block.norm_sq()
        row["rel_frobenius"] = math.sqrt(max(err_sq, 0.0) / reference.norm_sq)
    spectrum = block.eigvalsh(max_bytes).flip(0)
    row["spectrum_distance"] = spectrum_distance(reference.spectrum, spectrum)
    agreement = direction_agreement(direction, reference.direction)
    row["direction_cosine"] = agreement.cosine
    row["direction_rel_error"] = agreement.relative_error
    return row


def summary_meta(problem: Problem, methods: Sequence[str], damping: float) -> dict[str, Any]:
    """The protocol of a comparison, for tables and figure titles."""
    return {
        "fisher_type": problem.fisher_type,
        "samples": problem.num_samples,
        "normaliser": problem.normaliser,
        "reference": f"exact {problem.fisher_type} Fisher of the {problem.num_samples} samples",
        "methods": list(methods),
        "damping": damping,
        "dtype": str(next(problem.model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }


__all__ = ["DEFAULT_METHODS", "batch_gradients", "compare", "data_gradients", "summary_meta"]
