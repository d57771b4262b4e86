"""The schema of a ``compare-optimizers`` config file, checked before anything runs.

Every key is known (a typo is refused with the nearest valid name), every value has its type
and range (seeds are integers ≥ 0, learning rates and dampings positive numbers, ``experiments``
a list, every grid entry has ``lr``), and the run settings (``train`` and the grid's ``train``)
are :class:`~fisherlab.experiments.config.RunConfig` fields. The first violation is one line
naming the file and where in it.
"""

from __future__ import annotations

from typing import Any

from fisherlab.conventions import FisherlabError, check_keys, check_range
from fisherlab.experiments.config import (
    FIELD_CHECKS,
    FIRST_ORDER,
    OPTIMIZER_NAMES,
    SELECT_CRITERIA,
    RunConfig,
)

EXPERIMENT_KEYS = (
    "description",
    "out",
    "figures",
    "seeds",
    "target_accuracy",
    "train",
    "grid",
    "experiments",
)
"""The top-level keys of a config file."""

GRID_KEYS = ("seeds", "select", "validation", "extend", "train")
"""The grid section's settings (besides one entry per optimizer name or ``"*"``)."""

GRID_ENTRY_KEYS = ("lr", "damping", "relative")
"""The keys of one optimizer's grid entry."""

HYPER_KEYS = ("lr", "damping", "relative_damping", "options", "note", "grid")
"""The keys of one optimizer's settings in an experiment."""


def _fail(where: str, message: str) -> None:
    raise FisherlabError(f"{where}: {message}")


def _expect(where: str, value: Any, kind: type | tuple[type, ...], text: str) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        _fail(where, f"must be {text}, got {value!r}")


def _seeds(where: str, value: Any) -> None:
    _expect(where, value, list, "a list of integer seeds")
    if not value:
        _fail(where, "must list at least one seed")
    for seed in value:
        FIELD_CHECKS["seed"](where, seed)  # an integer in [0, 2³²)
    if len(set(value)) != len(value):
        _fail(where, f"repeats a seed: {value}")


def _positive_numbers(where: str, value: Any, allow_empty: bool = False) -> None:
    _expect(where, value, list, "a list of positive numbers")
    if not value and not allow_empty:
        _fail(where, "must list at least one value")
    for v in value:
        check_range(where, v, 0, open_low=True)


SET_PER_RUN = {
    "optimizer": "the names under 'optimizers'",
    "model": "each experiment's 'model'",
    "seed": "'seeds'",
    "lr": "each optimizer's 'lr' (or the grid)",
    "damping": "each optimizer's 'damping' (or the grid)",
    "relative_damping": "each optimizer's 'relative_damping' (or the grid)",
    "optimizer_options": "each optimizer's 'options'",
    "tag": "compare-optimizers",
}
"""Run settings that ``train`` sections may not hold: each run's own value replaces them."""


def _run_settings(where: str, values: Any) -> None:
    RunConfig.from_dict(values, where)
    for name, value in values.items():
        if name in SET_PER_RUN:
            _fail(f"{where}.{name}", f"is set per run by {SET_PER_RUN[name]}; remove it here")
        FIELD_CHECKS[name](f"{where}.{name}", value)


def _grid(where: str, grid: Any) -> None:
    _expect(where, grid, dict, "a JSON object")
    check_keys(where, grid, (*GRID_KEYS, "*", *OPTIMIZER_NAMES))
    if "seeds" in grid:
        _seeds(f"{where}.seeds", grid["seeds"])
    if "select" in grid and grid["select"] not in SELECT_CRITERIA:
        _fail(f"{where}.select", f"must be one of {list(SELECT_CRITERIA)}, got {grid['select']!r}")
    if "validation" in grid:
        check_range(f"{where}.validation", grid["validation"], 0, 1, open_low=True)
    if "extend" in grid:
        FIELD_CHECKS["scale_samples"](f"{where}.extend", grid["extend"])  # an integer ≥ 0
    if "train" in grid:
        _run_settings(f"{where}.train", grid["train"])
    for name in (*OPTIMIZER_NAMES, "*"):
        if name not in grid:
            continue
        entry, at = grid[name], f"{where}.{name}"
        _expect(at, entry, dict, 'a JSON object such as {"lr": [0.01, 0.1]}')
        check_keys(at, entry, GRID_ENTRY_KEYS)
        if "lr" not in entry:
            _fail(at, "needs 'lr', the list of learning rates to try")
        _positive_numbers(f"{at}.lr", entry["lr"])
        if "damping" in entry:
            if name in FIRST_ORDER:
                _fail(f"{at}.damping", f"{name} has no damping")
            _positive_numbers(f"{at}.damping", entry["damping"])
        if "relative" in entry:
            _expect(f"{at}.relative", entry["relative"], bool, "true or false")


def _optimizer(where: str, name: str, hyper: Any) -> None:
    _expect(where, hyper, dict, "a JSON object of settings ({} for the defaults)")
    check_keys(where, hyper, HYPER_KEYS)
    for key in ("lr", "damping"):
        if hyper.get(key) is not None:
            check_range(f"{where}.{key}", hyper[key], 0, open_low=True)
    if hyper.get("damping") is not None and name in FIRST_ORDER:
        _fail(f"{where}.damping", f"{name} has no damping")
    if "relative_damping" in hyper:
        _expect(f"{where}.relative_damping", hyper["relative_damping"], bool, "true or false")
    if "options" in hyper:
        _expect(f"{where}.options", hyper["options"], dict, "a JSON object of optimizer arguments")
    if "note" in hyper:
        _expect(f"{where}.note", hyper["note"], str, "a string")
    if "grid" in hyper:
        _expect(f"{where}.grid", hyper["grid"], dict, "a JSON object")


def check_experiment(cfg: Any, where: str) -> None:
    """Refuse the first part of a config file that does not follow the schema.

    Args:
        cfg: The parsed JSON.
        where: The file's name, for the messages.

    Raises:
        FisherlabError: One line naming the key and what is wrong with it.
    """
    _expect(where, cfg, dict, "a JSON object")
    check_keys(where, cfg, EXPERIMENT_KEYS)
    for key in ("description", "out", "figures"):
        if cfg.get(key) is not None:
            _expect(f"{where}: {key}", cfg[key], str, "a string")
    if "seeds" in cfg:
        _seeds(f"{where}: seeds", cfg["seeds"])
    target = cfg.get("target_accuracy")
    if target is not None:
        _expect(f"{where}: target_accuracy", target, (int, float), "an accuracy in (0, 1]")
        if not 0 < target <= 1:
            _fail(f"{where}: target_accuracy", f"must be an accuracy in (0, 1], got {target!r}")
    _run_settings(f"{where}: train", cfg.get("train", {}))
    if "grid" in cfg:
        _grid(f"{where}: grid", cfg["grid"])
    experiments = cfg.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        _fail(
            f"{where}: experiments",
            'must be a non-empty list of {"model": …, "optimizers": {…}}, got '
            + repr(experiments)[:80],
        )
    for i, exp in enumerate(experiments):
        at = f"{where}: experiments[{i}]"
        _expect(at, exp, dict, 'a JSON object {"model": …, "optimizers": {…}}')
        check_keys(at, exp, ("model", "optimizers", "note"))
        if not isinstance(exp.get("model"), str):
            _fail(
                at, f"needs 'model', a model name or 'file.py:factory' (got {exp.get('model')!r})"
            )
        optimizers = exp.get("optimizers")
        if not isinstance(optimizers, dict) or not optimizers:
            _fail(at, f"needs 'optimizers', a JSON object naming some of {list(OPTIMIZER_NAMES)}")
        check_keys(f"{at}.optimizers", optimizers, OPTIMIZER_NAMES)
        for name, hyper in optimizers.items():
            _optimizer(f"{at}.optimizers.{name}", name, hyper)


__all__ = ["EXPERIMENT_KEYS", "GRID_ENTRY_KEYS", "GRID_KEYS", "HYPER_KEYS", "check_experiment"]
