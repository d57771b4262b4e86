"""Summaries of finished runs: time to a target accuracy, the comparison table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fisherlab.experiments.config import DEFAULT_TARGETS, OPTIMIZER_NAMES
from fisherlab.experiments.grid import _point_name
from fisherlab.experiments.runlog import RunResult


# ---------------------------------------------------------------------- time to target
def time_to_target(rows: Sequence[dict[str, Any]], target: float) -> tuple[float, int] | None:
    """``(time_s, epoch)`` of the first epoch whose test accuracy reaches ``target``, or ``None``.

    The resolution is one epoch (the accuracy is measured after each epoch).
    """
    for row in rows:
        acc = row.get("test_accuracy")
        if acc is not None and math.isfinite(acc) and acc >= target:
            return float(row["time_s"]), int(row["epoch"])
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def regime(rs: Sequence[RunResult]) -> dict[str, float]:
    """Where runs sat relative to their curvature: means over seeds (NaN where not logged).

    ``damping_ratio_start``/``damping_ratio_end``: ``λ/λ_max`` at initialisation and after the
    last epoch; ``direction_cosine``: the mean over epochs of ``cos((F̂+λI)⁻¹g, g)`` (near 1:
    the preconditioner does nothing but rescale the step).
    """

    def mean(values: list) -> float:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    return {
        "damping_ratio_start": mean([r.rows[0].get("damping_ratio") for r in rs]),
        "damping_ratio_end": mean([r.final.get("damping_ratio") for r in rs]),
        "direction_cosine": mean([row.get("direction_cosine") for r in rs for row in r.rows[1:]]),
    }


def skipped_steps(run: RunResult) -> tuple[int, int]:
    """``(skipped, steps)``: the steps the run's optimizer skipped, and all its steps."""

    def count(value: Any) -> int:
        return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0

    return sum(count(r.get("skipped_steps")) for r in run.rows), count(run.final.get("steps"))


def every_step_skipped(run: RunResult) -> bool:
    """Whether the optimizer skipped every step of the run (its parameters never moved)."""
    skipped, steps = skipped_steps(run)
    return steps > 0 and skipped >= steps


SKIPPED_MARK = " [every step skipped]"
"""Appended to the label of a setting whose runs all skipped every step (curves, tables)."""


def group_runs(runs: Sequence[RunResult]) -> dict[tuple[str, str], dict[str, list[RunResult]]]:
    """Runs grouped as ``{(data, model): {label: [runs over seeds]}}``.

    The label is the optimizer's name, with the learning rate and damping added when one group
    holds several settings of the same optimizer, and :data:`SKIPPED_MARK` when every run of
    the setting skipped every step.
    """
    groups: dict[tuple[str, str], dict[tuple, list[RunResult]]] = {}
    for run in runs:
        c = run.config
        key = (c.data, Path(c.model).name if ":" not in c.model else c.model.rpartition(":")[2])
        setting = (c.optimizer, c.lr, c.damping, c.batch_size, c.epochs, c.momentum)
        groups.setdefault(key, {}).setdefault(setting, []).append(run)
    out: dict[tuple[str, str], dict[str, list[RunResult]]] = {}
    for key, settings in groups.items():
        counts: dict[str, int] = {}
        for s in settings:
            counts[s[0]] = counts.get(s[0], 0) + 1
        ordered = sorted(
            settings.items(),
            key=lambda kv: (
                OPTIMIZER_NAMES.index(kv[0][0]) if kv[0][0] in OPTIMIZER_NAMES else 99,
                kv[0][1:3],
            ),
        )
        out[key] = {}
        for s, rs in ordered:
            label = s[0] if counts[s[0]] == 1 else f"{s[0]} ({_point_name(s[1], s[2])})"
            if all(every_step_skipped(r) for r in rs):
                label += SKIPPED_MARK
            out[key][label] = sorted(rs, key=lambda r: r.config.seed)
    return out


def summarise(runs: Sequence[RunResult], target: float | None = None) -> list[dict[str, Any]]:
    """The time-to-target table: one row per data set × model × optimizer (mean over seeds).

    Columns: ``time_to_target_s`` and ``time_to_target_std`` (mean and sample standard deviation
    over the seeds that reached the target), ``reached`` (``k/n`` seeds), ``epochs_to_target``,
    ``vs_sgd`` (time to target ÷ SGD's in the same group), ``final_test_accuracy`` (± std),
    ``final_train_loss`` (± std), ``time_per_epoch_s``, ``step_share`` (time inside
    ``optimizer.step()`` ÷ training time), the curvature regime (:func:`regime`), ``diverged``
    and ``failed`` (runs that stopped early; their last epoch counts as final),
    ``skipped_steps`` (steps the optimizer skipped, summed over seeds) and the settings
    (``damping`` is ``λ/λ_max`` when ``relative_damping``).
    """
    table = []
    for (data, model), by_label in group_runs(runs).items():
        tgt = target if target is not None else DEFAULT_TARGETS.get(data, 0.9)
        group_rows = []
        for label, rs in by_label.items():
            hits = [time_to_target(r.rows, tgt) for r in rs]
            times = [h[0] for h in hits if h is not None]
            ep = [h[1] for h in hits if h is not None]
            t_mean, t_std = _mean_std(times)
            acc_mean, acc_std = _mean_std([r.final["test_accuracy"] for r in rs])
            loss_mean, loss_std = _mean_std([r.final["train_loss"] for r in rs])
            total = [r.final["time_s"] for r in rs]
            epochs = [max(r.final["epoch"], 1) for r in rs]
            step = [sum(row["step_time_s"] for row in r.rows) for r in rs]
            c = rs[0].config
            group_rows.append(
                {
                    "data": data,
                    "model": model,
                    "optimizer": label,
                    "lr": c.lr,
                    "damping": c.damping,
                    "seeds": len(rs),
                    "target": tgt,
                    "reached": f"{len(times)}/{len(rs)}",
                    "time_to_target_s": t_mean,
                    "time_to_target_std": t_std,
                    "epochs_to_target": float(np.mean(ep)) if ep else math.nan,
                    "vs_sgd": math.nan,
                    "final_test_accuracy": acc_mean,
                    "final_test_accuracy_std": acc_std,
                    "final_train_loss": loss_mean,
                    "final_train_loss_std": loss_std,
                    "time_per_epoch_s": float(np.mean([t / e for t, e in zip(total, epochs)])),
                    "step_share": float(np.mean([s / max(t, 1e-12) for s, t in zip(step, total)])),
                    **regime(rs),
                    "diverged": sum(r.status == "diverged" for r in rs),
                    "failed": sum(r.status == "failed" for r in rs),
                    "skipped_steps": sum(skipped_steps(r)[0] for r in rs),
                }
            )
        sgd = next((r for r in group_rows if r["optimizer"] == "sgd"), None)
        if sgd is not None and math.isfinite(sgd["time_to_target_s"]):
            for r in group_rows:
                r["vs_sgd"] = r["time_to_target_s"] / sgd["time_to_target_s"]
        table += group_rows
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The time-to-target table as Markdown (mean ± standard deviation over seeds)."""

    def pm(mean: float, std: float, fmt: str, scale: float = 1.0) -> str:
        if not math.isfinite(mean):
            return "—"
        return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}"

    def num(value: float, fmt: str) -> str:
        return "—" if not math.isfinite(value) else format(value, fmt)

    def ratio(r: dict[str, Any]) -> str:
        start, end = r.get("damping_ratio_start", math.nan), r.get("damping_ratio_end", math.nan)
        if not math.isfinite(start):
            return "—"
        return f"{start:.0e} → {end:.0e}" if math.isfinite(end) else f"{start:.0e}"

    head = (
        "| data | model | optimizer | lr | λ/λ_max (start → end) | cos(d, g) | "
        "time to target (s) | reached | epochs | ÷ SGD | final test acc. (%) | "
        "final train loss | s / epoch | in step() |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        stopped = [f"{r[k]}/{r['seeds']} {k}" for k in ("diverged", "failed") if r.get(k)]
        if r.get("skipped_steps") and not r["optimizer"].endswith(SKIPPED_MARK):
            stopped.append(f"{r['skipped_steps']} steps skipped")
        name = r["optimizer"] + (f" ({', '.join(stopped)})" if stopped else "")
        lines.append(
            f"| {r['data']} | {r['model']} | {name} | {r['lr']:g} | {ratio(r)} | "
            f"{num(r.get('direction_cosine', math.nan), '.2f')} | "
            f"{pm(r['time_to_target_s'], r['time_to_target_std'], '.2f')} | {r['reached']} | "
            f"{num(r['epochs_to_target'], '.1f')} | {num(r['vs_sgd'], '.2f')} | "
            f"{pm(r['final_test_accuracy'], r['final_test_accuracy_std'], '.1f', 100)} | "
            f"{pm(r['final_train_loss'], r['final_train_loss_std'], '.3g')} | "
            f"{r['time_per_epoch_s']:.2f} | {100 * r['step_share']:.0f}% |"
        )
    return "\n".join(lines)
