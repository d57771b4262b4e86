"""What defines a run: :class:`RunConfig`, the defaults, and what results depend on besides it."""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fisherlab import data, models, optim
from fisherlab.conventions import FisherlabError, check_int, check_keys, check_range
from fisherlab.experiments.fingerprint import data_fingerprint, model_fingerprint

FIRST_ORDER = ("sgd", "adam")
OPTIMIZER_NAMES: tuple[str, ...] = (*FIRST_ORDER, *optim.OPTIMIZERS)
"""Every optimizer :func:`train` knows: SGD, Adam and fisherlab's curvature optimizers."""


DEFAULT_HYPER: dict[str, dict[str, float | None]] = {
    "sgd": {"lr": 0.3, "damping": None},
    "adam": {"lr": 0.01, "damping": None},
    "kfac": {"lr": 0.3, "damping": 1.0},
    "ekfac": {"lr": 3e-4, "damping": 1e-4},
    "ekfac-ra": {"lr": 0.3, "damping": 1.0},
    "tengrad": {"lr": 0.3, "damping": 1.0},
    "skfac": {"lr": 0.03, "damping": 0.1},
    "fngd": {"lr": 0.3, "damping": 1.0},
}
"""Learning rate and (absolute) damping used when a run gives none: an earlier grid search's
choice for the digits MLP (lowest training loss). These dampings are about ``λ_max`` of that
Fisher at initialisation, where the preconditioner does little (direction cosine 0.96–0.999);
``configs/digits.json`` holds the settings tuned in the curvature regime (``λ/λ_max``, validation
loss) per model. A ``damping`` given with ``relative_damping`` is ``λ/λ_max``; give ``lr`` with
it: the curvature optimizers' results depend mostly on ``lr/λ``.
"""

DEFAULT_GRID: dict[str, dict[str, Any]] = {
    "sgd": {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]},
    "adam": {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]},
    "*": {
        "lr": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "damping": [1.0, 1e-1, 1e-2, 1e-3, 1e-4],
        "relative": True,
    },
}
"""The grid of :func:`~fisherlab.experiments.grid.grid_search` per optimizer (``"*"``: every
curvature optimizer). With ``"relative": True`` the dampings are ``λ/λ_max``, ``λ_max`` the
largest eigenvalue of the Fisher at each run's initialisation (``RunConfig.relative_damping``):
from the SGD-like regime (``λ = λ_max``: ``(F+λI)⁻¹`` within a factor 2 of ``I/λ``) down to
``10⁻⁴·λ_max``, crossed with learning rates over four decades. The first-order optimizers'
one axis gets half-decade steps. Every point trains for the same epochs with the same seeds; a
winner on the edge of the grid extends it (``extend``)."""

DEFAULT_TARGETS = {name: entry.target_accuracy for name, entry in data.DATASETS.items()}
"""Test accuracy of the time-to-target table when none is given (from the data registry)."""

SELECT_CRITERIA = {"val_loss": min, "val_accuracy": max, "train_loss": min}
"""Grid-search criteria and whether lower (``min``) or higher (``max``) is better: the
validation split's loss or accuracy, or the training loss (how far an optimizer optimises).
Never the test set."""

ROW_KEYS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "train_loss_running",
    "test_loss",
    "test_accuracy",
    "time_s",
    "epoch_time_s",
    "step_time_s",
    "forward_backward_s",
    "eval_time_s",
    "steps",
    "skipped_steps",
    "val_loss",
    "val_accuracy",
    "lambda_max",
    "damping",
    "damping_ratio",
    "direction_cosine",
)
"""Columns of ``log.csv``, in order."""


# --------------------------------------------------------------------------------- schema
SEED_LIMIT = 2**32
"""Seeds lie in ``[0, 2³²)`` (numpy's and scikit-learn's range)."""


def _integer(low: int, high: int | None = None, optional: bool = False):
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        value = check_int(name, value)
        if value < low or (high is not None and value >= high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high})"
            raise FisherlabError(f"{name} must be an integer {bounds}, got {value!r}")

    return check


def _number(low: float, high: float | None = None, open_low: bool = False, optional=False):
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        check_range(name, value, low, high, open_low)

    return check


def _of_type(kind: type | tuple[type, ...], text: str, optional: bool = False):
    def check(name: str, value: Any) -> None:
        if (value is None and optional) or isinstance(value, kind):
            return
        raise FisherlabError(f"{name} must be {text}, got {value!r}")

    return check


FIELD_CHECKS: dict[str, Any] = {
    "optimizer": _of_type(str, "a string"),
    "model": _of_type(str, "a string"),
    "data": _of_type(str, "a string"),
    "data_dir": _of_type(str, "a folder name (a string) or null", optional=True),
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "lr": _number(0, open_low=True, optional=True),
    "damping": _number(0, open_low=True, optional=True),
    "momentum": _number(0, 1),
    "weight_decay": _number(0),
    "fisher_type": _of_type(str, "a string"),
    "optimizer_options": _of_type(dict, "a JSON object of optimizer arguments"),
    "seed": _integer(0, SEED_LIMIT),
    "split_seed": _integer(0, SEED_LIMIT),
    "device": _of_type(str, "a string"),
    "train_subset": _integer(1, optional=True),
    "test_subset": _integer(1, optional=True),
    "relative_damping": _of_type(bool, "true or false"),
    "validation": _number(0, 1),
    "eval_test": _of_type(bool, "true or false"),
    "scale_samples": _integer(0),
    "eval_train": _of_type(bool, "true or false"),
    "eval_batch_size": _integer(1),
    "threads": _integer(1, optional=True),
    "tag": _of_type(str, "a string"),
}
"""The type and range of every :class:`RunConfig` field (:func:`check_fields`)."""


def check_fields(cfg: RunConfig) -> None:
    """Refuse the first field of ``cfg`` whose type or range is wrong (one line naming it).

    Integers must be integers (``2.0``, ``"2"`` and ``true`` are refused), numbers finite.
    """
    for f in dataclasses.fields(cfg):
        FIELD_CHECKS[f.name](f.name, getattr(cfg, f.name))
    bad = [k for k in cfg.optimizer_options if not isinstance(k, str)]
    if bad:
        raise FisherlabError(f"optimizer_options keys must be strings, got {bad!r}")


# --------------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    """Everything that defines one training run; ``config.json`` holds :meth:`to_dict`.

    Args:
        optimizer: One of :data:`OPTIMIZER_NAMES`.
        model: A name of :data:`fisherlab.models.MODELS` or ``"path/to/file.py:factory"``.
        data: One of :data:`fisherlab.data.DATASETS`.
        data_dir: Folder of the local data files (not needed for digits).
        epochs: Passes over the training set.
        batch_size: Mini-batch size (the last batch of an epoch may be smaller).
        lr: Learning rate (``None``: :data:`DEFAULT_HYPER`).
        damping: Damping ``λ`` of the curvature optimizers (``None``: :data:`DEFAULT_HYPER`;
            ignored by SGD and Adam).
        momentum: Heavy-ball momentum of SGD and the curvature optimizers (Adam: ``β₁``).
        weight_decay: Weight decay (decoupled in fisherlab's optimizers, L2 in SGD/Adam).
        fisher_type: ``"empirical"`` or ``"mc"`` for the curvature optimizers.
        optimizer_options: Further keyword arguments of the optimizer's constructor.
        seed: Seed of initialisation and shuffling.
        split_seed: Seed of the train/test split (digits), fixed across seeds by default.
        device: ``"cpu"`` or ``"cuda"``.
        train_subset: Use only the first ``n`` training samples (``None``: all).
        test_subset: Use only the first ``n`` test samples.
        relative_damping: Read ``damping`` as ``λ/λ_max``: the optimizer's damping is ``damping``
            times the largest eigenvalue of the Fisher (:func:`fisherlab.scale.fisher_scale`,
            ``fisher_type``) measured on ``scale_samples`` training samples at initialisation.
        validation: Share of the training set held out for validation (stratified, seeded by
            ``split_seed``); the run trains on the rest and logs ``val_loss``/``val_accuracy``.
        eval_test: Evaluate the test set after each epoch (grid searches turn it off: they
            select on the validation split and never look at the test set).
        scale_samples: Training samples ``λ_max`` is measured on, at initialisation and after
            every epoch (``0``: not measured, unless ``relative_damping`` needs it).
        eval_train: Evaluate the whole training set after each epoch (else ``train_loss`` is
            the running mean of the mini-batch losses).
        eval_batch_size: Batch size of the evaluations.
        threads: ``torch.set_num_threads`` during the run, restored after it (``None``: leave
            as is). One thread gives the steadiest timings of small models on a busy machine.
        tag: Free label; runs tagged ``"grid"`` are left out of curves by default.
    """

    optimizer: str = "kfac"
    model: str = "mlp"
    data: str = "digits"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    damping: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    fisher_type: str = "empirical"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    split_seed: int = 0
    device: str = "cpu"
    train_subset: int | None = None
    test_subset: int | None = None
    relative_damping: bool = False
    validation: float = 0.0
    eval_test: bool = True
    scale_samples: int = 256
    eval_train: bool = True
    eval_batch_size: int = 1024
    threads: int | None = None
    tag: str = ""

    def resolved(self) -> RunConfig:
        """A checked copy with the default learning rate and damping filled in.

        Raises:
            FisherlabError: Naming the first invalid field.
        """
        cfg = copy.deepcopy(self)
        for name in ("optimizer", "data", "model", "device"):
            if not isinstance(getattr(cfg, name), str):
                raise FisherlabError(f"{name} must be a string, got {getattr(cfg, name)!r}")
        if cfg.optimizer not in OPTIMIZER_NAMES:
            raise FisherlabError(
                f"unknown optimizer {cfg.optimizer!r}; choose from {list(OPTIMIZER_NAMES)}"
            )
        if cfg.data not in data.DATASETS:
            raise FisherlabError(
                f"unknown data set {cfg.data!r}; choose from {list(data.DATASETS)}"
            )
        if cfg.model not in models.MODELS and ":" not in cfg.model:
            raise FisherlabError(
                f"unknown model {cfg.model!r}; choose from {list(models.MODELS)} or give "
                "'path/to/file.py:factory'"
            )
        data.check_data_dir(cfg.data, cfg.data_dir)
        if cfg.device not in ("cpu", "cuda"):
            raise FisherlabError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
        defaults = DEFAULT_HYPER[cfg.optimizer]
        if cfg.lr is None:
            cfg.lr = defaults["lr"]
        if cfg.optimizer in FIRST_ORDER:
            cfg.damping = None
        elif cfg.damping is None:
            cfg.damping = defaults["damping"]
        check_fields(cfg)
        if cfg.scale_samples < (1 if cfg.relative_damping else 0):
            raise FisherlabError(
                f"scale_samples must be >= {1 if cfg.relative_damping else 0}"
                f"{' with relative_damping' if cfg.relative_damping else ''}, "
                f"got {cfg.scale_samples}"
            )
        if cfg.relative_damping and cfg.optimizer in FIRST_ORDER:
            cfg.relative_damping = False
        if cfg.fisher_type != "empirical" and cfg.optimizer in FIRST_ORDER:
            raise FisherlabError(
                f"--fisher-type applies to curvature optimizers, not {cfg.optimizer}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "run settings") -> RunConfig:
        """The config of a dict such as :meth:`to_dict` or a ``config.json``'s ``"run"`` entry.

        Raises:
            FisherlabError: For keys that are not fields (typos in config files).
        """
        if not isinstance(values, dict):
            raise FisherlabError(f"{where} must be a JSON object, got {values!r}")
        check_keys(where, values, [f.name for f in dataclasses.fields(cls)])
        return cls(**values)

    @property
    def label(self) -> str:
        """Short description, e.g. ``kfac mlp digits seed 0``."""
        return f"{self.optimizer} {Path(self.model).name} {self.data} seed {self.seed}"


def environment(cfg: RunConfig) -> dict[str, Any]:
    """What the results depend on besides the config: versions, threads, device, machine.

    With the fingerprints of the model's code (``model_sha256`` and ``model_files``, for a
    ``file.py:factory`` model) and of the data's content (``data_sha256``): see
    :mod:`fisherlab.experiments.fingerprint`.
    """
    import fisherlab

    env: dict[str, Any] = {
        "fisherlab": fisherlab.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if cfg.device == "cuda" and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    model = model_fingerprint(cfg.model)
    if model is not None:
        env["model_sha256"], env["model_files"] = model
    env["data_sha256"] = data_fingerprint(cfg.data, cfg.data_dir)
    return env
