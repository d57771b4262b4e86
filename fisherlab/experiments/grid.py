"""Grid search over learning rate × damping, selected per epoch."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# ------------------------------------------------------------------------- grid search
@dataclass
class GridResult:
    """Outcome of :func:`grid_search`.

    Attributes:
        points: One row per grid point: ``lr``, ``damping``, final metrics (mean over seeds;
            the worst value when a seed stopped early), ``diverged`` and ``failed`` (seeds that
            did) and the run folders.
        per_epoch: One row per epoch: the best point at that epoch and its metrics.
        best: The point best at the last epoch: ``{"lr": …, "damping": …}``.
        select: The criterion.
    """

    points: list[dict[str, Any]]
    per_epoch: list[dict[str, Any]]
    best: dict[str, float | None]
    select: str


def grid_values(optimizer: str, grid: dict[str, Any] | None = None) -> tuple[list, list]:
    """Learning rates and dampings of the grid for ``optimizer``.

    Args:
        optimizer: Its name.
        grid: Like :data:`DEFAULT_GRID` (``None``: that one); missing entries come from it.
    """
    grid = grid or DEFAULT_GRID
    entry = grid.get(optimizer) or grid.get("*" if optimizer not in FIRST_ORDER else optimizer)
    if entry is None:
        entry = DEFAULT_GRID[optimizer if optimizer in FIRST_ORDER else "*"]
    lrs = list(entry["lr"])
    dampings = [None] if optimizer in FIRST_ORDER else list(entry.get("damping", [None]))
    return lrs, dampings


def _point_name(lr: float, damping: float | None) -> str:
    return f"lr={lr:g}" + ("" if damping is None else f",damping={damping:g}")


def _score(rows_by_seed: list[list[dict]], epoch: int, key: str, better: Callable) -> float:
    """Mean of ``key`` at ``epoch`` over seeds; the worst value if a seed has no finite one."""
    worst = math.inf if better is min else -math.inf
    values = []
    for rows in rows_by_seed:
        value = rows[epoch][key] if epoch < len(rows) else None
        if value is None or not math.isfinite(value):
            return worst
        values.append(value)
    return float(np.mean(values))


def grid_search(
    base: RunConfig,
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float | None] | None = None,
    seeds: Sequence[int] = (0,),
    select: str = "train_loss",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    split: Split | None = None,
    force: bool = False,
) -> GridResult:
    """Train every ``lr × damping`` pair for ``base``'s budget and select per epoch.

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

    Returns:
        The points, the per-epoch best selection and the point best at the last epoch.
    """
    if select not in SELECT_CRITERIA:
        raise FisherlabError(f"select must be one of {list(SELECT_CRITERIA)}, got {select!r}")
    better = SELECT_CRITERIA[select]
    default_lrs, default_dampings = grid_values(base.optimizer)
    lrs = list(lrs) if lrs else default_lrs
    dampings = [None] if base.optimizer in FIRST_ORDER else list(dampings or default_dampings)
    split = split if split is not None else load_split(base.resolved())
    runs: dict[tuple, list[list[dict]]] = {}
    statuses: dict[tuple, list[str]] = {}
    folders: dict[tuple, list[str]] = {}
    for lr in lrs:
        for damping in dampings:
            key = (lr, damping)
            runs[key], statuses[key], folders[key] = [], [], []
            for seed in seeds:
                cfg = dataclasses.replace(base, lr=lr, damping=damping, seed=seed, tag="grid")
                folder = None
                if out is not None:
                    folder = Path(out) / _point_name(lr, damping) / f"seed{seed}"
                    folders[key].append(str(folder))
                if folder is not None and not force and _same_run(folder, cfg.resolved()):
                    result = load_run(folder)  # a finished point of an earlier search
                else:
                    result = train(cfg, folder, progress=progress, split=split, overwrite=True)
                runs[key].append(result.rows)
                statuses[key].append(result.status)
    epochs = base.epochs
    points = []
    for (lr, damping), rows_by_seed in runs.items():
        final = {
            k: _score(rows_by_seed, epochs, k, min if k != "test_accuracy" else max)
            for k in ("train_loss", "test_loss", "test_accuracy")
        }
        points.append(
            {
                "optimizer": base.optimizer,
                "lr": lr,
                "damping": damping,
                **{f"final_{k}": v for k, v in final.items()},
                "time_s": float(np.mean([r[-1]["time_s"] for r in rows_by_seed])),
                "diverged": statuses[(lr, damping)].count("diverged"),
                "failed": statuses[(lr, damping)].count("failed"),
                "runs": ";".join(folders[(lr, damping)]),
            }
        )
    per_epoch = []
    for epoch in range(1, epochs + 1):
        scored = [(_score(r, epoch, select, better), key) for key, r in runs.items()]
        best_score, (lr, damping) = better(scored, key=lambda s: s[0])
        rows_by_seed = runs[(lr, damping)]
        per_epoch.append(
            {
                "epoch": epoch,
                "lr": lr,
                "damping": damping,
                select: best_score,
                **{
                    k: _score(rows_by_seed, epoch, k, min if k != "test_accuracy" else max)
                    for k in ("train_loss", "test_loss", "test_accuracy", "time_s")
                    if k != select
                },
            }
        )
    best = {"lr": per_epoch[-1]["lr"], "damping": per_epoch[-1]["damping"]}
    result = GridResult(points, per_epoch, best, select)
    if out is not None:
        meta = {
            "base": base.to_dict(),
            "seeds": list(seeds),
            "select": select,
            "best": best,
            "lrs": lrs,
            "dampings": dampings,
        }
        save_table(points, Path(out) / "grid", meta)
        save_table(per_epoch, Path(out) / "grid-per-epoch", meta)
    return result
