"""Building a run: seeding, data (with a validation split), model, Fisher's scale, optimizer."""

from __future__ import annotations

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


def run_data(cfg: RunConfig, split: Split) -> RunData:
    """The run's tensors: its training subset, minus a stratified validation share, and test.

    The validation samples are drawn from the (subset of the) training set with ``split_seed``,
    stratified by class, so every seed of a grid point sees the same validation set and the
    test set is never looked at for selection.
    """
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
