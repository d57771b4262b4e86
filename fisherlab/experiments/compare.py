"""``compare-optimizers``: every optimizer of an experiment config, seeded, after a grid search."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fisherlab.conventions import FisherlabError
from fisherlab.data import Split
from fisherlab.experiments.config import DEFAULT_TARGETS, FIELD_CHECKS, RunConfig
from fisherlab.experiments.grid import GridResult, _point_name, grid_search, grid_values
from fisherlab.experiments.runlog import RunResult, _same_run, load_run
from fisherlab.experiments.runner import train
from fisherlab.experiments.schema import check_experiment
from fisherlab.experiments.setup import load_split, preflight
from fisherlab.experiments.summary import group_runs, markdown_table, skipped_steps, summarise
from fisherlab.files import write_text
from fisherlab.report import save_table


def write_curves(
    runs: Sequence[RunResult],
    out: str | os.PathLike,
    target: float | None = None,
    formats: Sequence[str] = ("png", "pdf"),
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Draw the curves and step-time figures and write the time-to-target table.

    Writes ``curves-<data>-<model>.*`` per data set and model,
    ``optimizers-<data>-step-time.*`` and ``optimizers-<data>-time-to-target.{md,csv,json}`` per
    data set into ``out``.

    Returns:
        The table rows (:func:`summarise`) and the written paths.
    """
    from fisherlab.experiments.figures import curves_figure, step_time_figure
    from fisherlab.plots.base import save_figure

    out = Path(out)
    groups = group_runs(runs)
    table = summarise(runs, target)
    written: list[Path] = []
    by_data: dict[str, dict[str, dict[str, list[RunResult]]]] = {}
    for (data, model), by_label in groups.items():
        tgt = target if target is not None else DEFAULT_TARGETS.get(data, 0.9)
        some = next(iter(by_label.values()))[0].config
        title = (
            f"{model} on {data}: {some.epochs} epochs, batch {some.batch_size}, "
            f"momentum {some.momentum:g}"
        )
        fig = curves_figure(by_label, title, tgt)
        written += save_figure(fig, out / f"curves-{data}-{model}", formats)
        by_data.setdefault(data, {})[model] = by_label
    for data, by_model in by_data.items():
        fig = step_time_figure(by_model, f"{data}: where the training time goes")
        written += save_figure(fig, out / f"optimizers-{data}-step-time", formats)
        rows = [r for r in table if r["data"] == data]
        stem = out / f"optimizers-{data}-time-to-target"
        written += save_table(rows, stem, {"target": rows[0]["target"], "spread": "sample std"})
        md = stem.with_suffix(".md")
        write_text(md, markdown_table(rows) + "\n")
        written.append(md)
    return table, written


# --------------------------------------------------------------------- compare-optimizers
QUICK: dict[str, Any] = {
    "train": {"epochs": 2, "train_subset": 640, "test_subset": 320},
    "seeds": [0, 1],
    "grid": {
        "*": {"lr": [1e-3, 1e-2, 1e-1], "damping": [1e-1, 1e-3], "relative": True},
        "sgd": {"lr": [0.03, 0.1, 0.3]},
        "adam": {"lr": [1e-3, 3e-3, 1e-2]},
        "seeds": [10],
        "extend": 1,
        "train": {},
    },
}
"""What ``--quick`` changes in an experiment (:func:`quick_variant`)."""


def quick_variant(experiment: dict[str, Any]) -> dict[str, Any]:
    """The experiment shrunk to run in minutes: :data:`QUICK`'s subsets, epochs, seeds and grid.

    Runs and figures go to ``<out>-quick`` and ``<figures>/quick``; the tuned settings of the
    config are kept as the starting point. For a smoke test of the whole protocol, not for
    conclusions.
    """
    quick = json.loads(json.dumps(experiment))
    quick["train"] = {**quick.get("train", {}), **QUICK["train"]}
    for key in ("train_subset", "test_subset"):
        full = experiment.get("train", {}).get(key)
        if full is not None:
            quick["train"][key] = min(full, QUICK["train"][key])
    quick["seeds"] = QUICK["seeds"]
    quick["grid"] = json.loads(json.dumps(QUICK["grid"]))
    quick["out"] = str(experiment.get("out") or "runs/compare") + "-quick"
    if experiment.get("figures"):
        quick["figures"] = str(Path(experiment["figures"]) / "quick")
    return quick


def load_experiment(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a compare-optimizers config (JSON; see ``configs/digits.json``).

    Keys: ``train`` (settings shared by every run, as :class:`RunConfig` fields), ``seeds``,
    ``experiments`` (a list of ``{"model": …, "optimizers": {name: {"lr": …, "damping": …,
    "relative_damping": …, "options": {…}}}}``), optional ``out`` (runs folder), ``figures``,
    ``target_accuracy``, ``grid`` (``{name or "*": {"lr": […], "damping": […], "relative": …},
    "seeds": […], "select": …, "validation": …, "extend": …, "train": {…}}``, ``train``
    overriding run settings for the grid only (e.g. a subset of a large training set), see
    :func:`~fisherlab.experiments.grid.grid_search`) and ``description``.

    Raises:
        FisherlabError: For a missing file, bad JSON, or anything against the schema
            (:func:`~fisherlab.experiments.schema.check_experiment`): unknown keys (with the
            nearest valid one), wrong types, values out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FisherlabError(f"config file {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FisherlabError(f"{path} is not valid JSON: {err}") from err
    check_experiment(cfg, str(path))
    return cfg


def _base_config(experiment: dict[str, Any], exp: dict[str, Any], name: str) -> RunConfig:
    """The resolved run config of optimizer ``name`` in ``exp`` (before any grid search)."""
    hyper = exp["optimizers"][name]
    return RunConfig.from_dict(
        {
            **experiment.get("train", {}),
            "model": exp["model"],
            "optimizer": name,
            "lr": hyper.get("lr"),
            "damping": hyper.get("damping"),
            "relative_damping": hyper.get("relative_damping", False),
            "optimizer_options": hyper.get("options", {}),
        }
    ).resolved()


def _plan(
    experiment: dict[str, Any],
    optimizers: Sequence[str] | None,
    grid: bool,
    splits: dict[tuple, Split],
) -> list[tuple[dict[str, Any], str, dict[str, Any], RunConfig]]:
    """Every ``(experiment, optimizer, settings, base config)`` to run, each checked first.

    Loads each data set once into ``splits`` and runs :func:`preflight` on every base config
    (and its grid variant), so that a bad setting in the last experiment is refused before the
    first one trains.
    """
    named = {name for exp in experiment["experiments"] for name in exp["optimizers"]}
    absent = sorted(set(optimizers or ()) - named)
    if absent:
        raise FisherlabError(
            f"optimizers {absent} are in no experiment of the config (it has {sorted(named)})"
        )
    planned = []
    for exp in experiment["experiments"]:
        for name, hyper in exp["optimizers"].items():
            if optimizers and name not in optimizers:
                continue
            base = _base_config(experiment, exp, name)
            key = (base.data, base.data_dir, base.split_seed)
            if key not in splits:
                splits[key] = load_split(base)
            preflight(base, splits[key])
            if grid:  # the grid's runs: its own settings and validation split
                grid_cfg = experiment.get("grid", {})
                variant = dataclasses.replace(base, **grid_cfg.get("train", {}))
                validation = variant.validation or grid_cfg.get("validation", 0.1)
                variant = dataclasses.replace(variant, validation=validation)
                preflight(variant.resolved(), splits[key])
            planned.append((exp, name, hyper, base))
    return planned


def compare_optimizers(
    experiment: dict[str, Any],
    out: str | os.PathLike | None = None,
    optimizers: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    grid: bool = False,
    force: bool = False,
    progress: bool = True,
    warmup: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[RunResult], dict[tuple[str, str], GridResult]]:
    """Run every optimizer of every experiment with every seed (after a grid search if asked).

    Runs go to ``out/<data>-<model>/<optimizer>/seed<S>``; finished runs of the same config are
    reused unless ``force``. With ``grid``, each optimizer's learning rate and damping are first
    chosen by :func:`grid_search` (runs under ``out/grid/…``) and ``experiment`` is updated in
    place with the choice. With ``warmup``, one untimed tiny run of each optimizer precedes its
    seeded runs, so that one-time costs (loading linear-algebra kernels, first calls) do not
    land in whichever run happens to come first.

    Returns:
        The runs and the grid results by ``(model, optimizer)``.
    """
    out = Path(out or experiment.get("out") or "runs/compare")
    seeds = list(seeds if seeds is not None else experiment.get("seeds", [0]))
    grid_cfg = experiment.get("grid", {})
    splits: dict[tuple, Split] = {}
    results: list[RunResult] = []
    grids: dict[tuple[str, str], GridResult] = {}
    for seed in seeds:
        FIELD_CHECKS["seed"]("seeds", seed)
    if len(set(seeds)) != len(seeds):
        raise FisherlabError(f"seeds {seeds} repeat a seed")
    planned = _plan(experiment, optimizers, grid, splits)  # every run checked before any runs
    for exp, name, hyper, base in planned:
        key = (base.data, base.data_dir, base.split_seed)
        folder = out / f"{base.data}-{Path(exp['model']).name.replace(':', '-')}"
        if grid:
            lrs, dampings, relative = grid_values(name, grid_cfg)
            what = "λ/λ_max" if relative else "damping"
            log(f"grid search {name} on {exp['model']}: lr {lrs} × {what} {dampings}")
            g = grid_search(
                dataclasses.replace(base, **grid_cfg.get("train", {})),
                lrs,
                dampings,
                seeds=grid_cfg.get("seeds", [0]),
                select=grid_cfg.get("select", "val_loss"),
                out=out / "grid" / folder.name / name,
                progress=progress,
                split=splits[key],
                force=force,
                relative=relative,
                validation=grid_cfg.get("validation", 0.1),
                extend=grid_cfg.get("extend", 2),
            )
            grids[(exp["model"], name)] = g
            base = dataclasses.replace(base, **g.best, relative_damping=g.relative)
            base = base.resolved()
            hyper.update({k: v for k, v in g.best.items() if v is not None})
            if g.relative:
                hyper["relative_damping"] = True
            else:
                hyper.pop("relative_damping", None)
            hyper["grid"] = {"edge": g.edge, "extended": g.extended, "select": g.select}
            chosen = _point_name(base.lr, base.damping, g.relative)
            edge = f"; ON THE EDGE of the grid ({', '.join(g.edge)})" if g.edge else ""
            log(f"  best at the last epoch ({g.select}): {chosen}{edge}")
        if warmup:  # first calls (library loading, kernel set-up) are not timed in runs
            split = splits[key]
            tiny = dataclasses.replace(
                base,
                epochs=1,
                train_subset=min(2 * base.batch_size, len(split.y_train)),
                test_subset=min(64, len(split.y_test)),
                tag="warmup",
            )
            train(tiny, None, progress=False, split=splits[key])
        for seed in seeds:
            cfg = dataclasses.replace(base, seed=seed)
            run_dir = folder / name / f"seed{seed}"
            if not force and _same_run(run_dir, cfg):
                results.append(load_run(run_dir))
                log(f"reusing {run_dir} (same config, finished)")
                continue
            result = train(cfg, run_dir, progress=progress, split=splits[key], overwrite=True)
            last = result.final
            skipped = f"; {result.note}" if skipped_steps(result)[0] else ""
            log(
                f"{cfg.label}: {result.status}, test accuracy "
                f"{100 * last['test_accuracy']:.1f}%, train loss {last['train_loss']:.4f}, "
                f"{last['time_s']:.1f} s{skipped}"
            )
            results.append(result)
    return results, grids
