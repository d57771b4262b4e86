"""Readable colour bars: the heatmaps' symmetric-log colour bars, drawn with Agg.

Every colour bar has at least three labelled ticks, no two tick labels overlap, and no two tick
marks (major or minor) lie within a few pixels of each other (what drew "≡" beside the 0 of the
difference colour bar: minor ticks deep inside the linear range).
"""

from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure

from fisherlab import analysis as an
from fisherlab import plots
from fisherlab.plots.base import symlog_colorbar, symlog_ticks

FIGURES = Path(__file__).resolve().parents[1] / "figures"
MIN_GAP_PX = 4.0  # tick marks closer than this read as one thick mark


def _colorbars(fig: Figure) -> list:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _check_colorbar(ax, renderer) -> None:
    axis = ax.yaxis
    ticks = [t for t in axis.get_major_ticks() if t.get_visible()]
    lo, hi = sorted(ax.get_ylim())
    labels = [
        t.label2 if t.label2.get_visible() else t.label1
        for t in ticks
        if lo <= t.get_loc() <= hi and (t.label1.get_text() or t.label2.get_text())
    ]
    texts = [lab.get_text() for lab in labels]
    assert len(labels) >= 3, texts
    boxes = [lab.get_window_extent(renderer) for lab in labels]
    for (i, a), (j, b) in combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (texts[i], texts[j])
    locs = [
        loc for loc in [*axis.get_majorticklocs(), *axis.get_minorticklocs()] if lo <= loc <= hi
    ]
    pixels = np.sort(ax.transData.transform([(0.5, v) for v in locs])[:, 1])
    assert np.diff(pixels).min() >= MIN_GAP_PX, sorted(locs)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_committed_heatmaps_colour_bars_are_readable(model):
    fig = plots.PLOTS["heatmaps"](an.FigureData.load(FIGURES, f"{model}-heatmaps"))
    bars = _colorbars(fig)
    assert len(bars) == 2
    for ax in bars:
        _check_colorbar(ax, fig.canvas.get_renderer())


RANGES = {  # (linear threshold, largest |value|)
    "many-decades": (3e-7, 4e5),
    "the-committed-mlp-difference": (900.0, 1.2e5),
    "one-decade": (2.0, 35.0),
    "same-decade": (1.5e3, 1.9e3),
    "threshold-at-a-power": (1.0, 1e3),
    "tiny-values": (2e-9, 7e-8),
}


@pytest.mark.parametrize(("linear", "top"), list(RANGES.values()), ids=list(RANGES))
def test_symlog_colour_bar_is_readable_over_any_range(linear, top):
    fig = Figure(figsize=(3, 3), layout="constrained")
    ax = fig.subplots()
    values = np.linspace(-top, top, 64).reshape(8, 8)
    image = ax.imshow(values, norm=SymLogNorm(linear, vmin=-top, vmax=top, base=10))
    symlog_colorbar(fig, image, ax, "value", linear, top)
    (bar,) = _colorbars(fig)
    _check_colorbar(bar, fig.canvas.get_renderer())


@pytest.mark.parametrize(("linear", "top"), list(RANGES.values()), ids=list(RANGES))
def test_symlog_ticks_are_symmetric_with_zero_and_outside_half_the_linear_range(linear, top):
    ticks = symlog_ticks(linear, top)
    assert 0.0 in ticks and ticks == sorted(ticks) and len(ticks) >= 3
    assert ticks == [-t for t in ticks[::-1]]
    positive = [t for t in ticks if t > 0]
    assert min(positive) >= linear / 2 and max(positive) <= top
