"""Grid search over learning rate × damping, selected per epoch."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fisherlab.conventions import FisherlabError
from fisherlab.data import Split
from fisherlab.experiments.config import DEFAULT_GRID, FIRST_ORDER, SELECT_CRITERIA, RunConfig
from fisherlab.experiments.runlog import _same_run, load_run
from fisherlab.experiments.runner import train
from fisherlab.experiments.setup import load_split
from fisherlab.report import save_table


@dataclass
class GridResult:
    """Outcome of :func:`grid_search`.

    Attributes:
        points: One row per grid point: ``lr``, ``damping`` (``λ/λ_max`` when ``relative``),
            ``damping_ratio`` (``λ/λ_max`` at initialisation, mean over seeds) and
            ``lambda_max``, final metrics (mean over seeds; the worst value when a seed stopped
            early), ``direction_cosine`` (mean over epochs and seeds), ``diverged`` and
            ``failed`` (seeds that did), ``skipped_steps`` (steps the optimizer skipped, summed
            over seeds) and the run folders.
        per_epoch: One row per epoch: the best point at that epoch and its metrics.
        best: The point best at the last epoch: ``{"lr": …, "damping": …}``.
        select: The criterion.
        relative: Whether dampings are ``λ/λ_max``.
        edge: Axes on whose edge the best point still lies after the extensions, e.g.
            ``["lr high"]`` (empty: an interior optimum).
        extended: The values added beyond the first grid's edges, e.g. ``["lr 10"]``.
    """

    points: list[dict[str, Any]]
    per_epoch: list[dict[str, Any]]
    best: dict[str, float | None]
    select: str
    relative: bool = False
    edge: list[str] = field(default_factory=list)
    extended: list[str] = field(default_factory=list)


def grid_values(optimizer: str, grid: dict[str, Any] | None = None) -> tuple[list, list, bool]:
    """Learning rates, dampings and whether the dampings are relative, for ``optimizer``.

    Args:
        optimizer: Its name.
        grid: Like :data:`DEFAULT_GRID` (``None``: that one); missing entries come from it.
    """
    grid = grid or DEFAULT_GRID
    entry = grid.get(optimizer) or grid.get("*" if optimizer not in FIRST_ORDER else optimizer)
    if entry is None:
        entry = DEFAULT_GRID[optimizer if optimizer in FIRST_ORDER else "*"]
    lrs = list(entry["lr"])
    if optimizer in FIRST_ORDER:
        return lrs, [None], False
    return lrs, list(entry.get("damping", [None])), bool(entry.get("relative", False))


def _point_name(lr: float, damping: float | None, relative: bool = False) -> str:
    if damping is None:
        return f"lr={lr:g}"
    return f"lr={lr:g}," + ("damping_ratio" if relative else "damping") + f"={damping:g}"


def _score(rows_by_seed: list[list[dict]], epoch: int, key: str, better: Callable) -> float:
    """Mean of ``key`` at ``epoch`` over seeds; the worst value if a seed has no finite one."""
    worst = math.inf if better is min else -math.inf
    values = []
    for rows in rows_by_seed:
        value = rows[epoch].get(key) if epoch < len(rows) else None
        if value is None or not math.isfinite(value):
            return worst
        values.append(value)
    return float(np.mean(values))


def _mean_of(rows_by_seed: list[list[dict]], key: str, epochs: slice) -> float | None:
    """Mean of ``key`` over the ``epochs`` of every seed (``None`` where none is finite)."""
    values = [
        r[key]
        for rows in rows_by_seed
        for r in rows[epochs]
        if r.get(key) is not None and math.isfinite(r[key])
    ]
    return float(np.mean(values)) if values else None


def _total(rows_by_seed: list[list[dict]], key: str) -> int:
    """Sum of an integer column over every epoch and seed (missing and NaN entries count 0)."""
    values = (r.get(key) for rows in rows_by_seed for r in rows)
    return sum(int(v) for v in values if isinstance(v, int | float) and math.isfinite(v))


def _beyond(values: list[float], low: bool) -> float:
    """The next value past the low or high end of a log-spaced axis."""
    ordered = sorted(values)
    if len(ordered) == 1:
        step = 10.0
    else:
        step = ordered[1] / ordered[0] if low else ordered[-1] / ordered[-2]
    return ordered[0] / step if low else ordered[-1] * step


def grid_search(
    base: RunConfig,
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float | None] | None = None,
    seeds: Sequence[int] = (0,),
    select: str = "val_loss",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    split: Split | None = None,
    force: bool = False,
    relative: bool | None = None,
    validation: float = 0.1,
    extend: int = 2,
) -> GridResult:
    """Train every ``lr × damping`` pair for ``base``'s budget and select per epoch.

    Every point trains on the training set less a validation split (``validation``, unless
    ``base`` has one) and is scored on it; the test set is not evaluated. When the point best
    at the last epoch lies on an edge of the grid (the smallest or largest learning rate or
    damping), the grid is extended by one step beyond that edge, up to ``extend`` times; an
    edge that remains is reported in :attr:`GridResult.edge`.

    Args:
        base: The run; its ``lr``, ``damping`` and ``seed`` are replaced by the grid's.
        lrs: Learning rates (``None``: :data:`DEFAULT_GRID`).
        dampings: Dampings (``None``: :data:`DEFAULT_GRID`; ignored by SGD and Adam).
        seeds: Seeds of every point; scores are means over them.
        select: A key of :data:`SELECT_CRITERIA`.
        out: Folder for the runs (``out/lr=…,damping=…/seed…``) and ``grid.csv/json``,
            ``grid-per-epoch.csv/json``. Finished runs of the same config found there are
            reused, so a grid can be extended or resumed.
        progress: Progress bars.
        split: Preloaded data.
        force: Retrain points that are already there.
        relative: Dampings are ``λ/λ_max`` (``None``: :data:`DEFAULT_GRID`'s choice when the
            dampings are the default ones, else ``base.relative_damping``).
        validation: Share of the training set held out when ``base`` has no validation split.
        extend: Extensions of the grid beyond an edge holding the best point, at most.

    Returns:
        The points, the per-epoch best selection, the point best at the last epoch and where
        it lies on the grid.
    """
    if select not in SELECT_CRITERIA:
        raise FisherlabError(
            f"select must be one of {list(SELECT_CRITERIA)} (never the test set), got {select!r}"
        )
    better = SELECT_CRITERIA[select]
    default_lrs, default_dampings, default_relative = grid_values(base.optimizer)
    first_order = base.optimizer in FIRST_ORDER
    if relative is None:
        relative = default_relative if not dampings else base.relative_damping
    relative = bool(relative) and not first_order
    lrs = sorted(lrs) if lrs else default_lrs
    dampings = [None] if first_order else sorted(dampings or default_dampings)
    split = split if split is not None else load_split(base.resolved())
    grid_base = dataclasses.replace(
        base,
        tag="grid",
        relative_damping=relative,
        validation=base.validation or validation,
        eval_test=False,
    )
    runs: dict[tuple, list[list[dict]]] = {}
    statuses: dict[tuple, list[str]] = {}
    folders: dict[tuple, list[str]] = {}

    def train_point(lr: float, damping: float | None) -> None:
        key = (lr, damping)
        runs[key], statuses[key], folders[key] = [], [], []
        for seed in seeds:
            cfg = dataclasses.replace(grid_base, lr=lr, damping=damping, seed=seed)
            folder = None
            if out is not None:
                folder = Path(out) / _point_name(lr, damping, relative) / f"seed{seed}"
                folders[key].append(str(folder))
            if folder is not None and not force and _same_run(folder, cfg.resolved()):
                result = load_run(folder)  # a finished point of an earlier search
            else:
                result = train(cfg, folder, progress=progress, split=split, overwrite=True)
            runs[key].append(result.rows)
            statuses[key].append(result.status)

    def best_at(epoch: int) -> tuple[float, tuple]:
        scored = [(_score(r, epoch, select, better), key) for key, r in runs.items()]
        return better(scored, key=lambda s: s[0])

    extended: list[str] = []
    for round_ in range(extend + 1):
        for lr in lrs:
            for damping in dampings:
                if (lr, damping) not in runs:
                    train_point(lr, damping)
        _, (best_lr, best_damping) = best_at(base.epochs)
        edge = []
        if len(lrs) > 1 and best_lr in (lrs[0], lrs[-1]):
            edge.append("lr " + ("low" if best_lr == lrs[0] else "high"))
        if len(dampings) > 1 and best_damping in (dampings[0], dampings[-1]):
            edge.append("damping " + ("low" if best_damping == dampings[0] else "high"))
        if not edge or round_ == extend:
            break
        for axis_edge in edge:
            axis, side = axis_edge.split()
            values = lrs if axis == "lr" else dampings
            new = _beyond(values, low=side == "low")
            values.insert(0 if side == "low" else len(values), new)
            extended.append(f"{axis} {new:g}")
    epochs = base.epochs
    points = []
    for (lr, damping), rows_by_seed in runs.items():
        final = {
            k: _score(rows_by_seed, epochs, k, min if "loss" in k else max)
            for k in ("train_loss", "val_loss", "val_accuracy")
        }
        points.append(
            {
                "optimizer": base.optimizer,
                "lr": lr,
                "damping": damping,
                "relative": relative,
                "damping_ratio": _mean_of(rows_by_seed, "damping_ratio", slice(0, 1)),
                "lambda_max": _mean_of(rows_by_seed, "lambda_max", slice(0, 1)),
                **{f"final_{k}": v for k, v in final.items()},
                "direction_cosine": _mean_of(rows_by_seed, "direction_cosine", slice(1, None)),
                "time_s": float(np.mean([r[-1]["time_s"] for r in rows_by_seed])),
                "diverged": statuses[(lr, damping)].count("diverged"),
                "failed": statuses[(lr, damping)].count("failed"),
                "skipped_steps": _total(rows_by_seed, "skipped_steps"),
                "runs": ";".join(folders[(lr, damping)]),
            }
        )
    per_epoch = []
    for epoch in range(1, epochs + 1):
        best_score, (lr, damping) = best_at(epoch)
        rows_by_seed = runs[(lr, damping)]
        per_epoch.append(
            {
                "epoch": epoch,
                "lr": lr,
                "damping": damping,
                select: best_score,
                **{
                    k: _score(rows_by_seed, epoch, k, min if "loss" in k else max)
                    for k in ("train_loss", "val_loss", "val_accuracy", "time_s")
                    if k != select
                },
            }
        )
    best = {"lr": per_epoch[-1]["lr"], "damping": per_epoch[-1]["damping"]}
    result = GridResult(points, per_epoch, best, select, relative, edge, extended)
    if out is not None:
        meta = {
            "base": base.to_dict(),
            "seeds": list(seeds),
            "select": select,
            "validation": grid_base.validation,
            "relative": relative,
            "best": best,
            "edge": edge,
            "extended": extended,
            "lrs": lrs,
            "dampings": dampings,
        }
        save_table(points, Path(out) / "grid", meta)
        save_table(per_epoch, Path(out) / "grid-per-epoch", meta)
    return result
