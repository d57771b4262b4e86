"""The one fisherlab look: palette, labels, line styles, rcParams, and the figure saver."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from fisherlab.analysis import CONV_EXTRA, FigureData
from fisherlab.files import replacing

_PALETTE = sns.color_palette("colorblind", 10)
METHOD_COLORS: dict[str, Any] = {
    "exact": (0.15, 0.15, 0.15),
    "woodbury": _PALETTE[0],
    "kfac": _PALETTE[1],
    "ekfac": _PALETTE[2],
    "skfac": _PALETTE[4],
    "diag": _PALETTE[7],
    CONV_EXTRA: _PALETTE[9],
    "kfac_amortized": _PALETTE[3],
    "ekfac_amortized": _PALETTE[2],
    "ekfac-ra": _PALETTE[8],
    "kfac-fresh": _PALETTE[1],
    # the optimizers of the comparisons (curvature optimizers share their block's colour)
    "sgd": (0.35, 0.35, 0.35),
    "adam": _PALETTE[5],
    "tengrad": _PALETTE[0],
    "fngd": _PALETTE[6],
}
"""One colour per method and optimizer, shared by every figure."""

METHOD_LABELS: dict[str, str] = {
    "exact": "exact",
    "woodbury": "Woodbury (TENGraD)",
    "kfac": "KFAC",
    "ekfac": "EKFAC",
    "skfac": "SKFAC",
    "diag": "diagonal",
    CONV_EXTRA: "Woodbury reduce-sum",
    "kfac_amortized": "KFAC, factors every k steps",
    "ekfac_amortized": "EKFAC, basis every k steps",
    "ekfac-ra": "EKFAC-ra (running-average scalings)",
    "kfac-fresh": "KFAC recomputed (not in the paper)",
}
"""Legend labels of method specs (unknown specs are shown as they are)."""

METHOD_STYLES: dict[str, tuple[str, str]] = {
    "exact": ("-", ""),
    "woodbury": ("-", "D"),
    "kfac": ("-", "o"),
    "ekfac": ("-", "s"),
    "skfac": ("--", "x"),
    "diag": ("-.", "v"),
    CONV_EXTRA: (":", "^"),
    "kfac_amortized": ("-", ""),
    "ekfac_amortized": ("-", ""),
}
"""Line style and marker per method, so that coinciding curves (SKFAC = KFAC on Linear layers)
stay distinguishable."""

RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 11,
    "image.interpolation": "nearest",
    "pdf.fonttype": 42,
}
"""fisherlab's rcParams on top of seaborn's ``whitegrid`` style and ``paper`` context."""

FISHER_UNITS = "nats / param²"
"""Units of Fisher entries and eigenvalues: the loss (nats) per squared parameter unit."""


@contextmanager
def style() -> Iterator[None]:
    """The one fisherlab look: seaborn ``whitegrid`` + ``paper`` context and :data:`RC`.

    Every figure function draws inside it, and :func:`save_figure` saves inside it.
    """
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"), mpl.rc_context(RC):
        yield


def label(method: str) -> str:
    """The legend label of a method spec."""
    return METHOD_LABELS.get(method, method)


def color(method: str) -> Any:
    """The colour of a method spec (grey for unknown ones)."""
    return METHOD_COLORS.get(method, (0.5, 0.5, 0.5))


def linestyle(method: str) -> str:
    """The line style of a method spec."""
    return METHOD_STYLES.get(method, ("-", ""))[0]


def marker(method: str) -> str:
    """The marker of a method spec (empty for none)."""
    return METHOD_STYLES.get(method, ("-", ""))[1]


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _suptitle(fig: Figure, data: FigureData, text: str) -> None:
    state = data.meta.get("state")  # the training state, where the figure's text lacks it
    if state and state not in text:
        text = f"{text}\n{state}"
    model = data.meta.get("model")
    fig.suptitle(f"{text}\n{model}" if model else text)
    for ax in fig.axes:  # every figure ends here: its log axes get enough labelled ticks
        _log_ticks(ax)


def _log_ticks(ax: Any) -> None:
    """At least 3 labelled ticks on each log axis of ``ax`` (1-2-5 steps on short ranges)."""
    for axis, scale, limits in (
        (ax.xaxis, ax.get_xscale(), ax.get_xlim()),
        (ax.yaxis, ax.get_yscale(), ax.get_ylim()),
    ):
        if scale != "log" or getattr(axis.get_transform(), "base", 10) != 10:
            continue
        low, high = sorted(limits)
        if low <= 0:
            continue
        decades = math.log10(high) - math.log10(low)
        if decades < 3:  # few powers of ten inside: label 1, 2, 5 × 10^k
            subs = (1.0, 2.0, 5.0) if decades > 0.8 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
            axis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=subs))
            axis.set_major_formatter(mpl.ticker.LogFormatterSciNotation(labelOnlyBase=False))
            axis.set_minor_formatter(mpl.ticker.NullFormatter())


def symlog_ticks(linear: float, top: float) -> list[float]:
    """Colour-bar ticks of a ``SymLogNorm``: ``0`` and ``±10^k`` from the linear threshold up.

    At most four decades per side (every other one beyond, the top one kept), so that labels
    never collide: no tick inside the linear region but 0. Where no power of ten lies between
    ``linear`` and ``top`` (both in one decade), ``±top`` rounded down to one significant digit,
    which is at least ``top/2 ≥ linear/2`` and so half a linear range away from 0.
    """
    first = math.ceil(math.log10(linear)) if linear > 0 else math.floor(math.log10(top))
    last = math.floor(math.log10(top))
    decades = list(range(first, last + 1))
    if decades:
        step = max(1, math.ceil(len(decades) / 4))
        positive = [10.0**k for k in decades[::-1][::step][::-1]]
    else:
        digit = math.floor(top / 10.0**last * (1 + 1e-12))
        positive = [min(digit * 10.0**last, top)]
    return [-v for v in positive[::-1]] + [0.0] + positive


def _symlog_label(value: float, _pos: Any = None) -> str:
    """``0``, ``±10^k`` or ``±m×10^k`` in mathtext (the tick labels of :func:`symlog_ticks`)."""
    if value == 0:
        return "$\\mathdefault{0}$"
    k = math.floor(math.log10(abs(value)) + 1e-9)
    digit = round(abs(value) / 10.0**k, 6)
    body = f"10^{{{k}}}" if digit == 1 else f"{digit:g}\\times10^{{{k}}}"
    return f"$\\mathdefault{{{'-' if value < 0 else ''}{body}}}$"


def symlog_colorbar(
    fig: Figure, image: Any, ax: Any, label: str, linear: float, top: float, **kw: Any
) -> Any:
    """A colour bar of an image drawn with ``SymLogNorm(linear, vmin=-top, vmax=top)``.

    Ticks from :func:`symlog_ticks` (at least three labelled: ``0`` and ``±v``), labels that do
    not overlap, and no minor ticks: inside the linear range they would sit on top of the ``0``
    tick (drawn as "≡").
    """
    bar = fig.colorbar(image, ax=ax, label=label, ticks=symlog_ticks(linear, top), **kw)
    bar.ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(_symlog_label))
    bar.minorticks_off()
    return bar


def save_figure(
    fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Save ``fig`` as ``stem.png`` (150 dpi, for READMEs) and ``stem.pdf`` (for papers)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with style():
        for fmt in formats:
            path = stem.with_suffix(f".{fmt}")
            with replacing(path) as tmp:  # whole or not at all
                fig.savefig(tmp, format=fmt, metadata=_metadata(fmt))
            paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any] | None:
    """Fixed metadata, so that drawing the same data again gives the same files."""
    if fmt == "pdf":
        return {"CreationDate": None, "Creator": "fisherlab", "Producer": "fisherlab"}
    if fmt == "png":
        return {"Software": "fisherlab"}
    return None


def _runs_and_median(ax, pts: Sequence[dict], key: str, x: str = "epoch", **kw) -> None:
    """Every training run thin, the median over runs thick (never a mean, never a band).

    Rows are grouped by ``x``; several rows of one run at one ``x`` (positions, batches) are
    first reduced to their median, so that each run is one thin line.
    """
    xs = sorted({r[x] for r in pts})
    runs = sorted({r.get("run", 0) for r in pts})
    per_run = {
        run: [float(np.median([r[key] for r in pts if r.get("run", 0) == run and r[x] == v]))
              for v in xs]
        for run in runs
    }  # fmt: skip
    thin = {k: v for k, v in kw.items() if k in ("color", "ls")}
    if len(runs) > 1:
        for values in per_run.values():
            ax.plot(xs, values, lw=0.7, alpha=0.45, **thin)
    median = np.median(np.array(list(per_run.values())), axis=0)
    ax.plot(xs, median, lw=2.0, marker="o", ms=3, **kw)


def _grid(n: int, columns: int) -> tuple[int, int]:
    columns = min(n, columns)
    return math.ceil(n / columns), columns


def _layer_title(info: dict[str, Any]) -> str:
    kind = "conv" if info["type"] == "Conv2d" else info["type"]
    return f"layer {info['layer']}: {kind} {info['weight']}, P={info['P']}"
