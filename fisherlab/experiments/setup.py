"""Building a run: seeding, data (with a validation split), model, Fisher's scale, optimizer."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fisherlab import data, models, optim
from fisherlab.conventions import FisherlabError
from fisherlab.data import Split
from fisherlab.experiments.config import FIRST_ORDER, RunConfig
from fisherlab.problem import Problem
from fisherlab.scale import fisher_scale


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global state user factories may draw from)
    torch.manual_seed(seed)


def load_split(cfg: RunConfig) -> Split:
    """The data of a run, before subsetting (float32, on the CPU)."""
    return data.load(cfg.data, cfg.data_dir, seed=cfg.split_seed)


build_model = models.create
"""The model of a run (:func:`fisherlab.models.create`)."""


@dataclass(frozen=True)
class RunData:
    """The tensors of a run: training part, validation part (may be empty) and test set."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device) -> RunData:
        """The same tensors on ``device``."""
        return RunData(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def check_subsets(cfg: RunConfig, split: Split) -> None:
    """Refuse a ``train_subset``/``test_subset`` larger than the data (never clipped silently)."""
    for name, part, available in (
        ("train", "training", len(split.y_train)),
        ("test", "test", len(split.y_test)),
    ):
        asked = getattr(cfg, f"{name}_subset")
        if asked is not None and asked > available:
            raise FisherlabError(
                f"{name}_subset={asked} exceeds the {available:,} {part} samples of "
                f"{cfg.data}; give at most {available} (or none: all of them)"
            )


def check_model_fits(model: nn.Module, cfg: RunConfig, split: Split) -> None:
    """Refuse a model that cannot take the data's inputs or gives the wrong number of outputs.

    One forward pass of two training samples in eval mode, without gradients and without
    touching the random state (the run stays bit-identical).
    """
    x = split.x_train[:2]
    shape = "×".join(map(str, split.input_shape))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                out = model(x)
            finally:
                model.train(was_training)
    except Exception as err:  # the user's model: one clear line instead of its traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FisherlabError(
            f"the model {cfg.model} does not take {cfg.data}'s inputs of shape {shape} "
            f"({type(err).__name__}: {first})"
        ) from err
    expected = (x.shape[0], split.num_classes)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise FisherlabError(
            f"the model {cfg.model} maps {cfg.data}'s inputs of shape {shape} to {got}; "
            f"expected [batch, {split.num_classes}] class scores"
        )
    if not out.is_floating_point():
        raise FisherlabError(f"the model {cfg.model} returns {out.dtype} scores, not floats")


def run_data(cfg: RunConfig, split: Split) -> RunData:
    """The run's tensors: its training subset, minus a stratified validation share, and test.

    The validation samples are drawn from the (subset of the) training set with ``split_seed``,
    stratified by class, so every seed of a grid point sees the same validation set and the
    test set is never looked at for selection.
    """
    check_subsets(cfg, split)
    x, y = split.x_train[: cfg.train_subset], split.y_train[: cfg.train_subset]
    x_test, y_test = split.x_test[: cfg.test_subset], split.y_test[: cfg.test_subset]
    empty_x, empty_y = x[:0], y[:0]
    if not cfg.validation:
        return RunData(x, y, empty_x, empty_y, x_test, y_test)
    from sklearn.model_selection import train_test_split

    n_val = round(cfg.validation * len(y))
    classes = int(torch.unique(y).numel())
    if n_val < classes or len(y) - n_val < classes:
        raise FisherlabError(
            f"validation={cfg.validation:g} of {len(y)} training samples leaves too few for "
            f"{classes} classes in the training or validation part"
        )
    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=n_val, random_state=cfg.split_seed, stratify=y.numpy()
    )
    train_idx, val_idx = torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(val_idx))
    return RunData(x[train_idx], y[train_idx], x[val_idx], y[val_idx], x_test, y_test)


def lambda_max(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, fisher_type: str, seed: int = 0
) -> float:
    """``λ_max`` of ``model``'s Fisher on ``(x, y)`` (:func:`fisherlab.scale.fisher_scale`).

    Measured in eval mode (the mode is restored), over the supported layers, inside fisherlab's
    analysis scope (an attached optimizer records nothing of it).
    """
    was_training = model.training
    model.eval()
    try:
        problem = Problem(
            model, loss_fn, (x, y), fisher_type=fisher_type, seed=seed, skip_unsupported=True,
            progress=False,
        )  # fmt: skip
        return fisher_scale(problem).lambda_max
    finally:
        model.train(was_training)


def optimizer_fisher_type(cfg: RunConfig) -> str:
    """The Fisher the run's optimizer uses (the empirical one for SGD and Adam)."""
    return "empirical" if cfg.optimizer in FIRST_ORDER else cfg.fisher_type


def make_optimizer(
    cfg: RunConfig,
    model: nn.Module,
    steps_per_epoch: int,
    loss_fn: nn.Module,
    damping: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of a resolved config for ``model``.

    Args:
        cfg: The run.
        model: Its model.
        steps_per_epoch: Steps per epoch (FNGD's coefficient sharing needs it).
        loss_fn: The loss.
        damping: The absolute damping (``None``: ``cfg.damping``; a run with
            ``relative_damping`` passes ``cfg.damping·λ_max``).
    """
    try:
        return _make_optimizer(cfg, model, steps_per_epoch, loss_fn, damping)
    except FisherlabError as err:
        raise FisherlabError(f"{cfg.optimizer}: {err}") from err
    except (TypeError, ValueError) as err:  # torch's own optimizers check their arguments
        raise FisherlabError(
            f"{cfg.optimizer} refuses its settings {_settings(cfg)}: {err}"
        ) from err


def _settings(cfg: RunConfig) -> str:
    shown = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    return ", ".join(f"{k}={v!r}" for k, v in {**shown, **cfg.optimizer_options}.items())


def preflight(cfg: RunConfig, split: Split) -> None:
    """Everything a run can refuse before it writes a file, checked once and undone.

    The subsets and the validation split, the model (built and given two samples) and the
    optimizer (constructed with the run's settings, then closed). ``cfg`` must be resolved.

    Raises:
        FisherlabError: One line naming the first problem.
    """
    tensors = run_data(cfg, split)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model, split.input_shape, split.num_classes)
    check_model_fits(model, cfg, split)
    steps = max(1, math.ceil(tensors.x_train.shape[0] / cfg.batch_size))
    opt = make_optimizer(cfg, model, steps, nn.CrossEntropyLoss())
    getattr(opt, "close", lambda: None)()


def _make_optimizer(
    cfg: RunConfig,
    model: nn.Module,
    steps_per_epoch: int,
    loss_fn: nn.Module,
    damping: float | None = None,
) -> torch.optim.Optimizer:
    opts = dict(cfg.optimizer_options)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            **opts,
        )  # fmt: skip
    if cfg.optimizer == "adam":
        opts.setdefault("betas", (cfg.momentum, 0.999))
        return torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **opts
        )
    if cfg.optimizer == "fngd":
        opts.setdefault("steps_per_epoch", steps_per_epoch)
    cls = optim.OPTIMIZERS[cfg.optimizer]
    return cls(
        model, lr=cfg.lr, damping=cfg.damping if damping is None else damping,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, fisher_type=cfg.fisher_type,
        loss_fn=loss_fn, **opts,
    )  # fmt: skip
