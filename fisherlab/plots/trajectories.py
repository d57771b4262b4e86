"""Figures along training under the papers' protocols (data of the trajectory analyses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fisherlab.analysis import FigureData
from fisherlab.plots.base import (
    _figure,
    _layer_title,
    _runs_and_median,
    _suptitle,
    color,
    label,
    style,
)

TERM_COLORS = {"structural": "0.35", "estimation": "#e6a141", "staleness": "#5fa8d3"}
"""Colours of the error terms of the decomposition figure."""


def _infos(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {info["layer"]: info for info in meta.get("layers", [])}


def _state_line(data: FigureData) -> str:
    m = data.meta
    opt = m.get("optimizer", "sgd")
    options = m.get("optimizer_options") or {}
    extra = "".join(f", {k} {v}" for k, v in options.items())
    runs = m.get("runs", 1)
    final = f"final: {m.get('final', '?')}"
    if runs > 1:  # the runs' final states: in meta["state"], below the title
        final = f"{runs} training runs (seeds): each thin, median thick"
    epochs = f" for {m['train_epochs']} epochs" if "train_epochs" in m else ""
    return (
        f"trained by {opt} (lr {m.get('lr')}{extra}, batch {m.get('batch_size')}){epochs}; {final}"
    )


def _neff_text(data: FigureData, table: str) -> str:
    """``n_eff`` of the empirical Fisher at the first and the last checkpoint (median of runs)."""
    rows = [r for r in data.tables.get(table, []) if "n_eff" in r]
    if not rows:
        return ""
    steps = sorted({r["step"] for r in rows})
    ends = []
    for step in (steps[0], steps[-1]):
        values = {r.get("run", 0): r["n_eff"] for r in rows if r["step"] == step}
        epoch = next(r["epoch"] for r in rows if r["step"] == step)
        ends.append(f"{np.median(list(values.values())):.0f} at epoch {epoch:.2g}")
    size = data.meta.get("reference", "")
    return f"; effective samples n_eff = (Σ‖j‖²)²/Σ‖j‖⁴ of {size}: {' → '.join(ends)}"


def _by_step(pts: Sequence[dict], key: str) -> tuple[list[float], list[list[float]]]:
    """Epochs of the distinct steps and, per step, the values of ``key`` (one per run)."""
    steps = sorted({r["step"] for r in pts})
    epochs = [next(r["epoch"] for r in pts if r["step"] == s) for s in steps]
    return epochs, [[r[key] for r in pts if r["step"] == s] for s in steps]


def _select(rows: Sequence[dict], **where: Any) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def plot_decomposition(data: FigureData) -> Figure:
    """Error terms (structural, estimation, staleness) and the deployed total, as lines.

    One row per method, one column per layer; x is the epoch of the checkpoint. The terms are
    distances between different pairs of matrices (not an additive split): each is its own
    line. Dashed grey: the structural error after the optimal scalar ``α*`` (shape alone).
    Every training run thin, the median thick.
    """
    rows = data.rows("errors")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    infos = _infos(meta)
    lines = {**TERM_COLORS, "total": "k"}
    names = {"total": "total (what an optimizer holds)"}
    with style():
        fig = _figure(3.4 * len(layers) + 1.6, 2.5 * len(methods) + 1.6)
        axes = fig.subplots(len(methods), len(layers), sharex=True, squeeze=False)
        for i, method in enumerate(methods):
            for j, layer in enumerate(layers):
                ax = axes[i, j]
                pts = _select(rows, layer=layer, method=method)
                for key, c in lines.items():
                    _runs_and_median(ax, pts, key, color=c, label=names.get(key, key))
                if "structural_scaled" in pts[0]:
                    _runs_and_median(ax, pts, "structural_scaled", color="0.35", ls="--",
                                     label="structural after the optimal scalar α*")  # fmt: skip
                if i == 0:
                    ax.set_title(_layer_title(infos[layer]) if layer in infos else f"layer {layer}")
                if j == 0:
                    ax.set_ylabel(f"{label(method)}\nerror / ‖F‖_F (dimensionless)")
                if i == len(methods) - 1:
                    ax.set_xlabel("epoch")
                ax.set_ylim(bottom=0)
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=3, frameon=False)
        _suptitle(
            fig,
            data,
            f"Where the error comes from: {meta['fisher_type']} Fisher of {meta['reference']}; "
            f"batch b = {meta['batch_size']} (mean over {meta['batches']} batches), "
            f"staleness k = {meta['lag']} steps; terms are distances, not a sum\n"
            f"{_state_line(data)}{_neff_text(data, 'errors')}",
        )
    return fig


def plot_ekfac_protocol(data: FigureData) -> Figure:
    """Frobenius error, spectrum distance (log) with a fixed basis, and the Fisher's own scale.

    Top: ``‖F̂ − F‖/‖F‖`` of each series (dotted: the frozen KFAC after the optimal scalar
    ``α*``); middle: spectrum distance; bottom: ``‖F_t‖_F/‖F_0‖_F``, how much the Fisher itself
    has shrunk (what a frozen preconditioner's error grows with). Every run thin, median thick.
    """
    rows = data.rows("curves")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    series = list(dict.fromkeys(r["method"] for r in rows))
    infos = _infos(meta)
    styles = {"kfac": "-", "kfac-trace": "--", "ekfac": "-", "ekfac-ra": "--", "kfac-fresh": ":"}
    names = {
        "kfac": "KFAC frozen at the basis step",
        "kfac-trace": "KFAC frozen × tr F_t / tr K₀ (trace-matched)",
        "ekfac": "EKFAC, that basis, current scalings",
    }
    scaled = "rel_frobenius_scaled" in rows[0]
    with style():
        fig = _figure(3.6 * len(layers) + 1.5, 8.2)
        axes = fig.subplots(3, len(layers), sharex=True, squeeze=False)
        for col, layer in enumerate(layers):
            for row, (key, ylabel) in enumerate(
                (
                    ("rel_frobenius", "‖F̂ − F‖_F / ‖F‖_F"),
                    ("spectrum_distance", "‖λ(F̂) − λ(F)‖₂ / ‖λ(F)‖₂"),
                )
            ):
                ax = axes[row, col]
                for s in series:
                    if key not in rows[0]:
                        continue
                    pts = _select(rows, layer=layer, method=s)
                    _runs_and_median(ax, pts, key, ls=styles.get(s, "-"), color=color(s),
                                     label=names.get(s, label(s)))  # fmt: skip
                if row == 0 and scaled:
                    pts = _select(rows, layer=layer, method="kfac")
                    _runs_and_median(ax, pts, "rel_frobenius_scaled", ls=":", color="0.3",
                                     label="KFAC frozen × α* (optimal scalar)")  # fmt: skip
                ax.set_yscale("log")
                if row == 0:
                    ax.set_title(_layer_title(infos[layer]) if layer in infos else f"layer {layer}")
                if col == 0:
                    ax.set_ylabel(f"{ylabel}\n(dimensionless)")
            ax = axes[2, col]
            if "fisher_norm_ratio" in rows[0]:
                pts = _select(rows, layer=layer, method=series[0])
                _runs_and_median(ax, pts, "fisher_norm_ratio", color="k",
                                 label="‖F_t‖_F / ‖F_0‖_F")  # fmt: skip
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("‖F_t‖_F / ‖F_0‖_F\n(the Fisher's own scale)")
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=3, frameon=False)
        _suptitle(
            fig,
            data,
            f"EKFAC Fig. 3 right / 5c protocol: {meta['fisher_type']} Fisher of the "
            f"{meta['reference']}; KFE basis and KFAC factors {meta['basis']}\n"
            f"{_state_line(data)}{_neff_text(data, 'curves')}",
        )
    return fig


def plot_fngd(data: FigureData) -> Figure:
    """Cosine to the fresh natural gradient: shared weights, permuted weights, plain gradient.

    One row per damping ``δ``, one column per layer (and the whole network); x: epoch. Each
    training run thin (median over the evaluated positions), the median over runs thick.
    """
    rows = data.rows("cosines")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    dampings = list(dict.fromkeys(r["damping"] for r in rows))
    keys = [k for k in ("shared", "permuted", "gradient") if k in rows[0]]
    shades = {"shared": "#0072b2", "permuted": "#e69f00", "gradient": "0.3"}
    names = {
        "shared": "epoch-0 weights, shared (FNGD)",
        "permuted": "epoch-0 weights, randomly permuted (control)",
        "gradient": "plain gradient",
    }
    styles = {"shared": "-", "permuted": "--", "gradient": ":"}
    with style():
        fig = _figure(2.9 * len(layers) + 1.2, 2.2 * len(dampings) + 1.6)
        axes = fig.subplots(len(dampings), len(layers), sharex=True, sharey=True, squeeze=False)
        for i, d in enumerate(dampings):
            for j, layer in enumerate(layers):
                ax = axes[i, j]
                pts = _select(rows, layer=layer, damping=d)
                for key in keys:
                    _runs_and_median(ax, pts, key, color=shades[key], ls=styles[key],
                                     label=names[key])  # fmt: skip
                if i == 0:
                    ax.set_title("whole network" if layer == "network" else f"layer {layer}")
                if j == 0:
                    ax.set_ylabel(f"δ = {d:g}\ncosine to fresh NG\n(dimensionless)")
                if i == len(dampings) - 1:
                    ax.set_xlabel("epoch (weights from epoch 0)")
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=3, frameon=False)
        _suptitle(
            fig,
            data,
            "FNGD's hypothesis: epoch-0 coefficients reused vs the fresh natural gradient of "
            f"the same batch (empirical Fisher, {data.meta['damping_mode']})\n"
            f"{_state_line(data)}{_neff_text(data, 'cosines')}",
        )
    return fig


def plot_block_diagonal(data: FigureData) -> Figure:
    """Block-diagonal inverse vs the whole network's ``(F+λI)⁻¹``: error and cosine vs damping.

    Right: the block-diagonal natural gradient's cosine to exact NGD (solid) and the plain
    gradient's (dashed, the baseline). Each training run thin, the median thick.
    """
    rows = data.rows("errors")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    palette = {layer: f"C{i}" for i, layer in enumerate(layers)}
    palette["network"] = "k"
    with style():
        fig = _figure(11.0, 4.0)
        axes = fig.subplots(1, 2)
        for layer in layers:
            pts = _select(rows, layer=layer)
            name = "whole network" if layer == "network" else f"layer {layer} (P={pts[0]['P']})"
            x = "relative_damping"
            _runs_and_median(axes[0], pts, "inverse_error", x=x, color=palette[layer], label=name)
            _runs_and_median(axes[1], pts, "cosine", x=x, color=palette[layer], label=name)
            if "gradient_cosine" in pts[0]:
                _runs_and_median(axes[1], pts, "gradient_cosine", x=x, color=palette[layer],
                                 ls="--", label=f"{name}: plain gradient")  # fmt: skip
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("damping λ / λ_max(F)")
        axes[0].set_title("‖[(F+λI)⁻¹]_ll − (F_ll+λI)⁻¹‖ / ‖[(F+λI)⁻¹]_ll‖")
        axes[0].set_ylabel("inverse error (dimensionless)")
        axes[1].set_title("cosine to exact NGD: block-diagonal (solid), gradient (dashed)")
        axes[1].set_ylabel("cosine (dimensionless)")
        axes[1].legend(frameon=False, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        _suptitle(
            fig,
            data,
            f"TENGraD's block-diagonal approximation vs exact NGD ({meta['fisher_type']} Fisher "
            f"of {meta['reference']})\noff-diagonal energy ‖F−bdiag F‖²/‖F‖² = "
            f"{meta['offdiagonal_energy']:.2f}",
        )
    return fig


def _band(ax, x, values, **kw) -> None:
    """Each value thin (points), the median thick (one list of values per x)."""
    for xi, v in zip(x, values):
        ax.plot([xi] * len(v), v, ls="", marker=".", ms=2, alpha=0.35, color=kw.get("color"))
    ax.plot(x, [np.median(v) for v in values], marker="o", ms=3, lw=1.8, **kw)


def plot_batch_size(data: FigureData) -> Figure:
    """Error (top) and direction cosine (bottom) of batch-built blocks vs the batch size.

    Points: each batch; line: the median over batches. Bottom, dashed: the plain gradient's
    cosine (the baseline); top, dotted: each method after the optimal scalar ``α*``.
    """
    rows = data.rows("sweep")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "gradient"]
    names = {"exact": "exact batch block (TENGraD)"}
    with style():
        fig = _figure(3.4 * len(layers) + 1.6, 5.8)
        axes = fig.subplots(2, len(layers), sharex=True, squeeze=False)
        for col, layer in enumerate(layers):
            for method in methods:
                pts = _select(rows, layer=layer, method=method)
                sizes = sorted({r["batch_size"] for r in pts})
                for row, key in enumerate(("rel_frobenius", "cosine")):
                    # on the log axis, the whole set's own exact block (error 0) is left out
                    keep = [b for b in sizes if row or any(
                        r[key] > 1e-6 for r in pts if r["batch_size"] == b)]  # fmt: skip
                    values = [
                        [r[key] for r in pts if r["batch_size"] == b and (row or r[key] > 1e-6)]
                        for b in keep
                    ]
                    _band(axes[row, col], keep, values, color=color(method),
                          label=names.get(method, label(method)))  # fmt: skip
                if "rel_frobenius_scaled" in pts[0]:
                    med = [
                        np.median([r["rel_frobenius_scaled"] for r in pts if r["batch_size"] == b])
                        for b in sizes
                    ]
                    shown = [(b, v) for b, v in zip(sizes, med) if v > 1e-6]
                    axes[0, col].plot(*zip(*shown), ls=":", lw=1.2, color=color(method))
            base = _select(rows, layer=layer, method="gradient")
            if base:
                sizes = sorted({r["batch_size"] for r in base})
                axes[1, col].plot(sizes, [r["cosine"] for r in base], ls="--", color="0.3",
                                  label="plain gradient (F̂ = 0)")  # fmt: skip
            axes[0, col].set_title(f"layer {layer}")
            axes[0, col].set_yscale("log")
            axes[1, col].set_xscale("log")
            axes[1, col].set_xlabel("batch size (log)")
        axes[0, 0].set_ylabel(
            "‖F̂_b − F‖_F / ‖F‖_F (log; dotted:\nafter optimal scalar α*; whole set's\n"
            "exact block = 0, not drawn)"
        )
        axes[1, 0].set_ylabel("cos((F̂_b+λI)⁻¹g, (F+λI)⁻¹g)\n(dimensionless)")
        handles, labels_ = axes[1, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=4, frameon=False)
        _suptitle(
            fig,
            data,
            f"Built from one batch vs the {meta['fisher_type']} Fisher F of {meta['reference']}"
            f" (points: up to {meta['repeats']} disjoint batches per size; line: median); λ = "
            f"{meta['relative_damping']:g}·tr(F)/P, g = the reference loss gradient\n"
            f"{meta.get('state', '')}",
        )
    return fig


def plot_spatial(data: FigureData) -> Figure:
    """SKFAC's error vs the spatial samples ``s'``, with reduce-sum and expand as lines."""
    rows = data.rows("sweep")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    with style():
        fig = _figure(3.8 * len(layers) + 1.4, 3.6)
        axes = fig.subplots(1, len(layers), squeeze=False)[0]
        for ax, layer in zip(axes, layers):
            for source, ls in (("reference", "-"), ("batch", "--")):
                pts = _select(rows, layer=layer, source=source)
                sub = sorted({r["spatial_samples"] for r in pts if r["spatial_samples"] > 0})
                values = [
                    [r["rel_frobenius"] for r in pts if r["spatial_samples"] == s] for s in sub
                ]
                what = "all data" if source == "reference" else f"batch of {meta['batch_size']}"
                _band(ax, sub, values, color=color("skfac"), ls=ls,
                      label=f"SKFAC subsampling, {what}")  # fmt: skip
                for count, method in ((0, "skfac"), (-1, "kfac")):
                    v = np.mean([r["rel_frobenius"] for r in pts if r["spatial_samples"] == count])
                    name = "SKFAC reduce-sum" if count == 0 else "KFAC expand"
                    ax.axhline(v, ls=ls, color=color(method) if count else "0.3", lw=1.2,
                               label=f"{name}, {what}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("spatial samples s′ per image")
            ax.set_title(f"layer {layer} (conv)")
        axes[0].set_ylabel("‖F̂ − F‖_F / ‖F‖_F\n(dimensionless)")
        handles, labels_ = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside right center", frameon=False, fontsize=7)
        _suptitle(
            fig,
            data,
            f"SKFAC: spatial subsampling vs reduce-sum vs expand, against the {meta['fisher_type']}"
            f" Fisher of {meta['reference']}\n{meta.get('state', '')}",
        )
    return fig


def plot_fisher_types(data: FigureData) -> Figure:
    """Distance of MC and empirical Fisher to the true one (top); KFAC's error under each."""
    rows = data.rows("types")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    kinds = list(dict.fromkeys(r["fisher_type"] for r in rows))
    shade = {"true": "0.15", "mc": "#cc79a7", "empirical": "#56b4e9"}
    with style():
        fig = _figure(3.4 * len(layers) + 1.6, 5.4)
        axes = fig.subplots(2, len(layers), sharex=True, squeeze=False)
        for col, layer in enumerate(layers):
            for kind in kinds:
                pts = _select(rows, layer=layer, fisher_type=kind)
                if kind != "true":
                    _runs_and_median(axes[0, col], pts, "to_true", color=shade[kind],
                                     label=f"{kind} Fisher")  # fmt: skip
                _runs_and_median(axes[1, col], pts, "kfac", color=shade[kind],
                                 label=f"{kind} Fisher")  # fmt: skip
            axes[0, col].set_title(f"layer {layer}")
            axes[1, col].set_xlabel("epoch")
            axes[0, col].set_ylim(bottom=0)
            axes[1, col].set_ylim(bottom=0)
        axes[0, 0].set_ylabel("‖F_type − F_true‖ / ‖F_true‖\n(dimensionless)")
        axes[1, 0].set_ylabel("KFAC: ‖F̂ − F_type‖ / ‖F_type‖\n(dimensionless)")
        handles, labels_ = axes[1, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=3, frameon=False)
        m = data.meta
        _suptitle(
            fig,
            data,
            f"True vs Monte-Carlo ({m['mc_samples']} label per input) vs empirical Fisher of "
            f"{m['reference']}, same checkpoints\n{_state_line(data)}{_neff_text(data, 'types')}",
        )
    return fig


__all__ = [
    "plot_batch_size",
    "plot_block_diagonal",
    "plot_decomposition",
    "plot_ekfac_protocol",
    "plot_fisher_types",
    "plot_fngd",
    "plot_spatial",
]
