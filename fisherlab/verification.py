"""``fl.verify``: numerical checks of the facts fisherlab's approximations rest on.

Per layer, on the zoo (:mod:`fisherlab.zoo`) or on a user's own model and batch:

* ``ekfac<=kfac``: EKFAC's Frobenius error is never above KFAC's (George et al. 2018, the
  projection theorem); value ``(‖F−F̂_ekfac‖ − ‖F−F̂_kfac‖)/‖F‖``, must be ``≤ tol``.
* ``woodbury-solve``: Woodbury's damped solve equals the dense damped solve of the exact block
  (layers with ``P ≤ dense_limit``); value: relative error.
* ``skfac=kfac-inverse``: SKFAC's SMW solve equals KFAC's damped inverse, for Linear layers
  (``T = 1``) with fewer samples than input dimensions; value: relative error.
* ``kfac-exact-one-sample``: KFAC equals the exact block for one sample on a Linear layer
  (``T = 1``); value: relative Frobenius error.

Tolerances follow the dtype (``1e-9`` in float64, ``1e-3`` in float32).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.blocks import build_block
from fisherlab.capture import capture
from fisherlab.conventions import FISHER_TYPES
from fisherlab.metrics import fisher_norm_sq, frobenius_at_scale
from fisherlab.zoo import CASES

CHECKS = ("ekfac<=kfac", "woodbury-solve", "skfac=kfac-inverse", "kfac-exact-one-sample")


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
                rows.append(
                    {
                        "check": name,
                        "runs": len(runs),
                        "worst": max(c.value for c in runs),
                        "tolerance": max(c.tolerance for c in runs),
                        "violations": sum(not c.ok for c in runs),
                    }
                )
        return rows

    def rows(self) -> list[dict]:
        """Every check as a table row."""
        return [{**asdict(c), "ok": c.ok} for c in self.checks]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-3


def verify_problem(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher_type: str = "true",
    mc_samples: int = 2,
    damping: float = 1e-3,
    dense_limit: int = 3000,
    label: str = "model",
    skip_unsupported: bool = False,
) -> list[Check]:
    """The checks of the module docstring on one model and batch."""
    cap = capture(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    tol = _tolerance(inputs.dtype)
    # at scale, both Frobenius errors carry a cancellation error of order sqrt(eps)·‖F‖
    slack = math.sqrt(torch.finfo(inputs.dtype).eps)
    generator = torch.Generator().manual_seed(0)
    checks = []
    for name, layer in cap.items():
        kfac, ekfac = build_block("kfac", cap, name), build_block("ekfac", cap, name)
        size = kfac.size
        v = torch.randn(size, generator=generator, dtype=torch.float64).to(inputs)
        linear = layer.positions == 1 and isinstance(layer.layer.module, nn.Linear)
        if size <= dense_limit:
            dense = build_block("exact", cap, name).to_dense()
            norm = torch.linalg.matrix_norm(dense).item()
            err_k = torch.linalg.matrix_norm(dense - kfac.to_dense()).item()
            err_e = torch.linalg.matrix_norm(dense - ekfac.to_dense()).item()
            ekfac_tol = tol
            solved = torch.linalg.solve(dense + damping * torch.eye(size).to(dense), v)
            woodbury = build_block("woodbury", cap, name).solve(v, damping)
            checks.append(Check(label, name, "woodbury-solve", _rel(woodbury, solved), tol))
            one_sample_tol = tol
        else:
            f_sq = fisher_norm_sq(layer, cap.normaliser)
            err_k, norm = frobenius_at_scale(kfac, layer, cap.normaliser, f_sq)
            err_e, _ = frobenius_at_scale(ekfac, layer, cap.normaliser, f_sq)
            ekfac_tol = one_sample_tol = slack
        checks.append(
            Check(label, name, "ekfac<=kfac", (err_e - err_k) / norm if norm else 0.0, ekfac_tol)
        )
        if linear and cap.batch_size < layer.A.shape[-1]:
            skfac = build_block("skfac", cap, name).solve(v, damping)
            value = _rel(skfac, kfac.solve(v, damping))
            checks.append(Check(label, name, "skfac=kfac-inverse", value, tol))
        if linear and cap.batch_size == 1:
            value = err_k / norm if norm else 0.0
            checks.append(Check(label, name, "kfac-exact-one-sample", value, one_sample_tol))
    return checks


def _rel(a: Tensor, b: Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def verify(
    model: nn.Module | None = None,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 3, 17, 128),
    fisher_types: Sequence[str] = FISHER_TYPES,
    seeds: Sequence[int] = (0, 1),
    damping: float = 1e-3,
    progress: bool = True,
) -> Report:
    """Run the checks on a user's model and batch, or, without a model, on the zoo.

    Args:
        model: A user's network; ``None`` for the zoo.
        loss_fn: The user's loss (with ``model``).
        inputs: The user's batch inputs (with ``model``).
        targets: The user's batch targets (with ``model``).
        batch_sizes: Batch sizes of the zoo runs.
        fisher_types: Fisher types to check.
        seeds: Seeds of the zoo runs (model initialisation and data).
        damping: ``λ`` of the damped solves.
        progress: Show a progress bar.

    Returns:
        A :class:`Report`; ``report.ok`` is false on any violation.
    """
    if model is not None:
        runs = [
            (f"model/{ft}", ft, lambda: (model, loss_fn, inputs, targets)) for ft in fisher_types
        ]
    else:
        runs = [
            (
                f"{case.name}/N{n}/{ft}/seed{seed}",
                ft,
                lambda case=case, n=n, seed=seed: case.build(n, seed),
            )
            for case, n, ft, seed in itertools.product(CASES, batch_sizes, fisher_types, seeds)
        ]
    checks: list[Check] = []
    for label, fisher_type, make in tqdm(runs, desc="verify", disable=not progress):
        torch.manual_seed(0)
        checks += verify_problem(*make(), fisher_type=fisher_type, damping=damping, label=label)
    return Report(checks)


__all__ = ["CHECKS", "Check", "Report", "verify", "verify_problem"]
