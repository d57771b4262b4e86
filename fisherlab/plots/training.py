"""Figures along training: per-batch errors (old protocol)."""

from __future__ import annotations

from matplotlib.figure import Figure

from fisherlab.analysis import FigureData
from fisherlab.plots.base import (
    _figure,
    _layer_title,
    _suptitle,
    color,
    label,
    style,
)


# ------------------------------------------------------------------------------- training
def plot_training(data: FigureData) -> Figure:
    """Relative Frobenius error (top) and spectrum distance (bottom) along SGD, per layer.

    Dotted vertical lines mark the steps where the KFE basis (and the amortized KFAC factors)
    were recomputed.
    """
    rows = data.rows("curves")
    meta = data.meta
    layers = meta["layers"]
    infos = {info["layer"]: info for info in meta.get("layer_info", [])}
    series = list(dict.fromkeys(r["method"] for r in rows))
    basis_steps = sorted({r["step"] for r in rows if r["basis_step"]})
    styles = {"kfac": (":", 1.2), "kfac_amortized": ("-", 1.4), "ekfac_amortized": ("-", 1.8)}
    with style():
        fig = _figure(3.6 * len(layers) + 1.5, 5.6)
        axes = fig.subplots(2, len(layers), sharex=True, squeeze=False)
        for col, name in enumerate(layers):
            for row, (key, ylabel) in enumerate(
                (
                    ("rel_frobenius", "‖F̂ − F‖_F / ‖F‖_F"),
                    ("spectrum_distance", "‖λ(F̂) − λ(F)‖₂ / ‖λ(F)‖₂"),
                )
            ):
                ax = axes[row, col]
                for s in series:
                    pts = [
                        (r["step"], r[key]) for r in rows if r["layer"] == name and r["method"] == s
                    ]
                    ls, lw = styles.get(s, ("-", 1.2))
                    ax.plot(
                        *zip(*pts),
                        color=color(s),
                        ls=ls,
                        lw=lw,
                        label=label(s).replace("k steps", f"{meta['basis_every']} steps"),
                    )
                for step in basis_steps:
                    ax.axvline(step, color="0.25", lw=0.9, ls=(0, (2, 2)), zorder=1)
                ax.set_ylim(bottom=0)
                if row == 0:
                    ax.set_title(_layer_title(infos[name]) if name in infos else f"layer {name}")
                else:
                    ax.set_xlabel(f"SGD step (batch {meta['batch_size']})")
                if col == 0:
                    ax.set_ylabel(f"{ylabel}\n(dimensionless)")
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="outside lower center", ncols=len(series), frameon=False)
        _suptitle(
            fig,
            data,
            f"Approximation error during SGD (lr {meta['lr']}, {meta['epochs']} epochs, "
            f"{meta['fisher_type']} Fisher of each step's batch)\n"
            "dashed vertical lines: KFE basis and amortized KFAC factors recomputed",
        )
    return fig
