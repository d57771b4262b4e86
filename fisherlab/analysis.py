r"""The numbers behind fisherlab's figures: how close each approximation is to the exact Fisher.

Every function here takes a model, a loss and data, computes, and returns a :class:`FigureData`
(named tables of plain rows plus settings); :mod:`fisherlab.plots` turns it into a figure, and
:meth:`FigureData.save` / :meth:`FigureData.load` keep it next to the figure as CSV, so that a
figure can be restyled or regenerated without recomputing. The exact reference is always the
library's exact block: :class:`~fisherlab.blocks.exact.ExactBlock` where a dense matrix is
needed, and the ``woodbury`` block (the same matrix, never formed) where its Gram suffices.

* :func:`block_heatmaps`: damped inverse blocks ``(F̂+λI)⁻¹`` of one layer (TENGraD Fig. 6);
* :func:`frobenius_errors`: ``‖F̂−F‖_F/‖F‖_F`` per layer and method, over models × batches;
* :func:`spectra`: sorted eigenvalues of ``F`` and of every ``F̂``, per layer;
* :func:`sample_correlations`: per-sample gradient correlation per layer (FNGD Fig. 3);
* :func:`kfe_decorrelation`: correlation of ``F`` in the parameter basis and in the KFE
  (EKFAC Fig. 3 left);
* :func:`training_errors`: KFAC vs EKFAC with a stale basis along SGD (EKFAC Fig. 3 right,
  Fig. 5c);
* :func:`direction_quality_vs_damping`: cosine of ``(F̂+λI)⁻¹g`` to ``(F+λI)⁻¹g`` against ``λ``.

:func:`figure_problem` builds the embedded default: a small model on the digits data, trained
for one epoch of SGD so that the curvature is not that of the initialisation.

Example:
    >>> import fisherlab.analysis as an
    >>> p = an.figure_problem("mlp", quick=True)
    >>> (x, y), = an.figure_batches(p, 16)
    >>> data = an.frobenius_errors([p.model], p.loss_fn, [(x, y)], methods=["kfac", "ekfac"])
    >>> e = {(r["layer"], r["method"]): r["rel_frobenius"] for r in data.rows("errors")}
    >>> all(e[layer, "ekfac"] <= e[layer, "kfac"] for layer, _ in e)
    True
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab import data as datasets
from fisherlab import models
from fisherlab.blocks import build_block, parse_method
from fisherlab.blocks.base import CurvatureBlock
from fisherlab.blocks.kfac import KronBlock
from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.capture import Capture, capture
from fisherlab.comparison import batch_gradients
from fisherlab.conventions import FisherlabError
from fisherlab.metrics import (
    KFECorrelation,
    direction_quality,
    fisher_norm_sq,
    frobenius_at_scale,
    frobenius_error,
    kfe_correlation,
    sample_correlation,
    spectrum,
    spectrum_distance,
)
from fisherlab.problem import Problem

APPROXIMATIONS = ("kfac", "ekfac", "skfac", "diag")
"""Approximations compared with the exact block by default."""

HEATMAP_METHODS = ("woodbury", "kfac", "ekfac", "skfac")
"""Methods shown next to the exact damped inverse (TENGraD Fig. 6 and its neighbours)."""

CONV_EXTRA = "woodbury:conv_gram=reduce_sum"
"""The Woodbury reduce-sum approximation, added for models with convolutions."""


# ------------------------------------------------------------------------------ figure data
def _column_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str"


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": lambda s: s == "True",
    "int": int,
    "float": float,
    "str": str,
}


@dataclass
class FigureData:
    """The numbers behind one figure: named tables of rows (dicts with equal keys) and settings.

    Attributes:
        name: The figure family, e.g. ``"spectra"``.
        tables: ``{table_name: rows}``; each table is saved as ``{stem}-{table_name}.csv``.
        meta: Settings and labels (model, layer, damping, …), saved in ``{stem}.json``.
    """

    name: str
    tables: dict[str, list[dict[str, Any]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """The rows of one table."""
        if table not in self.tables:
            raise KeyError(f"{self.name} data has no table {table!r}; it has {list(self.tables)}")
        return self.tables[table]

    def save(self, folder: str | Path, stem: str) -> list[Path]:
        """Write ``{stem}-{table}.csv`` per table and ``{stem}.json`` (settings, column types).

        Floats are written with 8 significant digits, enough to redraw any figure.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths, types = [], {}
        for key, rows in self.tables.items():
            columns = list(rows[0]) if rows else []
            types[key] = {c: _column_type(rows[0][c]) for c in columns}
            path = folder / f"{stem}-{key}.csv"
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                for row in rows:
                    writer.writerow(
                        [
                            format(row[c], ".8g") if isinstance(row[c], float) else row[c]
                            for c in columns
                        ]
                    )
            paths.append(path)
        path = folder / f"{stem}.json"
        info = {"name": self.name, "meta": self.meta, "tables": types}
        path.write_text(json.dumps(info, indent=2) + "\n")
        return [*paths, path]

    @classmethod
    def load(cls, folder: str | Path, stem: str) -> FigureData:
        """Read what :meth:`save` wrote (the same rows, floats to 8 significant digits)."""
        folder = Path(folder)
        info = json.loads((folder / f"{stem}.json").read_text())
        tables = {}
        for key, types in info["tables"].items():
            with (folder / f"{stem}-{key}.csv").open(newline="") as f:
                reader = csv.DictReader(f)
                tables[key] = [{c: _PARSERS[types[c]](row[c]) for c in types} for row in reader]
        return cls(info["name"], tables, info["meta"])


def matrix_rows(matrices: Mapping[str, Tensor], key: str = "matrix") -> list[dict[str, Any]]:
    """Square matrices of one size as wide rows ``{key, row, c0, c1, …}`` (for CSV)."""
    rows = []
    for name, m in matrices.items():
        values = m.detach().double().cpu().tolist()
        for i, line in enumerate(values):
            rows.append({key: name, "row": i, **{f"c{j}": v for j, v in enumerate(line)}})
    return rows


def rows_to_matrices(rows: Sequence[Mapping[str, Any]], key: str = "matrix") -> dict[str, Tensor]:
    """Inverse of :func:`matrix_rows`: ``{name: Tensor[n, n]}`` (float64)."""
    out: dict[str, list[list[float]]] = {}
    for row in rows:
        columns = [c for c in row if c.startswith("c") and c[1:].isdigit()]
        out.setdefault(row[key], []).append([row[c] for c in columns])
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}


# ------------------------------------------------------------------------- the default setup
@dataclass
class FigureProblem:
    """A model, its loss and data, as the figures use them.

    Attributes:
        name: Short name (``"mlp"``, ``"cnn"``).
        description: Architecture in words, for captions.
        model: The network (float64).
        loss_fn: The loss.
        split: The data.
        seed: Seed of the initialisation, the warm-up and the batches.
    """

    name: str
    description: str
    model: nn.Module
    loss_fn: nn.Module
    split: datasets.Split
    seed: int


def figure_model(name: str, quick: bool = False) -> tuple[nn.Module, str]:
    """The figures' model and its description.

    The library's default MLP (64-128-64-10) has 8320-parameter blocks, too big for dense
    heatmaps and eigendecompositions in the figures' time budget, so the figures use
    ``mlp(64, (32, 16), 10)`` and ``small_cnn(channels=(4, 8))``; ``quick`` (tests) uses tinier
    ones.
    """
    if name == "mlp":
        hidden = (8, 6) if quick else (32, 16)
        return models.mlp(64, hidden, 10), f"MLP 64-{'-'.join(map(str, hidden))}-10 (tanh)"
    if name == "cnn":
        channels = (2, 3) if quick else (4, 8)
        return (
            models.small_cnn(channels=channels),
            f"CNN conv3×3 1→{channels[0]}, conv3×3/2 {channels[0]}→{channels[1]}, linear→10 (ReLU)",
        )
    raise FisherlabError(f"unknown figure model {name!r}; choose 'mlp' or 'cnn'")


def train_sgd(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
) -> list[float]:
    """Plain mini-batch SGD (the model is trained in place); returns the loss of every step.

    Batches are drawn from a seeded permutation per epoch (the last incomplete batch is
    dropped). ``callback(step, epoch, xb, yb)`` runs before each update, on the parameters the
    update starts from.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            xb, yb = x[index], y[index]
            if callback is not None:
                callback(step, epoch, xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
    optimizer.zero_grad(set_to_none=True)
    return losses


def figure_problem(
    name: str = "mlp", seed: int = 0, quick: bool = False, warmup_epochs: int = 1
) -> FigureProblem:
    """The embedded default: a figure model on digits (float64), after ``warmup_epochs`` of SGD.

    The digits split is the library's (seed 0); ``seed`` sets the initialisation (through
    ``torch.manual_seed``, i.e. torch's global generator), the SGD batches and
    :func:`figure_batches`. ``quick`` uses a tinier model and 256 training images.
    """
    split = datasets.load_digits(dtype=torch.float64)
    if quick:
        split = datasets.Split(
            split.x_train[:256], split.y_train[:256], split.x_test, split.y_test, 10
        )
    torch.manual_seed(seed)
    model, description = figure_model(name, quick)
    model = model.double()
    loss_fn = nn.CrossEntropyLoss()
    if warmup_epochs:
        train_sgd(model, loss_fn, split.x_train, split.y_train, warmup_epochs, seed=seed)
    return FigureProblem(name, description, model, loss_fn, split, seed)


def figure_batches(
    problem: FigureProblem, batch_size: int = 128, count: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """``count`` disjoint training batches, from a permutation seeded by ``problem.seed``."""
    generator = torch.Generator().manual_seed(10_000 + problem.seed)
    order = torch.randperm(len(problem.split.x_train), generator=generator)
    if count * batch_size > len(order):
        raise FisherlabError(
            f"{count} batches of {batch_size} need {count * batch_size} training samples, "
            f"there are {len(order)}"
        )
    out = []
    for i in range(count):
        index = order[i * batch_size : (i + 1) * batch_size]
        out.append((problem.split.x_train[index], problem.split.y_train[index]))
    return out


def default_methods(model: nn.Module, base: Sequence[str] = APPROXIMATIONS) -> list[str]:
    """``base``, plus Woodbury reduce-sum when the model has convolutions (it is exact else)."""
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return [*base, CONV_EXTRA] if convs else list(base)


def choose_layer(cap: Capture, max_params: int = 200) -> str:
    """The largest layer with at most ``max_params`` parameters (else the smallest layer)."""
    sizes = {name: lc.layer.num_params for name, lc in cap.items()}
    fitting = [name for name, p in sizes.items() if p <= max_params]
    if fitting:
        return max(fitting, key=sizes.get)
    return min(sizes, key=sizes.get)


def exact_reference(cap: Capture, name: str) -> CurvatureBlock:
    """The exact block of a layer in its cheaper form for solves.

    ``ExactBlock`` (dense ``P×P``) when ``P`` is at most the number of rows ``M = R·N`` of ``J``,
    else ``woodbury`` (the same matrix through the ``M×M`` Gram).
    """
    lc = cap[name]
    rows = lc.G.shape[0] * lc.G.shape[1]
    return build_block("exact" if lc.layer.num_params <= rows else "woodbury", cap, name)


def exact_spectrum(cap: Capture, name: str) -> Tensor:
    """All ``P`` eigenvalues of the exact block, descending, from the smaller of ``F`` and ``K``.

    The non-zero eigenvalues of ``F = JᵀJ/ν`` are those of ``K/ν`` (``K = JJᵀ`` the Gram of the
    ``woodbury`` block); the rest are zero.
    """
    block = exact_reference(cap, name)
    if isinstance(block, WoodburyBlock):
        values = torch.linalg.eigvalsh(block.gram).clamp_min(0) / block.normaliser
        size = block.size
        values = (
            values[-size:]
            if len(values) >= size
            else torch.cat([values.new_zeros(size - len(values)), values])
        )
        return values.flip(0)
    return spectrum(block.matrix).clamp_min(0)  # PSD: rounding below zero is zero


def _capture(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None,
    x: Tensor | None,
    y: Tensor | None,
    fisher_type: str | None,
    force: bool = False,
) -> tuple[Capture, str]:
    """The capture of a problem's data (all its batches) or of one batch, and its Fisher type.

    With a :class:`~fisherlab.problem.Problem`, ``fisher_type`` overrides the problem's only
    with ``force`` (the empirical rows behind a loss gradient).
    """
    if isinstance(model, Problem):
        problem = model
        if force and fisher_type is not None:
            problem = problem.with_fisher_type(fisher_type)
        elif fisher_type is not None and fisher_type != problem.fisher_type:
            raise FisherlabError(
                f"fisher_type={fisher_type!r} given with a Problem of Fisher type "
                f"{problem.fisher_type!r}; leave it out"
            )
        return capture(problem), problem.fisher_type
    fisher_type = fisher_type or "true"
    return capture(model, loss_fn, x, y, fisher_type=fisher_type), fisher_type


def _layer_info(cap: Capture, name: str) -> dict[str, Any]:
    layer = cap[name].layer
    module = layer.module
    return {
        "layer": name,
        "type": type(module).__name__,
        "weight": "×".join(str(s) for s in module.weight.shape),
        "P": layer.num_params,
        "T": cap[name].positions,
    }


# ----------------------------------------------------------------------------- 1. heatmaps
def block_heatmaps(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    layer: str | None = None,
    methods: Sequence[str] = HEATMAP_METHODS,
    damping: float | None = None,
    relative_damping: float = 0.1,
    max_params: int = 200,
    fisher_type: str | None = None,
) -> FigureData:
    r"""Damped inverse blocks :math:`(F̂+λI)^{-1}` of one layer, exact and approximate.

    The exact block is :class:`~fisherlab.blocks.exact.ExactBlock`; every method's inverse is
    ``block.solve(I, λ)``, in parameter order (weight row-major, then bias). Where the layer has
    more than ``max_params`` parameters, the leading ``max_params × max_params`` sub-block is
    kept (``meta["shown"]``).

    Args:
        model: The network, or a :class:`~fisherlab.problem.Problem` (then ``loss_fn``, ``x``
            and ``y`` are left out and the problem's data, all batches, is captured).
        loss_fn: The loss (with a network).
        x: Batch inputs (with a network).
        y: Batch targets (with a network).
        layer: Module name (default: :func:`choose_layer` with ``max_params``).
        methods: Method specs next to the exact block.
        damping: Absolute ``λ``; default ``relative_damping · tr(F)/P`` (a fraction of the mean
            eigenvalue), so that the inverse shows structure and not only ``I/λ``.
        relative_damping: See ``damping``.
        max_params: Layer choice and crop size.
        fisher_type: Fisher type (default ``"true"``; a Problem's own with a Problem).

    Returns:
        Tables ``inverse`` (wide rows ``matrix, row, c0…``: ``"exact"`` and one per method, in
        units of 1/F) and ``summary`` (``method, rel_frobenius_block, rel_frobenius_inverse``).
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    name = layer if layer is not None else choose_layer(cap, max_params)
    exact = build_block("exact", cap, name)
    dense = exact.to_dense()
    size = exact.size
    lam = float(damping) if damping is not None else relative_damping * float(dense.trace()) / size
    eye = torch.eye(size, dtype=dense.dtype)
    shown = min(size, max_params)
    inverses = {"exact": exact.solve(eye, lam)}
    summary = []
    for spec in methods:
        method, options = parse_method(spec)
        block = build_block(method, cap, name, **options)
        inverses[spec] = block.solve(eye, lam)
        summary.append(
            {
                "method": spec,
                "rel_frobenius_block": frobenius_error(dense, block.to_dense()),
                "rel_frobenius_inverse": frobenius_error(inverses["exact"], inverses[spec]),
            }
        )
    crop = {k: v[:shown, :shown] for k, v in inverses.items()}
    meta = {
        **_layer_info(cap, name),
        "shown": shown,
        "damping": lam,
        "relative_damping": None if damping is not None else relative_damping,
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "methods": list(methods),
    }
    return FigureData("heatmaps", {"inverse": matrix_rows(crop), "summary": summary}, meta)


# ------------------------------------------------------------------------ 2. Frobenius error
def frobenius_errors(
    models_: Sequence[nn.Module],
    loss_fn: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    methods: Sequence[str] = APPROXIMATIONS,
    fisher_type: str = "true",
) -> FigureData:
    r"""Relative Frobenius error :math:`\|F̂-F\|_F/\|F\|_F` per layer and method.

    Every model (e.g. one per seed) is evaluated on every batch. Errors come from the captured
    statistics and the Gram of the exact block (:func:`fisherlab.metrics.frobenius_at_scale`),
    exact up to rounding and never forming a ``P×P`` matrix.

    Returns:
        Table ``errors`` with ``seed`` (index into ``models_``), ``batch``, ``layer``, ``P``,
        ``method``, ``rel_frobenius``.
    """
    specs = [(spec, *parse_method(spec)) for spec in methods]
    rows = []
    for seed, model in enumerate(models_):
        for b, (x, y) in enumerate(batches):
            cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
            for name, lc in cap.items():
                f_sq = fisher_norm_sq(lc, cap.normaliser)
                for spec, method, options in specs:
                    block = build_block(method, cap, name, **options)
                    error, norm = frobenius_at_scale(block, lc, cap.normaliser, f_sq)
                    rows.append(
                        {
                            "seed": seed,
                            "batch": b,
                            "layer": name,
                            "P": lc.layer.num_params,
                            "method": spec,
                            "rel_frobenius": error / norm if norm > 0 else 0.0,
                        }
                    )
    meta = {
        "fisher_type": fisher_type,
        "models": len(models_),
        "batches": len(batches),
        "batch_size": len(batches[0][0]),
        "methods": list(methods),
    }
    return FigureData("frobenius", {"errors": rows}, meta)


# ------------------------------------------------------------------------------- 3. spectra
def spectra(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    methods: Sequence[str] = APPROXIMATIONS,
    fisher_type: str | None = None,
) -> FigureData:
    """All eigenvalues, descending, of the exact block and of each approximation, per layer.

    The exact spectrum comes from :func:`exact_spectrum` (the dense block or the Gram of the
    ``woodbury`` block, whichever is smaller; zeros beyond the rank ``R·N``), the
    approximations' from their own ``eigvalsh``.

    Returns:
        Tables ``eigenvalues`` (``layer, method, index, eigenvalue``; method ``"exact"`` for
        the reference) and ``distance`` (``layer, method, spectrum_distance``, the relative
        distance of sorted spectra).
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    rows, distance = [], []
    for name in cap:
        exact = exact_spectrum(cap, name)
        values = {"exact": exact}
        for spec in methods:
            method, options = parse_method(spec)
            values[spec] = build_block(method, cap, name, **options).eigvalsh().flip(0)
            distance.append(
                {
                    "layer": name,
                    "method": spec,
                    "spectrum_distance": spectrum_distance(exact, values[spec]),
                }
            )
        for spec, v in values.items():
            rows += [
                {"layer": name, "method": spec, "index": i, "eigenvalue": float(e)}
                for i, e in enumerate(v.tolist())
            ]
    meta = {"fisher_type": fisher_type, "batch_size": cap.num_samples, "methods": list(methods)}
    meta["layers"] = [_layer_info(cap, name) for name in cap]
    return FigureData("spectra", {"eigenvalues": rows, "distance": distance}, meta)


# -------------------------------------------------------------------- 4. sample correlation
def _off_diagonal(c: Tensor) -> Tensor:
    mask = ~torch.eye(len(c), dtype=torch.bool, device=c.device)
    return c[mask]


def matrix_similarity(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of the off-diagonal entries of two equal-size matrices."""
    u, v = _off_diagonal(a).double(), _off_diagonal(b).double()
    u, v = u - u.mean(), v - v.mean()
    denom = (torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v)).item()
    return float(u @ v) / denom if denom > 0 else math.nan


def sample_correlations(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher_type: str = "empirical",
    sort_by_label: bool = True,
) -> FigureData:
    r"""Per-sample gradient correlation of every layer, and how alike the layers' matrices are.

    For each layer, the normalised Gram :math:`C = D^{-1/2} K D^{-1/2}` of the gradient rows
    (:func:`fisherlab.metrics.sample_correlation`; with ``"empirical"`` rows these are the
    per-sample gradients, ``N×N`` — the matrix FNGD's coefficients come from). Samples are
    sorted by label so that class structure shows.

    Returns:
        Tables ``correlation`` (wide rows ``layer, row, c0…``), ``similarity`` (every pair of
        layers: ``layer_a, layer_b, adjacent, pearson`` — Pearson correlation of off-diagonal
        entries — and ``rel_distance = ‖C_a−C_b‖_F/‖C_a‖_F``) and ``labels`` (``row, label``).
    """
    if sort_by_label:
        order = torch.sort(y, stable=True).indices
        x, y = x[order], y[order]
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    matrices = {name: sample_correlation(lc) for name, lc in cap.items()}
    names = list(matrices)
    similarity = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            similarity.append(
                {
                    "layer_a": a,
                    "layer_b": b,
                    "adjacent": abs(i - j) == 1,
                    "pearson": matrix_similarity(matrices[a], matrices[b]),
                    "rel_distance": frobenius_error(matrices[a], matrices[b]),
                }
            )
    labels = [{"row": i, "label": int(v)} for i, v in enumerate(y.tolist())]
    meta = {
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "rows_per_sample": cap[names[0]].G.shape[0],
        "layers": [_layer_info(cap, name) for name in names],
    }
    tables = {
        "correlation": matrix_rows(matrices, key="layer"),
        "similarity": similarity,
        "labels": labels,
    }
    return FigureData("sample_correlation", tables, meta)


# ------------------------------------------------------------------- 5. KFE decorrelation
def kfe_decorrelation(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    layer: str | None = None,
    max_params: int = 200,
    fisher_type: str | None = None,
    floor: float = 1e-10,
) -> FigureData:
    r"""Correlation of the exact block in the parameter basis and in the KFE (EKFAC Fig. 3 left).

    The exact block ``F`` (Kronecker order ``vec_r([W | b])``) and ``QᵀFQ`` with EKFAC's
    Kronecker-factored eigenbasis ``Q = U_Γ ⊗ U_Ω`` of the same batch, each turned into a
    correlation matrix (:func:`fisherlab.metrics.kfe_correlation`). KFE coordinates are sorted
    by decreasing EKFAC scaling ``s``. The summary statistic is the mean absolute off-diagonal
    correlation over the coordinates whose variance exceeds ``floor`` times the largest (the
    others carry no gradient, and their correlation is rounding noise).

    Returns:
        Tables ``correlation`` (wide rows ``basis, row, c0…`` for the chosen layer, at most
        ``max_params`` coordinates of each basis; NaN for coordinates below ``floor``, counted
        in ``meta["masked"]``) and ``summary`` (``layer, P, basis,
        mean_abs_offdiag, coordinates``) for every layer.
    """
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    chosen = layer if layer is not None else choose_layer(cap, max_params)
    summary, matrices, masked = [], {}, {}
    for name in cap:
        exact = build_block("exact", cap, name)
        ekfac = build_block("ekfac", cap, name)
        corr = kfe_correlation(exact.matrix, ekfac)  # the KFE ordered by decreasing scaling
        order = torch.argsort(ekfac.scalings.flatten(), descending=True, stable=True)
        in_kfe = corr.kfe
        variances = {  # the diagonals of F and of QᵀFQ (= EKFAC's scalings)
            "parameter": exact.matrix.diagonal(),
            "kfe": ekfac.scalings.flatten()[order],
        }
        for basis, c in (("parameter", corr.parameter_basis), ("kfe", in_kfe)):
            v = variances[basis]
            keep = v > floor * v.max()
            summary.append(
                {
                    "layer": name,
                    "P": exact.size,
                    "basis": basis,
                    "mean_abs_offdiag": KFECorrelation.off_diagonal(c[keep][:, keep]),
                    "coordinates": int(keep.sum()),
                }
            )
        if name == chosen:
            shown = min(exact.size, max_params)
            for basis, c in (("parameter", corr.parameter_basis), ("kfe", in_kfe)):
                v = variances[basis]
                null = (v <= floor * v.max())[:shown]
                m = c[:shown, :shown].clone()
                m[null, :] = math.nan
                m[:, null] = math.nan
                matrices[basis] = m
                masked[basis] = int(null.sum())
    meta = {
        **_layer_info(cap, chosen),
        "shown": len(matrices["kfe"]),
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "floor": floor,
        "masked": masked,
    }
    tables = {"correlation": matrix_rows(matrices, key="basis"), "summary": summary}
    return FigureData("kfe_correlation", tables, meta)


# ------------------------------------------------------------------------- 6. training
TRAINING_SERIES = ("kfac", "kfac_amortized", "ekfac_amortized")
"""Curves of :func:`training_errors`."""


def training_errors(
    model: nn.Module,
    loss_fn: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.1,
    basis_every: int = 20,
    fisher_type: str = "true",
    seed: int = 0,
    progress: bool = False,
) -> FigureData:
    r"""KFAC and EKFAC with a stale basis against the exact block along SGD (EKFAC Fig. 3, 5c).

    The model is trained in place by :func:`train_sgd`. Before every update, the current batch
    is captured and, per layer, compared with its exact block on the same batch (Frobenius
    error from the Gram of the ``woodbury`` block, spectrum from :func:`exact_spectrum`):

    * ``kfac``: factors ``Γ, Ω`` of the current batch (recomputed every step);
    * ``kfac_amortized``: factors recomputed every ``basis_every`` steps only (the KFAC of the
      paper, whose inverse is amortized);
    * ``ekfac_amortized``: EKFAC whose basis ``U_Γ ⊗ U_Ω`` is recomputed every ``basis_every``
      steps, with scalings ``s`` from the current batch at every step (``basis=``).

    At a step where the basis was just recomputed, EKFAC's error is at most KFAC's (EKFAC's
    theorem) and the amortized KFAC is the fresh one.

    Returns:
        Table ``curves`` with ``step, epoch, basis_step, loss, layer, method, rel_frobenius,
        spectrum_distance`` (relative distance of the sorted spectra to the exact one).
    """
    rows: list[dict[str, Any]] = []
    stale: dict[str, tuple[Tensor, Tensor, tuple[Tensor, Tensor]]] = {}
    steps_per_epoch = len(x_train) // batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="training", leave=False)

    def observe(step: int, epoch: int, xb: Tensor, yb: Tensor) -> None:
        cap = capture(model, loss_fn, xb, yb, fisher_type=fisher_type)
        with torch.no_grad():
            loss = loss_fn(model(xb), yb).item()
        recompute = step % basis_every == 0
        for name, lc in cap.items():
            kfac = build_block("kfac", cap, name)
            if recompute:
                ekfac_fresh = build_block("ekfac", cap, name)
                stale[name] = (kfac.gamma, kfac.omega, ekfac_fresh.basis)
            gamma, omega, basis = stale[name]
            blocks = {
                "kfac": kfac,
                "kfac_amortized": KronBlock(lc.layer, gamma, omega, fisher_type, kfac.options),
                "ekfac_amortized": build_block("ekfac", cap, name, basis={name: basis}),
            }
            reference = exact_spectrum(cap, name)
            f_sq = fisher_norm_sq(lc, cap.normaliser)
            for series, block in blocks.items():
                error, norm = frobenius_at_scale(block, lc, cap.normaliser, f_sq)
                rows.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "basis_step": recompute,
                        "loss": loss,
                        "layer": name,
                        "method": series,
                        "rel_frobenius": error / norm if norm > 0 else 0.0,
                        "spectrum_distance": spectrum_distance(reference, block.eigvalsh().flip(0)),
                    }
                )
        if bar is not None:
            bar.update()

    try:
        train_sgd(model, loss_fn, x_train, y_train, epochs, batch_size, lr, seed, observe)
    finally:
        if bar is not None:
            bar.close()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cap = capture(model, loss_fn, x_train[:2], y_train[:2], fisher_type="empirical")
    meta = {
        "layer_info": [_layer_info(cap, name) for name in layers],
        "fisher_type": fisher_type,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "basis_every": basis_every,
        "steps": epochs * steps_per_epoch,
        "layers": layers,
    }
    return FigureData("training", {"curves": rows}, meta)


# ---------------------------------------------------------------------- 7. direction quality
def direction_quality_vs_damping(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    methods: Sequence[str] = APPROXIMATIONS,
    dampings: Sequence[float] | None = None,
    fisher_type: str | None = None,
) -> FigureData:
    r"""Cosine of each method's preconditioned gradient to the exact natural gradient vs ``λ``.

    Per layer, with ``g`` the mini-batch loss gradient (:func:`fisherlab.comparison.
    batch_gradients`), compares ``(F̂+λI)⁻¹g`` with ``(F+λI)⁻¹g`` from the exact block
    (:func:`exact_reference`; :func:`fisherlab.metrics.direction_quality`).

    Args:
        model: The network, or a :class:`~fisherlab.problem.Problem` (then ``loss_fn``, ``x``
            and ``y`` are left out and the problem's data, all batches, is captured).
        loss_fn: The loss (with a network).
        x: Batch inputs (with a network).
        y: Batch targets (with a network).
        methods: Method specs.
        dampings: Absolute ``λ`` values (default ``10^-6 … 10^1``, 15 values).
        fisher_type: Fisher type of the blocks (the gradient is always the loss gradient).

    Returns:
        Table ``directions`` with ``layer, method, damping, cosine, relative_error``.
    """
    lams = [10.0**e for e in torch.linspace(-6, 1, 15).tolist()] if dampings is None else dampings
    cap, fisher_type = _capture(model, loss_fn, x, y, fisher_type)
    grads = batch_gradients(_capture(model, loss_fn, x, y, "empirical", force=True)[0])
    rows = []
    for name in cap:
        exact = exact_reference(cap, name)
        for spec in methods:
            method, options = parse_method(spec)
            block = build_block(method, cap, name, **options)
            for lam in lams:
                q = direction_quality(block, exact, grads[name], lam)
                rows.append(
                    {
                        "layer": name,
                        "method": spec,
                        "damping": float(lam),
                        "cosine": q.cosine,
                        "relative_error": q.relative_error,
                    }
                )
    meta = {
        "fisher_type": fisher_type,
        "batch_size": cap.num_samples,
        "methods": list(methods),
        "layers": [_layer_info(cap, name) for name in cap],
    }
    return FigureData("directions", {"directions": rows}, meta)


__all__ = [
    "APPROXIMATIONS",
    "HEATMAP_METHODS",
    "TRAINING_SERIES",
    "FigureData",
    "FigureProblem",
    "block_heatmaps",
    "choose_layer",
    "default_methods",
    "direction_quality_vs_damping",
    "exact_reference",
    "exact_spectrum",
    "figure_batches",
    "figure_model",
    "figure_problem",
    "frobenius_errors",
    "kfe_decorrelation",
    "matrix_rows",
    "matrix_similarity",
    "rows_to_matrices",
    "sample_correlations",
    "spectra",
    "train_sgd",
    "training_errors",
]
