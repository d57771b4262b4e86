"""Figures of one model state: heatmaps, errors, spectra, correlations, directions."""

from __future__ import annotations

import math

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure

from fisherlab.analysis import FigureData, rows_to_matrices
from fisherlab.plots.base import (
    FISHER_UNITS,
    _figure,
    _grid,
    _layer_title,
    _runs_and_median,
    _suptitle,
    color,
    label,
    linestyle,
    marker,
    style,
    symlog_colorbar,
)


# ------------------------------------------------------------------------------- heatmaps
def _summary_text(summary: list[dict]) -> str:
    """The controls of the heatmaps as a small table, baselines first."""
    if "whitened_error" not in summary[0]:
        return "errors: relative Frobenius\n‖(F̂+λI)⁻¹ − (F+λI)⁻¹‖/‖(F+λI)⁻¹‖"
    names = {"zero": "F̂=0 (I/λ)", "identity": "(trF/P)·I", "woodbury": "TENGraD"}
    runs = len({r.get("run", 0) for r in summary})
    lines = [f"median of {runs} run(s)", "method      white.  cos   paper", "-" * 33]
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for method in sorted(methods, key=lambda m: m not in names):
        pts = [r for r in summary if r["method"] == method]

        def med(key: str, pts: list[dict] = pts) -> float:
            return float(np.median([r[key] for r in pts]))

        name = names.get(method, label(method))[:11]
        lines.append(
            f"{name:<11} {med('whitened_error'):6.2g} {med('direction_cosine'):5.2f} "
            f"{med('rel_frobenius_inverse'):5.2f}"
        )
    return (
        "\n".join(lines)
        + "\n\nwhite.: ‖E^-½(F̂+λI)⁻¹E^-½ − I‖/√P,\n  E the exact inverse (0 = exact)"
        + "\ncos: to the layer's part of the\n  exact damped natural gradient"
        + "\npaper: ‖(F̂+λI)⁻¹ − E‖/‖E‖, which\n  the I/λ baseline can win"
    )


def plot_block_heatmaps(data: FigureData, quantile: float = 0.5) -> Figure:
    """Damped inverse blocks ``(F̂+λI)⁻¹`` (top) and their differences to the exact one (bottom).

    Symmetric-log colour maps (``SymLogNorm``), so that the diagonal (about ``1/λ``) and the
    much smaller off-diagonal structure both show: the blocks share one scale up to the largest
    ``|exact|`` entry, linear below the ``quantile`` of ``|exact|``; the differences share a
    second one (same rule over all differences). Axes are parameter indices (weight row-major,
    then bias); colours are in ``param²/nats``.
    """
    matrices = rows_to_matrices(data.rows("inverse"))
    summary = {r["method"]: r for r in data.rows("summary") if r.get("run", 0) == 0}
    exact = matrices.pop("exact").numpy()
    names = list(matrices)
    diffs = {n: matrices[n].numpy() - exact for n in names}
    vmax = float(np.abs(exact).max()) or 1.0
    vlin = float(np.quantile(np.abs(exact), quantile)) or vmax * 1e-3
    stacked = np.abs(np.stack(list(diffs.values())))
    dmax = float(stacked.max()) or vmax
    dlin = float(np.quantile(stacked, quantile)) or dmax * 1e-3
    block_norm = SymLogNorm(vlin, vmin=-vmax, vmax=vmax, base=10)
    diff_norm = SymLogNorm(dlin, vmin=-dmax, vmax=dmax, base=10)
    meta = data.meta
    cmap = "RdBu_r"
    with style():
        fig = _figure(2.5 * (len(names) + 1) + 1.2, 5.9)
        axes = fig.subplots(2, len(names) + 1, sharex=True, sharey=True)
        top = [("exact", exact)] + [(n, matrices[n].numpy()) for n in names]
        image = diff_image = None
        for ax, (name, m) in zip(axes[0], top):
            image = ax.imshow(m, cmap=cmap, norm=block_norm)
            title = label(name)
            if name != "exact":
                title += f"\nblock error {summary[name]['rel_frobenius_block']:.2g}"
            ax.set_title(title)
        for ax, name in zip(axes[1, 1:], names):
            diff_image = ax.imshow(diffs[name], cmap=cmap, norm=diff_norm)
            r = summary[name]
            if "whitened_error" in r:
                ax.set_title(f"{label(name)} − exact\nwhitened {r['whitened_error']:.2g}, "
                             f"cos {r['direction_cosine']:.2f}")  # fmt: skip
            else:
                ax.set_title(
                    f"{label(name)} − exact\ninverse error {r['rel_frobenius_inverse']:.2g}"
                )
        axes[1, 0].set_axis_off()
        axes[1, 0].text(
            -0.1,
            0.5,
            _summary_text(data.rows("summary")),
            transform=axes[1, 0].transAxes,
            va="center",
            fontsize=6.5,
            family="monospace",
        )
        for ax in axes.ravel():
            ax.grid(False)
        axes[0, 0].set_ylabel("parameter index")
        axes[1, 1].set_ylabel("parameter index")
        for ax in axes[1, 1:]:
            ax.set_xlabel("parameter index")
        axes[0, 0].set_xlabel("parameter index")
        axes[0, 0].xaxis.set_tick_params(labelbottom=True)
        symlog_colorbar(fig, image, axes[0], "entry [param²/nats], symlog", vlin, vmax,
                        shrink=0.9)  # fmt: skip
        symlog_colorbar(fig, diff_image, axes[1], "difference [param²/nats], symlog", dlin, dmax,
                        shrink=0.9)  # fmt: skip
        shown = meta["shown"]
        crop = "" if shown == meta["P"] else f", leading {shown}×{shown} sub-block"
        _suptitle(
            fig,
            data,
            f"Damped inverse Fisher block (F̂ + λI)⁻¹, {_layer_title(meta)}{crop}\n"
            f"λ = {meta['damping']:.2g} {FISHER_UNITS}, {meta['fisher_type']} Fisher of "
            f"{meta['batch_size']} samples; exact = "
            + (
                "the layer's block of the whole network's (F + λI)⁻¹ (exact NGD)"
                if meta.get("reference") == "network"
                else "(F_ll + λI)⁻¹ of the layer's block"
            )
            + f"\n{meta.get('state', '')}; parameter order: weight row-major, then bias",
        )
    return fig


# ------------------------------------------------------------------------------ Frobenius
def plot_frobenius(data: FigureData) -> Figure:
    """Relative Frobenius error per layer (x) and method (colour): the median and every point."""
    rows = data.rows("errors")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = {r["layer"]: r["P"] for r in rows}
    x = [f"{r['layer']} (P={sizes[r['layer']]})" for r in rows]
    hue = [label(r["method"]) for r in rows]
    y = [r["rel_frobenius"] for r in rows]
    palette = {label(m): color(m) for m in methods}
    order = [f"{n} (P={sizes[n]})" for n in layers]
    with style():
        fig = _figure(1.6 + 1.5 * len(layers), 3.6)
        ax = fig.add_subplot()
        common = dict(x=x, y=y, hue=hue, order=order, hue_order=list(palette), ax=ax)
        sns.barplot(**common, palette=palette, estimator="median", errorbar=None, alpha=0.75)
        # seaborn jitters with numpy's legacy global generator: seed it, so that redrawing from
        # saved data gives the same picture, and restore the user's state afterwards
        state = np.random.get_state()  # noqa: NPY002
        np.random.seed(0)  # noqa: NPY002
        try:
            sns.stripplot(
                **common,
                palette=palette,
                dodge=True,
                size=3,
                linewidth=0.5,
                edgecolor="0.15",
                legend=False,
                jitter=0.15,
            )
        finally:
            np.random.set_state(state)  # noqa: NPY002
        ax.set_xlabel("layer (module name, parameters P)")
        ax.set_ylabel("‖F̂ − F‖_F / ‖F‖_F (dimensionless)")
        ax.set_ylim(0, max(1.05, max(y) * 1.08))
        ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        m = data.meta
        _suptitle(
            fig,
            data,
            f"Relative Frobenius error of each block approximation ({m['fisher_type']} Fisher; "
            "reference: exact block of the same batch)\n"
            f"bars: median over {m['models']} seeds × {m['batches']} batches of "
            f"{m['batch_size']}; dots: each",
        )
    return fig


# -------------------------------------------------------------------------------- spectra
def plot_spectra(data: FigureData, floor: float = 1e-10) -> Figure:
    """Sorted eigenvalues (log scale) of the exact block and each approximation, per layer.

    Eigenvalues below ``floor`` times the layer's largest exact eigenvalue are not drawn (the
    exact block has rank at most ``R·N``).
    """
    rows = data.rows("eigenvalues")
    infos = data.meta["layers"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    distance = {(r["layer"], r["method"]): r["spectrum_distance"] for r in data.rows("distance")}
    n_rows, n_cols = _grid(len(infos), 3)
    with style():
        fig = _figure(3.6 * n_cols + 1.6, 3.2 * n_rows + 0.5)
        axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
        for ax, info in zip(axes, infos):
            name = info["layer"]
            top = max(
                r["eigenvalue"] for r in rows if r["layer"] == name and r["method"] == "exact"
            )
            for method in methods:
                values = np.array(
                    [r["eigenvalue"] for r in rows if r["layer"] == name and r["method"] == method]
                )
                keep = values > floor * top
                idx = np.arange(1, len(values) + 1)[keep]
                text = label(method)
                if (name, method) in distance:
                    text += f" ({distance[name, method]:.2g})"
                ax.plot(
                    idx,
                    values[keep],
                    color=color(method),
                    lw=2.2 if method == "exact" else 1.2,
                    ls=linestyle(method),
                    marker=marker(method),
                    markevery=0.1,
                    ms=4,
                    label=text,
                    zorder=3 if method == "exact" else 2,
                )
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_title(_layer_title(info))
            ax.set_xlabel("eigenvalue rank i (descending)")
            ax.set_ylabel(f"eigenvalue λ_i [{FISHER_UNITS}]")
            ax.legend(title="method (spectrum distance)", loc="lower left", frameon=True)
        for ax in axes[len(infos) :]:
            ax.axis("off")
        m = data.meta
        _suptitle(
            fig,
            data,
            f"Eigenspectra of the Fisher blocks ({m['fisher_type']} Fisher of {m['batch_size']} "
            f"samples: rank ≤ {m.get('rank_bound', '?')}); in brackets: ‖λ(F) − λ(F̂)‖₂ / "
            "‖λ(F)‖₂",
        )
    return fig


# -------------------------------------------------------------------- sample correlation
def plot_sample_correlations(data: FigureData) -> Figure:
    """Per-sample gradient correlation matrices per layer, and the layers' pairwise similarity.

    Samples are sorted by label (class boundaries marked on the axes); colour: correlation
    (−1 … 1). The last panel: Pearson correlation between the off-diagonal entries of two
    layers' matrices.
    """
    matrices = rows_to_matrices(data.rows("correlation"), key="layer")
    infos = data.meta["layers"]
    labels = np.array([r["label"] for r in data.rows("labels")])
    classes = list(dict.fromkeys(labels.tolist()))
    centres = [float(np.flatnonzero(labels == c).mean()) for c in classes]
    bounds = [i - 0.5 for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    sim = data.rows("similarity")
    names = [info["layer"] for info in infos]
    table = np.array(
        [
            [
                next(r["pearson"] for r in sim if r["layer_a"] == a and r["layer_b"] == b)
                for b in names
            ]
            for a in names
        ]
    )
    n = len(names)
    with style():
        fig = _figure(3.2 * (n + 1) + 0.6, 3.7)
        axes = fig.subplots(1, n + 1)
        image = None
        for ax, info in zip(axes, infos):
            image = ax.imshow(matrices[info["layer"]].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(_layer_title(info))
            ax.set_xticks(centres, [str(c) for c in classes])
            ax.set_yticks(centres, [str(c) for c in classes])
            ax.tick_params(length=0)
            ax.grid(False)
            for b in bounds:
                ax.axhline(b, color="0.3", lw=0.3)
                ax.axvline(b, color="0.3", lw=0.3)
            source = data.meta.get("source") or {}
            what = "digit" if source.get("data", "digits") == "digits" else "class"
            ax.set_xlabel(f"sample, grouped by {what}")
            ax.set_ylabel(f"sample, grouped by {what}")
        fig.colorbar(
            image,
            ax=axes[:n],
            shrink=0.85,
            label="correlation of per-sample gradients (dimensionless)",
        )
        ax = axes[n]
        sns.heatmap(
            table,
            ax=ax,
            vmin=-1,
            vmax=1,
            cmap="RdBu_r",
            annot=True,
            fmt=".2f",
            square=True,
            cbar=False,
            xticklabels=names,
            yticklabels=names,
        )
        ax.set_title("similarity of the layers' matrices\n(Pearson r of off-diagonal entries)")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.tick_params(axis="y", labelrotation=0)
        m = data.meta
        _suptitle(
            fig,
            data,
            f"Per-sample gradient correlation per layer ({m['fisher_type']} Fisher rows: "
            f"one gradient per sample, batch {m['batch_size']})",
        )
    return fig


# ---------------------------------------------------------------------- KFE decorrelation
def plot_kfe_correlation(data: FigureData) -> Figure:
    """|correlation| of the exact block in the parameter basis and in the KFE, and per layer.

    Left: parameter basis (Kronecker order, weight row-major with the bias column last in each
    row). Middle: KFE coordinates sorted by decreasing EKFAC scaling. Right: mean absolute
    off-diagonal correlation of every layer in both bases.
    """
    matrices = rows_to_matrices(data.rows("correlation"), key="basis")
    summary = data.rows("summary")
    meta = data.meta
    masked = meta.get("masked", {})
    cmap = mpl.colormaps["rocket_r"].with_extremes(bad="0.75")
    with style():
        fig = _figure(12.5, 4.1)
        fig.get_layout_engine().set(wspace=0.06)
        axes = fig.subplots(1, 3, width_ratios=[1, 1, 0.9])
        image = None
        titles = {
            "parameter": "parameter basis vec_r([W | b])",
            "kfe": "Kronecker-factored eigenbasis (KFE)\nsorted by decreasing EKFAC scaling s",
        }
        for ax, basis in zip(axes[:2], ("parameter", "kfe")):
            image = ax.imshow(matrices[basis].abs().numpy(), cmap=cmap, vmin=0, vmax=1)
            title = titles[basis]
            if masked.get(basis):
                title += f"\n(grey: {masked[basis]} coordinates with zero variance)"
            ax.set_title(title)
            ax.set_xlabel("coordinate index")
            ax.set_ylabel("coordinate index")
            ax.grid(False)
        fig.colorbar(image, ax=axes[:2], shrink=0.85, label="|correlation| (dimensionless)")
        ax = axes[2]
        layers = list(dict.fromkeys(r["layer"] for r in summary))
        width = 0.2
        bars = [
            ("mean_abs_offdiag", "parameter", "mean |corr|, parameter basis", 0.6, ""),
            ("mean_abs_offdiag", "kfe", "mean |corr|, KFE", 0.2, ""),
            ("offdiag_energy", "parameter", "‖offdiag‖²/‖F‖², parameter basis", 0.6, "//"),
            ("offdiag_energy", "kfe", "‖offdiag‖²/‖F‖², KFE", 0.2, "//"),
        ]
        for k, (key, basis, text, shade, hatch) in enumerate(bars):
            vals = [
                next(r[key] for r in summary if r["layer"] == n and r["basis"] == basis)
                for n in layers
            ]
            ax.bar(
                np.arange(len(layers)) + (k - 1.5) * width,
                vals,
                width,
                color=str(shade) if not hatch else "white",
                edgecolor=str(shade),
                hatch=hatch,
                label=text,
            )
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("off-diagonal share (dimensionless)")
        ax.set_title("all layers: mean |corr| and energy off the diagonal")
        ax.set_ylim(0, 1.05)
        ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        shown = meta["shown"]
        crop = "" if shown == meta["P"] else f" (first {shown} coordinates)"
        _suptitle(
            fig,
            data,
            f"Gradient correlation in the parameter basis vs the KFE, {_layer_title(meta)}{crop}; "
            f"{meta['fisher_type']} Fisher of {meta['batch_size']} samples",
        )
    return fig


# ----------------------------------------------------------------------------- directions
def plot_directions(data: FigureData) -> Figure:
    """Cosine of each method's damped natural gradient to the exact one vs damping, per layer.

    x: ``λ/λ_max`` of the layer (absolute values in the table). Black dashed: the trivial
    baseline ``F̂ = 0`` (``I/λ``: the plain gradient; the scaled identity gives the same
    direction).
    """
    rows = data.rows("directions")
    infos = data.meta["layers"]
    x = "relative_damping" if "relative_damping" in rows[0] else "damping"
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "identity"]
    n_rows, n_cols = _grid(len(infos), 3)
    with style():
        fig = _figure(3.5 * n_cols + 1.6, 3.1 * n_rows + 0.6)
        axes = fig.subplots(n_rows, n_cols, sharey=True, squeeze=False).ravel()
        for ax, info in zip(axes, infos):
            for method in methods:
                pts = [r for r in rows if r["layer"] == info["layer"] and r["method"] == method]
                if method == "zero":
                    kw = {"ls": "--", "color": "k", "label": "plain gradient (F̂ = 0 or ∝ I)"}
                else:
                    kw = {"ls": linestyle(method), "color": color(method), "label": label(method)}
                _runs_and_median(ax, pts, "cosine", x=x, **kw)
            ax.set_xscale("log")
            ax.set_title(_layer_title(info))
            relative = x == "relative_damping"
            unit = "λ / λ_max of the layer (dimensionless)" if relative else f"λ [{FISHER_UNITS}]"
            ax.set_xlabel(f"damping {unit}")
            ax.set_ylabel("cos(F̂_λ⁻¹ g, F_λ⁻¹ g)")
        for ax in axes[len(infos) :]:
            ax.axis("off")
        handles, labels_ = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside right center", frameon=False, title="method")
        m = data.meta
        _suptitle(
            fig,
            data,
            f"Direction quality: cosine of (F̂ + λI)⁻¹g to the exact (F + λI)⁻¹g "
            f"({m['fisher_type']} Fisher, g = loss gradient of the same {m['batch_size']} "
            "samples)",
        )
    return fig


# ----------------------------------------------------------------------------- comparison
def plot_comparison(data: FigureData) -> Figure:
    """``fisherlab compare``'s table as a figure.

    Per layer (x) and method (colour): the relative Frobenius error, the spectrum distance and
    the direction cosine against the exact Fisher of the data. Refused methods are left out
    (the table says why).
    """
    rows = [r for r in data.rows("comparison") if not r.get("note", "").startswith("refused")]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = {r["layer"]: r["P"] for r in rows}
    panels = [
        ("rel_frobenius", "‖F̂ − F‖_F / ‖F‖_F", "Frobenius error"),
        ("spectrum_distance", "‖λ(F̂) − λ(F)‖₂ / ‖λ(F)‖₂", "spectrum distance"),
        ("direction_cosine", "cos((F̂+λI)⁻¹g, (F+λI)⁻¹g)", "direction cosine"),
    ]
    width = 0.8 / max(len(methods), 1)
    with style():
        fig = _figure(3.0 * len(panels) + 1.8, 3.4)
        axes = fig.subplots(1, len(panels))
        for ax, (key, ylabel, title) in zip(axes, panels):
            for i, method in enumerate(methods):
                values = {r["layer"]: r[key] for r in rows if r["method"] == method}
                xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(layers))]
                ys = [values.get(layer, math.nan) for layer in layers]
                ax.bar(xs, ys, width=width, color=color(method), label=label(method))
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels([f"{n}\nP={sizes[n]}" for n in layers])
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
        axes[-1].set_ylim(min(0.0, *(r["direction_cosine"] for r in rows)), 1.0)
        handles, labels_ = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside right center", frameon=False, title="method")
        m = data.meta
        _suptitle(
            fig,
            data,
            f"Block approximations vs the exact {m['fisher_type']} Fisher of "
            f"{m['samples']} {m.get('data', '')} samples ({m.get('state', 'model as given')})\n"
            f"built from the same samples; damping λ = {m['damping']:g}; g = their loss gradient",
        )
    return fig
