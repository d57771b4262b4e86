"""The optimizer comparisons' figures: training curves and where the time goes.

Drawn from finished runs (:mod:`fisherlab.experiments`) with fisherlab's one palette and style
(:mod:`fisherlab.plots.base`), as ``matplotlib.figure.Figure`` objects without pyplot state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fisherlab.experiments.config import FIRST_ORDER
from fisherlab.experiments.runlog import RunResult
from fisherlab.experiments.summary import regime
from fisherlab.plots.base import color, style


# ------------------------------------------------------------------------------ figures
def _aggregate(rs: Sequence[RunResult], key: str) -> tuple[np.ndarray, ...]:
    """Per-epoch mean, min and max of ``key`` over seeds, and the mean cumulative time."""
    length = min(len(r.rows) for r in rs)
    values = np.array([[r.rows[e][key] for e in range(length)] for r in rs], dtype=float)
    times = np.array([[r.rows[e]["time_s"] for e in range(length)] for r in rs], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of diverged runs
        return (
            np.arange(length),
            np.nanmean(values, 0),
            np.nanmin(values, 0),
            np.nanmax(values, 0),
            times.mean(0),
        )


def _seconds(value: float, _pos: int) -> str:
    """Tick label of a log time axis: ``0.1``, ``1``, ``10``."""
    return f"{value:g}"


def curves_figure(
    by_label: dict[str, list[RunResult]],
    title: str,
    target: float | None = None,
    log_time: bool = True,
):
    """Training loss vs epoch and vs wall-clock, test accuracy vs wall-clock; one line per label.

    Lines are means over seeds, bands their min–max; on the wall-clock axes each point sits at
    the mean cumulative training time of its epoch.

    Args:
        by_label: Runs over seeds per curve label (:func:`group_runs`).
        title: Figure title.
        target: Test accuracy drawn as a dotted line.
        log_time: Logarithmic wall-clock axes (the optimizers' costs differ by orders of
            magnitude); they then start at epoch 1.

    Returns:
        A matplotlib ``Figure``.
    """
    with style():
        fig = Figure(figsize=(15, 4.6), layout="constrained")
        axes = fig.subplots(1, 3)
        start_losses = []
        for label, rs in by_label.items():
            name = label.split(" ")[0]
            colour = color(name)
            line = "--" if name in FIRST_ORDER else "-"
            c = rs[0].config
            hyper = f"lr {c.lr:.3g}"
            r = regime(rs)
            if math.isfinite(r["damping_ratio_start"]):
                hyper += f", λ/λ_max {r['damping_ratio_start']:.0e}"
                if math.isfinite(r["damping_ratio_end"]):
                    hyper += f"→{r['damping_ratio_end']:.0e}"
            elif c.damping is not None:
                hyper += f", λ {c.damping:g}"
            if math.isfinite(r["direction_cosine"]):
                hyper += f", cos {r['direction_cosine']:.2f}"
            bad = [r.status for r in rs if r.status in ("diverged", "failed")]
            legend = f"{label}: {hyper}, n={len(rs)}" + (
                f" ({len(bad)} {'/'.join(sorted(set(bad)))})" if bad else ""
            )
            epochs, loss, lo, hi, wall = _aggregate(rs, "train_loss")
            _, acc, acc_lo, acc_hi, _ = _aggregate(rs, "test_accuracy")
            start_losses.append(next((v for v in loss if math.isfinite(v)), math.nan))
            kw = dict(color=colour, linestyle=line, linewidth=1.8, marker="o", markersize=2.5)
            axes[0].plot(epochs, loss, label=legend, **kw)
            axes[0].fill_between(epochs, lo, hi, color=colour, alpha=0.15, linewidth=0)
            t = slice(1, None) if log_time else slice(None)  # time 0 has no place on a log axis
            axes[1].plot(wall[t], loss[t], **kw)
            axes[1].fill_between(wall[t], lo[t], hi[t], color=colour, alpha=0.15, linewidth=0)
            axes[2].plot(wall[t], 100 * acc[t], **kw)
            axes[2].fill_between(
                wall[t], 100 * acc_lo[t], 100 * acc_hi[t], color=colour, alpha=0.15, lw=0
            )
        evaluated = all(r.config.eval_train for rs in by_label.values() for r in rs)
        measured = "whole training set" if evaluated else "running mean over the epoch"
        top = 3 * max((v for v in start_losses if math.isfinite(v)), default=10.0)
        for ax in axes[:2]:
            ax.set_yscale("log")
            ax.set_ylim(top=top)  # diverged runs leave the plot upwards
            ax.set_ylabel(f"training loss (cross-entropy, {measured})")
        axes[0].set_xlabel("epoch")
        for ax in axes[1:]:
            ax.set_xlabel("training time (s" + (", log scale)" if log_time else ")"))
            if log_time:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_seconds))
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[2].set_ylabel("test accuracy (%)")
        finals = [100 * _aggregate(rs, "test_accuracy")[1][-1] for rs in by_label.values() if rs]
        if finals and all(math.isfinite(f) for f in finals):
            low = min(min(finals) - 5, 100 * target - 3 if target else 100)
            high = max(max(finals) + 3, 100 * target + 2 if target else 0)
            axes[2].set_ylim(max(low, 0), min(high, 100))  # the target line stays inside
        axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if target is not None:
            axes[2].axhline(100 * target, color="0.3", linewidth=1, linestyle=":")
            axes[2].annotate(
                f"target {100 * target:g}%",
                (0.02, 100 * target),
                xycoords=("axes fraction", "data"),
                ha="left",
                va="bottom",
                fontsize=9,
                color="0.3",
            )
        axes[0].set_title("loss vs epoch")
        after = " (from epoch 1)" if log_time else ""
        axes[1].set_title("loss vs wall-clock" + after)
        axes[2].set_title("accuracy vs wall-clock" + after)
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            loc="outside right center",
            frameon=False,
            title="optimizer: lr, λ/λ_max (start→end),\nmean cos((F̂+λI)⁻¹g, g), seeds",
        )
        fig.suptitle(f"{title} — mean over seeds, band: min–max", fontsize=12)
    return fig


def step_time_figure(runs_by_model: dict[str, dict[str, list[RunResult]]], title: str):
    """Seconds per epoch per optimizer, split into ``optimizer.step()`` and the rest.

    Returns:
        A matplotlib ``Figure`` with one panel per model.
    """
    n = len(runs_by_model)
    with style():
        bars = max(len(v) for v in runs_by_model.values())
        fig = Figure(figsize=(5.5 * n, max(4.0, 0.45 * bars + 1.6)), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False)
        for ax, (model, by_label) in zip(axes[0], runs_by_model.items()):
            labels = list(by_label)
            step, rest = [], []
            for rs in by_label.values():
                per_run = [
                    (
                        sum(r["step_time_s"] for r in run.rows) / max(run.final["epoch"], 1),
                        (run.final["time_s"] - sum(r["step_time_s"] for r in run.rows))
                        / max(run.final["epoch"], 1),
                    )
                    for run in rs
                ]
                step.append(float(np.mean([p[0] for p in per_run])))
                rest.append(float(np.mean([p[1] for p in per_run])))
            y = np.arange(len(labels))[::-1]
            colors = [color(lbl.split(" ")[0]) for lbl in labels]
            ax.barh(y, rest, color="0.8", label="forward, backward, batching")
            ax.barh(y, step, left=rest, color=colors, label="inside optimizer.step()")
            ax.set_yticks(y, labels)
            ax.set_xlabel("training time per epoch (s)")
            ax.set_title(model)
        handles = [
            Rectangle((0, 0), 1, 1, color="0.8"),
            Rectangle((0, 0), 1, 1, color="0.35"),
        ]
        fig.legend(
            handles,
            ["forward, backward, batching", "inside optimizer.step() (in the optimizer's colour)"],
            loc="outside lower center",
            ncols=2,
            frameon=False,
        )
        fig.suptitle(f"{title} — mean over seeds", fontsize=12)
    return fig
