"""``fisherlab figures``: every approximation-quality figure of the embedded default, regenerated.

For each model (``mlp``: 64-32-16-10 tanh; ``cnn``: conv 1→4, conv/2 4→8, linear; both on
digits, float64) one training run (SGD with momentum from a seeded initialisation to a low
loss, a checkpoint at every step) is shared by every family in :data:`FAMILIES`: the
trajectory families evaluate its checkpoints against the Fisher of the training set, the
snapshot families its final state. Each family computes the data (:mod:`fisherlab.analysis`),
draws the figure (:mod:`fisherlab.plots`) and writes
``{out}/{model}-{family}.png`` and ``.pdf``, the data as ``{model}-{family}-{table}.csv`` and
the settings as ``{model}-{family}.json``, and the claims read off the figures as ``claims.md``
(:mod:`fisherlab.analysis.claims`: each claim, its numbers and in how many runs it holds,
computed from those tables). ``--from-data`` redraws from those files without recomputing.
Other data (local files, a sample of them, mean-pooled) and the larger model size are chosen
by :class:`fisherlab.analysis.FigureSource` (``--data``, ``--samples``, ``--pool``, ``--size``),
whose label then prefixes the file names. The scripts in ``analyses/`` run one
family each through :func:`script_main`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fisherlab import analysis as an
from fisherlab import plots
from fisherlab.analysis import FigureData, claims
from fisherlab.cli.common import OneLineParser, positive_int, run_reporting_errors, seed
from fisherlab.conventions import FisherlabError
from fisherlab.data import DATASETS, check_data_dir
from fisherlab.files import check_output_folder
from fisherlab.problem import Problem

MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Settings:
    """Sizes of the computations (the defaults, or the tiny ``quick`` ones of the tests)."""

    seed: int = 0
    quick: bool = False
    progress: bool = True
    runs: int = 1
    source: an.FigureSource = field(default_factory=an.FigureSource)

    def runs_of(self, family: str) -> int:
        """Training runs (seeds ``seed``, ``seed+1``, …) of a family in :data:`OVER_RUNS`.

        At least 3 (``runs``, ``--seeds``, can ask for more); ``runs`` as given with ``quick``.
        """
        if self.quick:
            return self.runs
        return max(self.runs, 3)

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
        """Arguments of :func:`fisherlab.analysis.train_trajectory` (the shared run)."""
        if self.quick:
            return {
                "epochs": 3,
                "batch_size": 32,
                "lr": 0.1,
                "optimizer_options": {"momentum": 0.9},
            }
        return {"epochs": 10, "batch_size": 64, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}

    def epoch_steps(self, per_epoch: int, epochs: Sequence[float]) -> list[int]:
        """Steps of the given epochs (at least 1, distinct)."""
        return sorted({max(1, round(e * per_epoch)) for e in epochs})

    @property
    def trajectory_epochs(self) -> tuple[float, ...]:
        """Epochs of the decomposition's checkpoints."""
        return (0.5, 1, 3) if self.quick else (0.5, 1, 3, 10)

    @property
    def protocol_epochs(self) -> tuple[float, ...]:
        """Epochs of the EKFAC-protocol checkpoints (besides step 0)."""
        return (0.25, 0.5, 1, 2, 3) if self.quick else (0.1, 0.25, 0.5, 1, 2, 3, 5, 7, 10)

    @property
    def lag(self) -> int:
        """Staleness ``k`` of the decomposition, in steps."""
        return 2 if self.quick else 10

    @property
    def decomposition_batch(self) -> int:
        """``b`` of the decomposition."""
        return 16 if self.quick else 64


class _Problems:
    """Figure problems and their training run, built once per (model, seed).

    :meth:`get` returns the problem with the model in its final trained state; :meth:`trajectory`
    the run's checkpoints.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._cache: dict[tuple[str, int], tuple[an.FigureProblem, an.Trajectory]] = {}

    def _build(self, name: str, offset: int) -> tuple[an.FigureProblem, an.Trajectory]:
        key = (name, self.settings.seed + offset)
        if key not in self._cache:
            prob = an.figure_problem(
                name, key[1], self.settings.quick, warmup_epochs=0, source=self.settings.source
            )
            split = prob.split
            run = an.train_trajectory(
                prob.model, prob.loss_fn, split.x_train, split.y_train, seed=key[1],
                **self.settings.training,
            )  # fmt: skip
            self._cache[key] = (prob, run)
        return self._cache[key]

    def get(self, name: str, offset: int = 0) -> an.FigureProblem:
        return self._build(name, offset)[0]

    def trajectory(self, name: str, offset: int = 0) -> an.Trajectory:
        return self._build(name, offset)[1]

    def reference(self, name: str, fisher_type: str, offset: int = 0) -> Problem:
        """The Fisher of the training set at the final state of run ``offset``."""
        prob = self.get(name, offset)
        x, y = prob.split.x_train, prob.split.y_train
        return an.reference_problem(prob.model, prob.loss_fn, x, y, fisher_type)

    def state(self, name: str) -> dict:
        """Training state and protocol of the final model, for the JSON."""
        run = self.trajectory(name)
        last = run.checkpoints[-1]
        return {"state": last.describe(), "training": {**run.settings, **last.as_row()}}


def _batch_size(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    sizes = (8, 32, 256) if p.settings.quick else (16, 32, 64, 128, 256, 512, 10**9)
    x, y = prob.split.x_train, prob.split.y_train
    repeats = 2 if p.settings.quick else 20
    return an.batch_size_sweep(prob.model, prob.loss_fn, x, y, sizes, repeats, seed=p.settings.seed)


def _spatial(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    x, y = prob.split.x_train, prob.split.y_train
    batch, repeats = (16, 2) if p.settings.quick else (64, 3)
    return an.spatial_sweep(
        prob.model, prob.loss_fn, x, y, batch_size=batch, repeats=repeats, seed=p.settings.seed
    )


def _over_runs(
    p: _Problems,
    name: str,
    family: str,
    compute: Callable[[an.FigureProblem, an.Trajectory, int], FigureData],
) -> FigureData:
    """``compute(problem, trajectory, seed)`` for each training run, rows tagged by ``run``."""
    count = p.settings.runs_of(family)
    parts = [
        compute(p.get(name, i), p.trajectory(name, i), p.settings.seed + i) for i in range(count)
    ]
    data = parts[0]
    for key in data.tables:
        data.tables[key] = [
            {"run": i, **row} for i, part in enumerate(parts) for row in part.tables[key]
        ]
    data.meta["runs"] = count
    data.meta["finals"] = [
        part.meta.get("final") or p.trajectory(name, i).checkpoints[-1].describe()
        for i, part in enumerate(parts)
    ]
    return data


def _fisher_types(p: _Problems, name: str) -> FigureData:
    s = p.settings

    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        steps = s.epoch_steps(run.settings["steps_per_epoch"], s.trajectory_epochs)
        x, y = prob.split.x_train, prob.split.y_train
        return an.fisher_type_comparison(run, prob.loss_fn, x, y, steps)

    return _over_runs(p, name, "fisher_types", compute)


def _heatmaps(p: _Problems, name: str) -> FigureData:
    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        ((x, y),) = an.figure_batches(prob, p.settings.batch_size)
        return an.block_heatmaps(
            prob.model, prob.loss_fn, x, y, fisher_type="empirical", reference="network"
        )

    data = _over_runs(p, name, "heatmaps", compute)
    data.tables["inverse"] = [r for r in data.tables["inverse"] if r.pop("run") == 0]
    data.meta["protocol"] = (
        "TENGraD Fig. 6: empirical Fisher of one batch; exact = the layer's block of the whole "
        "network's (F+λI)⁻¹ (exact NGD); matrices of the first run, summary of every run"
    )
    return data


def _block_diagonal(p: _Problems, name: str) -> FigureData:
    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        x, y = prob.split.x_train, prob.split.y_train
        return an.block_diagonal_error(
            an.reference_problem(prob.model, prob.loss_fn, x, y, "empirical")
        )

    return _over_runs(p, name, "block_diagonal", compute)


def _decomposition(p: _Problems, name: str) -> FigureData:
    s = p.settings

    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        steps = s.epoch_steps(run.settings["steps_per_epoch"], s.trajectory_epochs)
        steps = sorted({max(step, s.lag) for step in steps})
        x, y = prob.split.x_train, prob.split.y_train
        return an.error_decomposition(
            run, prob.loss_fn, x, y, steps, s.lag, s.decomposition_batch,
            batches=2 if s.quick else 3, fisher_type="true", seed=seed,
        )  # fmt: skip

    return _over_runs(p, name, "decomposition", compute)


def _ekfac_protocol(p: _Problems, name: str) -> FigureData:
    s = p.settings

    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        steps = [0, *s.epoch_steps(run.settings["steps_per_epoch"], s.protocol_epochs)]
        x, y = prob.split.x_train, prob.split.y_train
        return an.ekfac_protocol(run, prob.loss_fn, x, y, steps)

    return _over_runs(p, name, "ekfac_protocol", compute)


def _fngd(p: _Problems, name: str) -> FigureData:
    s = p.settings
    epochs = (1, 2) if s.quick else (1, 2, 4, 6, 9)
    positions = (0, 1) if s.quick else (0, 3, 6, 9, 12, 15)
    dampings = (1e-4, 1e-2, 1e-1, 1.0)

    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        x, y = prob.split.x_train, prob.split.y_train
        return an.coefficient_sharing(
            run, prob.loss_fn, x, y, epochs, dampings, positions, seed=seed
        )

    return _over_runs(p, name, "fngd", compute)


def _frobenius(p: _Problems, name: str) -> FigureData:
    s = p.settings
    probs = [p.get(name, i) for i in range(s.seeds)]
    batches = an.figure_batches(probs[0], s.batch_size, s.batches)
    methods = an.default_methods(probs[0].model)
    return an.frobenius_errors([q.model for q in probs], probs[0].loss_fn, batches, methods)


def _spectra(p: _Problems, name: str) -> FigureData:
    # no Woodbury reduce-sum: its Gram over the whole training set (N·C rows) is too large
    return an.spectra(p.reference(name, "true"), methods=list(an.APPROXIMATIONS))


def _sample_correlation(p: _Problems, name: str) -> FigureData:
    prob = p.get(name)
    ((x, y),) = an.figure_batches(prob, p.settings.correlation_batch)
    return an.sample_correlations(prob.model, prob.loss_fn, x, y)


def _kfe_correlation(p: _Problems, name: str) -> FigureData:
    return an.kfe_decorrelation(p.reference(name, "empirical"))


def _directions(p: _Problems, name: str) -> FigureData:
    methods = list(an.APPROXIMATIONS)  # as in _spectra
    relative = [10.0**e for e in torch.linspace(-7, 2, 19).tolist()]  # λ / λ_max of the layer

    def compute(prob: an.FigureProblem, run: an.Trajectory, seed: int) -> FigureData:
        x, y = prob.split.x_train, prob.split.y_train
        ref = an.reference_problem(prob.model, prob.loss_fn, x, y, "true")
        return an.direction_quality_vs_damping(ref, methods=methods, relative_dampings=relative)

    return _over_runs(p, name, "directions", compute)


def _stated(
    family: Callable[[_Problems, str], FigureData],
) -> Callable[[_Problems, str], FigureData]:
    """``family`` with the training state and protocol of the shared run added to its meta."""

    def compute(p: _Problems, name: str) -> FigureData:
        data = family(p, name)
        data.meta.update(p.state(name))
        if data.meta.get("runs", 1) > 1:  # every run's final state, not only the first's
            data.meta["state"] = "final states: " + " | ".join(data.meta["finals"])
        return data

    compute.__doc__ = family.__doc__
    return compute


_FAMILIES: dict[str, Callable[[_Problems, str], FigureData]] = {
    "decomposition": _decomposition,
    "ekfac_protocol": _ekfac_protocol,
    "fngd": _fngd,
    "heatmaps": _heatmaps,
    "block_diagonal": _block_diagonal,
    "batch_size": _batch_size,
    "spatial": _spatial,
    "fisher_types": _fisher_types,
    "frobenius": _frobenius,
    "spectra": _spectra,
    "sample_correlation": _sample_correlation,
    "kfe_correlation": _kfe_correlation,
    "directions": _directions,
}
FAMILIES = {name: _stated(f) for name, f in _FAMILIES.items()}
OVER_RUNS = (
    "decomposition",
    "ekfac_protocol",
    "fngd",
    "fisher_types",
    "heatmaps",
    "block_diagonal",
    "directions",
)
"""Families computed over ``≥ 3`` training runs by default (the others: one run's final state;
the Frobenius family: 3 seeds × 3 batches; the batch-size sweep: up to 20 batches per size)."""
ONLY_MODELS = {"spatial": ("cnn",)}
"""Families that apply to some models only (SKFAC's spatial sampling: convolutions)."""
"""Figure families, in the order of the README: name → data of one model (with its state)."""


def run(
    families: Sequence[str] = tuple(FAMILIES),
    models: Sequence[str] = MODELS,
    out: str | Path = "figures",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    from_data: bool = False,
    timings: dict[str, float] | None = None,
    runs: int = 1,
    source: an.FigureSource | None = None,
) -> list[Path]:
    """Compute (or, with ``from_data``, load), draw and save the figures; returns the paths.

    ``timings``, if given, receives the seconds of each ``{model}-{family}``; ``runs``: see
    :meth:`Settings.runs_of`; ``source``: the data and model size (default: digits, small),
    whose :attr:`~fisherlab.analysis.FigureSource.label` prefixes the file names.
    """
    source = source or an.FigureSource()
    settings = Settings(seed, quick, progress, runs, source)
    problems = _Problems(settings)
    out = Path(out)
    paths: list[Path] = []
    work = [(m, f) for m in models for f in families if m in ONLY_MODELS.get(f, (m,))]
    bar = tqdm(work, desc="figures", disable=not progress, unit="fig")
    for model, family in bar:
        bar.set_postfix_str(f"{model} {family}")
        stem = f"{source.label}{model}-{family}"
        start = time.perf_counter()
        if from_data:
            data = FigureData.load(out, stem)
        else:
            data = FAMILIES[family](problems, model)
            data.meta["model"] = problems.get(model).description
            data.meta["seed"] = seed
            if not source.is_default:
                data.meta["source"] = asdict(source)
            paths += data.save(out, stem)
        fig = plots.plot(data)
        paths += plots.save_figure(fig, out / stem)
        if timings is not None:
            timings[stem] = time.perf_counter() - start
    paths.append(write_claims(out, source.label))
    return paths


def claim_stems(label: str = "") -> list[str]:
    """Every ``{label}{model}-{family}`` whose tables a claim can be read from."""
    return [f"{label}{m}-{f}" for m in MODELS for f in claims.CLAIMS]


def write_claims(out: str | Path, label: str = "") -> Path:
    """``{out}/{label}claims.md`` from the tables in ``out`` (:mod:`fisherlab.analysis.claims`)."""
    return claims.write_claims(out, claim_stems(label), f"{label}claims.md")


USER_FAMILIES = (
    "ekfac_protocol",
    "fisher_types",
    "directions",
    "spectra",
    "block_diagonal",
    "heatmaps",
)
"""Families that run on a user's model and checkpoints (``--model module:factory
--checkpoints``): the EKFAC protocol (basis fixed at the first checkpoint, no EKFAC-ra) and the
Fisher-type comparison at every checkpoint, the others at the last."""


def _user_family(
    family: str, run: an.Trajectory, loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> FigureData:
    """One family of :data:`USER_FAMILIES` on a user's trajectory (reference: ``(x, y)``)."""
    last = run.steps[-1]
    model = run.model_at(last)
    if family == "fisher_types":
        return an.fisher_type_comparison(run, loss_fn, x, y, run.steps)
    if family == "ekfac_protocol":
        return an.ekfac_protocol(run, loss_fn, x, y, run.steps)
    if family == "heatmaps":
        return an.block_heatmaps(model, loss_fn, x, y, fisher_type="empirical", reference="network")
    reference = an.reference_problem(model, loss_fn, x, y, "true")
    if family == "directions":
        relative = [10.0**e for e in torch.linspace(-7, 2, 19).tolist()]
        return an.direction_quality_vs_damping(
            reference, methods=list(an.APPROXIMATIONS), relative_dampings=relative
        )
    if family == "spectra":
        return an.spectra(reference, methods=list(an.APPROXIMATIONS))
    return an.block_diagonal_error(reference.with_fisher_type("empirical"))


def run_user(
    factory: str,
    checkpoints: str,
    families: Sequence[str] = USER_FAMILIES,
    out: str | Path = "figures",
    source: an.FigureSource | None = None,
) -> list[Path]:
    """The families of :data:`USER_FAMILIES` on a user's model and checkpoint files.

    Every family is computed before anything is written (a family that cannot treat a layer
    fails with nothing half-written). Files are ``{out}/{module-factory}-{family}.*``.
    """
    unknown = [f for f in families if f not in USER_FAMILIES]
    if unknown:
        raise FisherlabError(
            f"families {unknown} need a built-in training run; with --checkpoints choose from "
            f"{list(USER_FAMILIES)}"
        )
    source = source or an.FigureSource()
    split = source.load()
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = split.x_train, split.y_train
    run = an.load_trajectory(factory, checkpoints, loss_fn, x, y)
    name = factory.replace("/", "_").replace(":", "-").removesuffix(".py")
    results = {}
    for family in families:
        data = _user_family(family, run, loss_fn, x, y)
        data.meta.update(
            {
                "model": f"{factory} at checkpoints {run.steps}",
                "state": run.checkpoints[-1].describe(),
                "checkpoints": checkpoints,
            }
        )
        results[family] = data
    out = Path(out)
    paths: list[Path] = []
    for family, data in results.items():
        stem = f"{source.label}{name}-{family}"
        paths += data.save(out, stem)
        paths += plots.save_figure(plots.plot(data), out / stem)
    return paths


def model_choice(text: str) -> str:
    """``--model``: ``mlp``, ``cnn``, ``all``, or a user's ``package.module:factory``."""
    if text in (*MODELS, "all") or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; choose from {[*MODELS, 'all']} or give package.module:factory"
    )


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=model_choice,
        default="all",
        help="mlp, cnn, all (default), or your own model: package.module:factory (with "
        "--checkpoints)",
    )
    p.add_argument(
        "--checkpoints",
        help="checkpoint files of a --model package.module:factory, as a glob pattern "
        "('run/ckpt-*.pt'); steps from the files or their names",
    )
    p.add_argument("--out", default="figures", help="folder for PNG, PDF, CSV and JSON files")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="training runs (seeds) of the families computed over runs (at least 3: each run "
        "drawn thin, the median thick)",
    )
    p.add_argument(
        "--data",
        choices=list(DATASETS),
        default="digits",
        help="data set (default: the embedded digits; the others are read from local files)",
    )
    p.add_argument("--data-dir", help="folder of the data set's files")
    p.add_argument(
        "--samples",
        type=positive_int,
        help="the first N training images are the training and reference set (default: all)",
    )
    p.add_argument(
        "--pool",
        type=positive_int,
        default=1,
        help="mean-pool the images K×K (e.g. 2: Fashion-MNIST at 14×14; default 1)",
    )
    p.add_argument(
        "--size",
        choices=list(an.SIZES),
        default="small",
        help="model size: small (MLP widths 32-16, CNN channels 4-8) or large (the library's "
        "128-64 and 8-16; dense blocks of 8,320 parameters on digits, much slower)",
    )
    p.add_argument("--quick", action="store_true", help="tiny models and batches (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--from-data", action="store_true", help="redraw from saved CSV/JSON, no computing"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads (default 1: the matrices are small, and on a busy 2-core "
        "machine 2 threads made eigendecompositions up to 30× slower)",
    )


def _source(args: argparse.Namespace) -> an.FigureSource:
    """The data and model size named by the arguments."""
    return an.FigureSource(args.data, args.data_dir, args.samples, args.pool, args.size)


def cmd_figures(args: argparse.Namespace) -> int:
    """Run the ``figures`` subcommand."""
    check_output_folder(args.out)
    check_data_dir(args.data, args.data_dir)
    start = time.perf_counter()
    user = ":" in args.model
    if user != bool(getattr(args, "checkpoints", None)):
        raise FisherlabError(
            "--checkpoints goes with --model package.module:factory, and a user's model needs "
            "--checkpoints"
        )
    if user:
        paths = run_user(
            args.model, args.checkpoints, getattr(args, "only", None) or USER_FAMILIES,
            args.out, _source(args),
        )  # fmt: skip
        pngs = sorted(str(p) for p in paths if p.suffix == ".png")
        print(f"{len(pngs)} figures in {time.perf_counter() - start:.1f} s: " + ", ".join(pngs))
        return 0
    models = MODELS if args.model == "all" else (args.model,)
    families = getattr(args, "only", None) or tuple(FAMILIES)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        paths = run(
            families, models, args.out, args.seed, args.quick, not args.quiet, args.from_data,
            runs=max(1, args.seeds), source=_source(args),
        )  # fmt: skip
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
    parser = OneLineParser(description=f"fisherlab figure family {family!r}")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.only = [family]
    return run_reporting_errors(cmd_figures, args)


__all__ = [
    "FAMILIES",
    "MODELS",
    "USER_FAMILIES",
    "Settings",
    "add_parser",
    "cmd_figures",
    "run",
    "run_user",
    "script_main",
]
