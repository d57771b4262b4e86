"""``fl.verify``: numerical checks of the facts fisherlab's approximations rest on.

Per layer, on the zoo (:mod:`fisherlab.zoo`) or on a user's problem (one batch or a data set):

* ``ekfac<=kfac``: EKFAC's Frobenius error against the Fisher of the data is never above
  KFAC's (George et al. 2018, the projection theorem); value
  ``(‖F−F̂_ekfac‖ − ‖F−F̂_kfac‖)/‖F‖``, must be ``≤ tol``.
* ``woodbury-solve``: Woodbury's damped solve equals the dense damped solve of the exact block
  (layers with ``P ≤ dense_limit``) at every damping ``λ`` of ``dampings``; value: relative error
  ``‖x − x*‖/‖x*‖``, within ``100·ε·cond(F + λI)`` (the accuracy any solver can promise).
* ``skfac=kfac-inverse``: SKFAC's SMW solve equals KFAC's damped inverse, for Linear layers
  (``T = 1``) with fewer samples than input dimensions; value: relative error.
* ``kfac-exact-one-sample``: KFAC equals the exact block for one sample on a Linear layer
  (``T = 1``); value: relative Frobenius error.

Tolerances follow the dtype (``1e-9`` in float64, ``1e-3`` in float32, except the solve's); the
zoo runs in float64 and float32.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.blocks import curvatures
from fisherlab.capture import cached_captures
from fisherlab.conventions import DEFAULT_MAX_BYTES, FISHER_TYPES, MemoryBudgetError
from fisherlab.metrics import frobenius_at_scale
from fisherlab.problem import Problem, as_problem
from fisherlab.zoo import CASES

CHECKS = ("ekfac<=kfac", "woodbury-solve", "skfac=kfac-inverse", "kfac-exact-one-sample")
DAMPINGS = (1e-6, 1e-3, 1.0)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Check:
    """One check on one layer of one problem."""

    problem: str
    layer: str
    check: str
    value: float
    tolerance: float

    @property
    def ok(self) -> bool:
        """Whether the value is within tolerance."""
        return math.isfinite(self.value) and self.value <= self.tolerance


@dataclass(frozen=True)
class Report:
    """All checks of a verification run."""

    checks: list[Check]

    @property
    def violations(self) -> list[Check]:
        """Checks that failed."""
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.violations

    def summary(self) -> list[dict]:
        """A row per check: how often it ran, the worst value, the tolerance, violations."""
        rows = []
        for name in CHECKS:
            runs = [c for c in self.checks if c.check == name]
            if runs:
                worst = max(runs, key=lambda c: c.value / c.tolerance if c.tolerance else 0)
                rows.append(
                    {
                        "check": name,
                        "runs": len(runs),
                        "worst": worst.value,
                        "tolerance": worst.tolerance,
                        "violations": sum(not c.ok for c in runs),
                    }
                )
        return rows

    def rows(self) -> list[dict]:
        """Every check as a table row."""
        return [{**asdict(c), "ok": c.ok} for c in self.checks]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-3


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    scale = torch.linalg.vector_norm(b).item()
    error = torch.linalg.vector_norm(a - b).item()
    return error / scale if scale > 0 else error


def verify_problem(
    problem: Problem | nn.Module,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    fisher_type: str | None = None,
    mc_samples: int | None = None,
    damping: float = 1e-3,
    dampings: Sequence[float] = DAMPINGS,
    dense_limit: int = 3000,
    label: str = "model",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Check]:
    """The checks of the module docstring on one problem (or one model and batch).

    Woodbury's check is left out for layers whose rows over the data exceed ``max_bytes``.
    """
    problem = as_problem(problem, loss_fn, inputs, targets, fisher_type, mc_samples)
    checks: list[Check] = []
    with cached_captures(problem):
        built = curvatures(problem, ["kfac", "ekfac", "skfac"], max_bytes=max_bytes)
        kfacs, ekfacs, skfacs = built["kfac"], built["ekfac"], built["skfac"]
        dtype = next(iter(kfacs.values())).dtype
        tol = _tolerance(dtype)
        # at scale, both Frobenius errors carry a cancellation error of order sqrt(eps)·‖F‖
        slack = math.sqrt(torch.finfo(dtype).eps)
        generator = torch.Generator().manual_seed(0)
        samples = problem.num_samples
        small = [n for n, b in kfacs.items() if b.size <= dense_limit]
        exact = curvatures(problem, ["exact"], small, max_bytes)["exact"] if small else {}
        woodbury = {}
        for name in small:
            with contextlib.suppress(MemoryBudgetError):  # rows over the data too large
                built = curvatures(problem, ["woodbury"], [name], max_bytes)
                woodbury[name] = built["woodbury"][name]
        for name, kfac in kfacs.items():
            ekfac = ekfacs[name]
            layer = problem.layers[name]
            v = torch.randn(kfac.size, generator=generator, dtype=torch.float64).to(kfac.dtype)
            linear = isinstance(layer.module, nn.Linear) and _positions(problem, name) == 1
            if name in exact:
                dense = exact[name].to_dense()
                norm = torch.linalg.matrix_norm(dense).item()
                err_k = torch.linalg.matrix_norm(dense - kfac.to_dense()).item()
                err_e = torch.linalg.matrix_norm(dense - ekfac.to_dense()).item()
                ekfac_tol = one_sample_tol = tol
                if name in woodbury:
                    checks += _solve_checks(label, name, dense, woodbury[name], v, dampings)
            else:
                err_k, norm = frobenius_at_scale(kfac, problem)
                err_e, _ = frobenius_at_scale(ekfac, problem, fisher_sq=norm**2)
                ekfac_tol = one_sample_tol = slack
            value = (err_e - err_k) / norm if norm else 0.0
            checks.append(Check(label, name, "ekfac<=kfac", value, ekfac_tol))
            if linear and samples < kfac.kron_shape[1]:
                value = _relative(skfacs[name].solve(v, damping), kfac.solve(v, damping))
                checks.append(Check(label, name, "skfac=kfac-inverse", value, tol))
            if linear and samples == 1:
                value = err_k / norm if norm else 0.0
                checks.append(Check(label, name, "kfac-exact-one-sample", value, one_sample_tol))
    return checks


def _positions(problem: Problem, name: str) -> int:
    from fisherlab.capture import captures

    for cap in captures(problem, quiet=True):
        return cap[name].positions
    return 1  # pragma: no cover - a problem has at least one batch


def _solve_checks(
    label: str, name: str, dense: Tensor, woodbury, v: Tensor, dampings: Sequence[float]
) -> list[Check]:
    """Woodbury's solve against the dense float64 solve, within 100·ε·cond(F + λI)."""
    work = dense.double()
    values = torch.linalg.eigvalsh(work).clamp_min(0)
    eps = torch.finfo(dense.dtype).eps
    checks = []
    for damping in dampings:
        eye = torch.eye(len(work), dtype=work.dtype)
        reference = torch.linalg.solve(work + damping * eye, v.double())
        cond = float((values[-1] + damping) / (values[0] + damping))
        value = _relative(woodbury.solve(v, damping), reference)
        checks.append(Check(label, name, "woodbury-solve", value, 100 * eps * cond))
    return checks


def verify(
    model: nn.Module | Problem | None = None,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 3, 17, 128),
    fisher_types: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    dtypes: Sequence[str] = ("float64", "float32"),
    damping: float = 1e-3,
    dampings: Sequence[float] = DAMPINGS,
    progress: bool = True,
) -> Report:
    """Run the checks on a user's problem (or model and batch), or, without one, on the zoo.

    Args:
        model: A :class:`~fisherlab.problem.Problem` or a user's network; ``None`` for the zoo.
        loss_fn: The user's loss (with a network).
        inputs: The user's batch inputs (with a network).
        targets: The user's batch targets (with a network).
        batch_sizes: Batch sizes of the zoo runs.
        fisher_types: Fisher types to check (default: all three for a network or the zoo,
            the problem's own for a Problem).
        seeds: Seeds of the zoo runs (model initialisation and data).
        dtypes: Dtypes of the zoo runs.
        damping: ``λ`` of the SKFAC check.
        dampings: ``λ`` of Woodbury's solve check.
        progress: Show a progress bar.

    Returns:
        A :class:`Report`; ``report.ok`` is false on any violation.
    """
    if isinstance(model, Problem):
        types = [model.fisher_type] if fisher_types is None else list(fisher_types)
        runs = [(f"problem/{ft}", lambda ft=ft: model.with_fisher_type(ft)) for ft in types]
    elif model is not None:
        types = list(FISHER_TYPES) if fisher_types is None else list(fisher_types)
        runs = [
            (
                f"model/{ft}",
                lambda ft=ft: Problem(model, loss_fn, (inputs, targets), ft, mc_samples=2),
            )
            for ft in types
        ]
    else:
        types = list(FISHER_TYPES) if fisher_types is None else list(fisher_types)
        runs = [
            (
                f"{case.name}/N{n}/{ft}/seed{seed}" + ("" if dtype == "float64" else f"/{dtype}"),
                lambda case=case, n=n, ft=ft, seed=seed, dtype=dtype: _zoo_problem(
                    case, n, ft, seed, DTYPES[dtype]
                ),
            )
            for case, n, ft, seed, dtype in itertools.product(
                CASES, batch_sizes, types, seeds, dtypes
            )
        ]
    checks: list[Check] = []
    for label, make in tqdm(runs, desc="verify", disable=not progress):
        checks += verify_problem(make(), damping=damping, dampings=dampings, label=label)
    return Report(checks)


def _zoo_problem(case, n: int, fisher_type: str, seed: int, dtype: torch.dtype) -> Problem:
    model, loss_fn, x, y = case.build(n, seed)
    model, x = model.to(dtype), x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    return Problem(model, loss_fn, (x, y), fisher_type, mc_samples=2)


__all__ = ["CHECKS", "DAMPINGS", "Check", "Report", "verify", "verify_problem"]
