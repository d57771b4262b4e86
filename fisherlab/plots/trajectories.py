"""Figures along training under the papers' protocols (data of the trajectory analyses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from fisherlab.analysis import FigureData
from fisherlab.plots.base import _figure, _layer_title, _suptitle, color, label, style

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
        final = f"{runs} training runs (seeds), bands over them"
    epochs = f" for {m['train_epochs']} epochs" if "train_epochs" in m else ""
    return (
        f"trained by {opt} (lr {m.get('lr')}{extra}, batch {m.get('batch_size')}){epochs}; {final}"
    )


def _by_step(pts: Sequence[dict], key: str) -> tuple[list[float], list[list[float]]]:
    """Epochs of the distinct steps and, per step, the values of ``key`` (one per run)."""
    steps = sorted({r["step"] for r in pts})
    epochs = [next(r["epoch"] for r in pts if r["step"] == s) for s in steps]
    return epochs, [[r[key] for r in pts if r["step"] == s] for s in steps]


def _select(rows: Sequence[dict], **where: Any) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def plot_decomposition(data: FigureData) -> Figure:
    """Stacked error terms (structural, estimation, staleness) over training; total as a line.

    One row per method, one column per layer; x is the epoch of the checkpoint.
    """
    rows = data.rows("errors")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    infos = _infos(meta)
    with style():
        fig = _figure(3.4 * len(layers) + 1.6, 2.5 * len(methods) + 1.4)
        axes = fig.subplots(len(methods), len(layers), sharex=True, squeeze=False)
        for i, method in enumerate(methods):
            for j, layer in enumerate(layers):
                ax = axes[i, j]
                pts = _select(rows, layer=layer, method=method)
                x, _ = _by_step(pts, "total")
                terms = [np.array([np.mean(v) for v in _by_step(pts, t)[1]]) for t in TERM_COLORS]
                ax.stackplot(
                    x,
                    *terms,
                    colors=list(TERM_COLORS.values()),
                    labels=list(TERM_COLORS),
                    alpha=0.85,
                )
                total = [np.array(v) for v in _by_step(pts, "total")[1]]
                sd = [np.array(v) for v in _by_step(pts, "total_sd")[1]]
                mean = np.array([v.mean() for v in total])
                low = np.array([(v - s).min() for v, s in zip(total, sd)])
                high = np.array([(v + s).max() for v, s in zip(total, sd)])
                ax.plot(x, mean, color="k", lw=1.6, marker="o", ms=3, label="total (deployed)")
                ax.fill_between(x, low, high, color="k", alpha=0.15, lw=0)
                if i == 0:
                    ax.set_title(_layer_title(infos[layer]) if layer in infos else f"layer {layer}")
                if j == 0:
                    ax.set_ylabel(f"{label(method)}\nerror / ‖F‖_F (dimensionless)")
                if i == len(methods) - 1:
                    ax.set_xlabel("epoch")
                ax.set_ylim(bottom=0)
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=4, frameon=False)
        _suptitle(
            fig,
            data,
            f"Where the error comes from: {meta['fisher_type']} Fisher of {meta['reference']}; "
            f"batch b = {meta['batch_size']} (band: sd over {meta['batches']} batches), "
            f"staleness k = {meta['lag']} steps\n{_state_line(data)}",
        )
    return fig


def plot_ekfac_protocol(data: FigureData) -> Figure:
    """Frobenius error (top, log) and spectrum distance (bottom, log) with a fixed basis."""
    rows = data.rows("curves")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    series = list(dict.fromkeys(r["method"] for r in rows))
    infos = _infos(meta)
    styles = {"kfac": "-", "ekfac": "-", "ekfac-ra": "--", "kfac-fresh": ":"}
    names = {
        "kfac": "KFAC, factors from the basis step",
        "ekfac": "EKFAC, that basis, current scalings",
    }
    with style():
        fig = _figure(3.6 * len(layers) + 1.5, 5.8)
        axes = fig.subplots(2, len(layers), sharex=True, squeeze=False)
        for col, layer in enumerate(layers):
            for row, (key, ylabel) in enumerate(
                (
                    ("rel_frobenius", "‖F̂ − F‖_F / ‖F‖_F"),
                    ("spectrum_distance", "‖λ(F̂) − λ(F)‖₂ / ‖λ(F)‖₂"),
                )
            ):
                ax = axes[row, col]
                for s in series:
                    x, values = _by_step(_select(rows, layer=layer, method=s), key)
                    _band(ax, x, values, ls=styles.get(s, "-"), color=color(s),
                          label=names.get(s, label(s)))  # fmt: skip
                ax.set_yscale("log")
                if row == 0:
                    ax.set_title(_layer_title(infos[layer]) if layer in infos else f"layer {layer}")
                else:
                    ax.set_xlabel("epoch")
                if col == 0:
                    ax.set_ylabel(f"{ylabel}\n(dimensionless)")
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=len(series), frameon=False)
        _suptitle(
            fig,
            data,
            f"EKFAC Fig. 3 right / 5c protocol: {meta['fisher_type']} Fisher of the "
            f"{meta['reference']}; KFE basis and KFAC factors {meta['basis']}\n"
            f"{_state_line(data)}",
        )
    return fig


def plot_fngd(data: FigureData) -> Figure:
    """Cosine to the fresh natural gradient: shared weights (solid) vs plain gradient (dashed).

    One panel per layer (and the whole network); colour: damping ``δ``; x: epoch; bands: ± sd
    over the evaluated positions within an epoch.
    """
    rows = data.rows("cosines")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    dampings = list(dict.fromkeys(r["damping"] for r in rows))
    cmap = mpl.colormaps["viridis"]
    shades = {d: cmap(i / max(len(dampings) - 1, 1) * 0.85) for i, d in enumerate(dampings)}
    with style():
        fig = _figure(3.1 * len(layers) + 1.8, 3.4)
        axes = fig.subplots(1, len(layers), sharey=True, squeeze=False)[0]
        for ax, layer in zip(axes, layers):
            for d in dampings:
                for key, ls in (("shared", "-"), ("gradient", "--")):
                    pts = _select(rows, layer=layer, damping=d)
                    epochs = sorted({r["epoch"] for r in pts})
                    vals = [np.array([r[key] for r in pts if r["epoch"] == e]) for e in epochs]
                    mean = np.array([v.mean() for v in vals])
                    sd = np.array([v.std() for v in vals])
                    name = "shared weights" if key == "shared" else "plain gradient"
                    ax.plot(epochs, mean, ls=ls, marker="o", ms=3, color=shades[d],
                            label=f"{name}, δ = {d:g}")  # fmt: skip
                    ax.fill_between(epochs, mean - sd, mean + sd, color=shades[d], alpha=0.12)
            ax.set_title("whole network" if layer == "network" else f"layer {layer}")
            ax.set_xlabel("epoch (weights from epoch 0)")
        axes[0].set_ylabel("cosine to the fresh natural gradient\n(dimensionless)")
        handles, labels_ = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside right center", frameon=False, fontsize=7)
        _suptitle(
            fig,
            data,
            "FNGD's hypothesis: epoch-0 coefficients reused vs the fresh natural gradient of "
            f"the same batch (empirical Fisher, {data.meta['damping_mode']})\n"
            f"{_state_line(data)}",
        )
    return fig


def plot_block_diagonal(data: FigureData) -> Figure:
    """Block-diagonal inverse vs the whole network's ``(F+λI)⁻¹``: error and cosine vs damping."""
    rows = data.rows("errors")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    with style():
        fig = _figure(11.0, 3.8)
        axes = fig.subplots(1, 2)
        for layer in layers:
            pts = _select(rows, layer=layer)
            kw = {"color": "k", "lw": 2.0} if layer == "network" else {}
            name = "whole network" if layer == "network" else f"layer {layer} (P={pts[0]['P']})"
            x = [r["relative_damping"] for r in pts]
            axes[0].plot(x, [r["inverse_error"] for r in pts], marker="o", ms=3, label=name, **kw)
            axes[1].plot(x, [r["cosine"] for r in pts], marker="o", ms=3, label=name, **kw)
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("damping λ / (tr F / P)")
        axes[0].set_title("‖[(F+λI)⁻¹]_ll − (F_ll+λI)⁻¹‖ / ‖[(F+λI)⁻¹]_ll‖")
        axes[0].set_ylabel("inverse error (dimensionless)")
        axes[1].set_title("natural gradient: block-diagonal vs whole network")
        axes[1].set_ylabel("cosine (dimensionless)")
        axes[1].legend(frameon=False, fontsize=7)
        _suptitle(
            fig,
            data,
            f"TENGraD's block-diagonal approximation vs exact NGD ({meta['fisher_type']} Fisher "
            f"of {meta['reference']})\noff-diagonal energy ‖F−bdiag F‖²/‖F‖² = "
            f"{meta['offdiagonal_energy']:.2f}",
        )
    return fig


def _band(ax, x, values, **kw) -> None:
    """Mean line with a band from the smallest to the largest of ``values`` (one list per x)."""
    mean = np.array([np.mean(v) for v in values])
    low = np.array([np.min(v) for v in values])
    high = np.array([np.max(v) for v in values])
    ax.plot(x, mean, marker="o", ms=3, **kw)
    ax.fill_between(x, low, high, color=kw.get("color"), alpha=0.15, lw=0)


def plot_batch_size(data: FigureData) -> Figure:
    """Error (top) and direction cosine (bottom) of batch-built blocks vs the batch size."""
    rows = data.rows("sweep")
    meta = data.meta
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    names = {"exact": "exact batch block (TENGraD)"}
    with style():
        fig = _figure(3.4 * len(layers) + 1.6, 5.6)
        axes = fig.subplots(2, len(layers), sharex=True, squeeze=False)
        for col, layer in enumerate(layers):
            for method in methods:
                pts = _select(rows, layer=layer, method=method)
                sizes = sorted({r["batch_size"] for r in pts})
                for row, key in enumerate(("rel_frobenius", "cosine")):
                    values = [[r[key] for r in pts if r["batch_size"] == b] for b in sizes]
                    _band(axes[row, col], sizes, values, color=color(method),
                          label=names.get(method, label(method)))  # fmt: skip
            axes[0, col].set_title(f"layer {layer}")
            axes[0, col].set_yscale("symlog", linthresh=1e-2)
            axes[0, col].set_ylim(bottom=0)
            axes[1, col].set_xscale("log")
            axes[1, col].set_xlabel("batch size (log)")
        axes[0, 0].set_ylabel("‖F̂_b − F‖_F / ‖F‖_F\n(dimensionless, symlog)")
        axes[1, 0].set_ylabel("cos((F̂_b+λI)⁻¹g, (F+λI)⁻¹g)\n(dimensionless)")
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=len(methods), frameon=False)
        _suptitle(
            fig,
            data,
            f"Built from one batch vs the {meta['fisher_type']} Fisher F of {meta['reference']}"
            f" (bands: range over {meta['repeats']} disjoint batches); λ = "
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
                    _band(axes[0, col], *_by_step(pts, "to_true"), color=shade[kind],
                          label=f"{kind} Fisher")  # fmt: skip
                _band(axes[1, col], *_by_step(pts, "kfac"), color=shade[kind],
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
            f"{m['reference']}, same checkpoints\n{_state_line(data)}",
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
