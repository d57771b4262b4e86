"""Optimizers head to head: a reproducible training loop, complete logs, grid search, curves.

One run trains one model with one optimizer and one seed (:func:`train`). It writes, into its
folder, ``config.json`` (everything needed to repeat it: :meth:`RunConfig.from_dict` reads it
back) and, after every finished epoch, ``log.csv`` and ``log.json`` with one row per epoch:

* ``train_loss``/``train_accuracy``: the whole training set, evaluated after the epoch;
  ``train_loss_running``: the mean of the epoch's mini-batch losses;
* ``test_loss``/``test_accuracy``;
* ``time_s``: cumulative training wall time (forward, backward, optimizer step, batching; the
  evaluations are excluded), ``epoch_time_s`` its increment;
* ``step_time_s``: the wall time inside ``optimizer.step()`` during the epoch, this module's
  definition of *time spent in curvature work*. For fisherlab's optimizers it covers the
  factor updates, decompositions, solves and the parameter update; the statistics that their
  hooks store during forward and backward are not in it (they are in ``forward_backward_s``).
  For SGD and Adam it is their own step time, the baseline to compare with.
* ``skipped_steps``: steps a fisherlab optimizer refused because of non-finite statistics.

Row 0 evaluates the initial model (time 0), so curves of all optimizers start at one point.
A run stops early with status ``"diverged"`` when its loss is no longer finite. On
``KeyboardInterrupt`` the finished epochs are already on disk; the log is marked
``"interrupted"`` and the interrupt propagates.

Reproducibility: :func:`train` seeds ``torch``, ``numpy`` and ``random`` with the run's seed,
initialises the model right after seeding, and shuffles with its own ``torch.Generator`` (on the
CPU, whatever the device). On the CPU the same config and seed give bit-identical per-epoch
losses in one environment (same torch build and thread count, both recorded in ``config.json``).

Grid search (:func:`grid_search`) trains every learning rate × damping pair for the same budget
and selects, at every epoch, the pair with the best criterion at that epoch (mean over the grid
seeds): the per-epoch best selection of the EKFAC paper. The pair that is best at the last
epoch is the tuned setting that :func:`compare_optimizers` uses for its seeded runs.

Example:
    >>> from fisherlab.experiments import RunConfig, train
    >>> cfg = RunConfig(optimizer="kfac", epochs=1, train_subset=64, test_subset=64, batch_size=32)
    >>> result = train(cfg, progress=False)
    >>> [row["epoch"] for row in result.rows], result.status
    ([0, 1], 'finished')

The package: :mod:`~fisherlab.experiments.config` (what defines a run, each field's type and
range), :mod:`~fisherlab.experiments.schema` (config files, checked before anything runs),
:mod:`~fisherlab.experiments.fingerprint` (model code and data content, for reuse),
:mod:`~fisherlab.experiments.setup` (data, model, optimizer), :mod:`~fisherlab.experiments.runner`
(the epochs), :mod:`~fisherlab.experiments.runlog` (run folders), :mod:`~fisherlab.experiments.grid`
(the search), :mod:`~fisherlab.experiments.summary` (tables) and
:mod:`~fisherlab.experiments.compare` (``compare-optimizers``); the figures are drawn by
:mod:`fisherlab.experiments.figures`.
"""

from fisherlab.experiments.compare import (
    QUICK,
    compare_optimizers,
    load_experiment,
    quick_variant,
    write_curves,
)
from fisherlab.experiments.config import (
    DEFAULT_GRID,
    DEFAULT_HYPER,
    DEFAULT_TARGETS,
    FIRST_ORDER,
    OPTIMIZER_NAMES,
    ROW_KEYS,
    SELECT_CRITERIA,
    RunConfig,
    environment,
)
from fisherlab.experiments.fingerprint import data_fingerprint, model_fingerprint, model_sources
from fisherlab.experiments.grid import GridResult, grid_search, grid_values
from fisherlab.experiments.runlog import (
    REUSE_KEYS,
    RunFolderWarning,
    RunLogger,
    RunResult,
    find_runs,
    load_run,
)
from fisherlab.experiments.runner import evaluate, train
from fisherlab.experiments.schema import EXPERIMENT_KEYS, check_experiment
from fisherlab.experiments.setup import (
    build_model,
    load_split,
    make_optimizer,
    preflight,
    seed_everything,
)
from fisherlab.experiments.summary import group_runs, markdown_table, summarise, time_to_target

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_HYPER",
    "DEFAULT_TARGETS",
    "EXPERIMENT_KEYS",
    "FIRST_ORDER",
    "OPTIMIZER_NAMES",
    "QUICK",
    "REUSE_KEYS",
    "ROW_KEYS",
    "SELECT_CRITERIA",
    "GridResult",
    "RunConfig",
    "RunFolderWarning",
    "RunLogger",
    "RunResult",
    "build_model",
    "check_experiment",
    "compare_optimizers",
    "data_fingerprint",
    "environment",
    "evaluate",
    "find_runs",
    "grid_search",
    "grid_values",
    "group_runs",
    "load_experiment",
    "load_run",
    "load_split",
    "make_optimizer",
    "markdown_table",
    "model_fingerprint",
    "model_sources",
    "preflight",
    "quick_variant",
    "seed_everything",
    "summarise",
    "time_to_target",
    "train",
    "write_curves",
]
