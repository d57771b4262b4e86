"""``fisherlab figures``: every approximation-quality figure of the embedded default, regenerated.

For each model (``mlp``: 64-32-16-10 tanh; ``cnn``: conv 1→4, conv/2 4→8, linear; both on
digits, float64, after one epoch of SGD) and each figure family in :data:`FAMILIES`, computes
the data (:mod:`fisherlab.analysis`), draws the figure (:mod:`fisherlab.plots`) and writes
``{out}/{model}-{family}.png`` and ``.pdf``, the data as ``{model}-{family}-{table}.csv`` and
the settings as ``{model}-{family}.json``. ``--from-data`` redraws from those files without
recomputing. The scripts in ``analyses/`` run one family each through :func:`script_main`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fisherlab import analysis as an
from fisherlab import plots
from fisherlab.analysis import FigureData

MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Settings:
    """Sizes of the computations (the defaults, or the tiny ``quick`` ones of the tests)."""

    seed: int = 0
    quick: bool = False
    progress: bool = True

    @property
    def batch_size(self) -> int:
        """Batch of the single-batch figures."""
        return 32 if self.quick else 128

    @property
    def correlation_batch(self) -> int:
        """Samples in the sample-correlation matrices."""
        return 24 if self.quick else 64

    @property
    def seeds(self) -> int:
        """Models (seeds) of the Frobenius figure."""
        return 2 if self.quick else 3

    @property
    def batches(self) -> int:
        """Batches per seed of the Frobenius figure."""
        return 2 if self.quick else 3

    @property
    def training(self) -> dict:
        """Arguments of :func:`fisherlab.analysis.training_errors`."""
        if self.quick:
            return {"epochs": 2, "batch_size": 32, "basis_every": 4}
        return {"epochs": 3, "batch_size": 64, "basis_every": 20}


class _Problems:
    """Figure problems, built once per (model, seed)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._cache: dict[tuple[str, int], an.FigureProblem] = {}

    def get(self, name: str, offset: int = 0) -> an.FigureProblem:
        key = (name, self.settings.seed + offset)
        if key not in self._cache:
            self._cache[key] = an.figure_problem(name, key[1], self.settings.quick)
        return self._cache[key]


def _heatmaps(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    ((x, y),) = an.figure_batches(prob, p.settings.batch_size)
    return an.block_heatmaps(prob.model, prob.loss_fn, x, y)


def _frobenius(p: _Problems, name: str) -> FigureData:
    s = p.settings
    probs = [p.get(name, i) for i in range(s.seeds)]
    batches = an.figure_batches(probs[0], s.batch_size, s.batches)
    methods = an.default_methods(probs[0].model)
    return an.frobenius_errors([q.model for q in probs], probs[0].loss_fn, batches, methods)


def _spectra(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    ((x, y),) = an.figure_batches(prob, p.settings.batch_size)
    return an.spectra(prob.model, prob.loss_fn, x, y, an.default_methods(prob.model))


def _sample_correlation(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    ((x, y),) = an.figure_batches(prob, p.settings.correlation_batch)
    return an.sample_correlations(prob.model, prob.loss_fn, x, y)


def _kfe_correlation(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    ((x, y),) = an.figure_batches(prob, p.settings.batch_size)
    return an.kfe_decorrelation(prob.model, prob.loss_fn, x, y)


def _training(p: _Problems, name: str) -> FigureData:
    s = p.settings
    prob = an.figure_problem(name, s.seed, s.quick, warmup_epochs=0)  # SGD from initialisation
    split = prob.split
    return an.training_errors(
        prob.model,
        prob.loss_fn,
        split.x_train,
        split.y_train,
        seed=s.seed,
        progress=s.progress,
        **s.training,
    )


def _directions(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    ((x, y),) = an.figure_batches(prob, p.settings.batch_size)
    methods = an.default_methods(prob.model)
    return an.direction_quality_vs_damping(prob.model, prob.loss_fn, x, y, methods)


FAMILIES: dict[str, Callable[[_Problems, str], FigureData]] = {
    "heatmaps": _heatmaps,
    "frobenius": _frobenius,
    "spectra": _spectra,
    "sample_correlation": _sample_correlation,
    "kfe_correlation": _kfe_correlation,
    "training": _training,
    "directions": _directions,
}
"""Figure families, in the order of the README: name → data of one model."""


def run(
    families: Sequence[str] = tuple(FAMILIES),
    models: Sequence[str] = MODELS,
    out: str | Path = "figures",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    from_data: bool = False,
    timings: dict[str, float] | None = None,
) -> list[Path]:
    """Compute (or, with ``from_data``, load), draw and save the figures; returns the paths.

    ``timings``, if given, receives the seconds of each ``{model}-{family}``.
    """
    settings = Settings(seed, quick, progress)
    problems = _Problems(settings)
    out = Path(out)
    paths: list[Path] = []
    work = [(m, f) for m in models for f in families]
    bar = tqdm(work, desc="figures", disable=not progress, unit="fig")
    for model, family in bar:
        bar.set_postfix_str(f"{model} {family}")
        stem = f"{model}-{family}"
        start = time.perf_counter()
        if from_data:
            data = FigureData.load(out, stem)
        else:
            data = FAMILIES[family](problems, model)
            data.meta["model"] = an.figure_model(model, quick)[1]
            data.meta["seed"] = seed
            paths += data.save(out, stem)
        fig = plots.plot(data)
        paths += plots.save_figure(fig, out / stem)
        if timings is not None:
            timings[stem] = time.perf_counter() - start
    return paths


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=[*MODELS, "all"], default="all")
    p.add_argument("--out", default="figures", help="folder for PNG, PDF, CSV and JSON files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models and batches (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--from-data", action="store_true", help="redraw from saved CSV/JSON, no computing"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the matrices are small, and on a busy 2-core "
        "machine 2 threads made eigendecompositions up to 30× slower)",
    )


def cmd_figures(args: argparse.Namespace) -> int:
    """Run the ``figures`` subcommand."""
    start = time.perf_counter()
    models = MODELS if args.model == "all" else (args.model,)
    families = getattr(args, "only", None) or tuple(FAMILIES)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        paths = run(
            families, models, args.out, args.seed, args.quick, not args.quiet, args.from_data
        )
    finally:
        torch.set_num_threads(previous)
    pngs = sorted(str(p) for p in paths if p.suffix == ".png")
    print(f"{len(pngs)} figures in {time.perf_counter() - start:.1f} s: " + ", ".join(pngs))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``figures`` on the ``fisherlab`` command's subparsers."""
    p = subparsers.add_parser(
        "figures", help="regenerate the approximation-quality figures (PNG, PDF, CSV)"
    )
    _add_arguments(p)
    p.add_argument("--only", nargs="+", choices=list(FAMILIES), help="some families only")
    p.set_defaults(func=cmd_figures)
    return p


def script_main(family: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``analyses/{family}.py``: one figure family, same options as the command."""
    parser = argparse.ArgumentParser(description=f"fisherlab figure family {family!r}")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.only = [family]
    return cmd_figures(args)


__all__ = ["FAMILIES", "MODELS", "Settings", "add_parser", "cmd_figures", "run", "script_main"]
