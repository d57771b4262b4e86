"""Building a run: seeding, its data, its model and its optimizer."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from fisherlab import data, models, optim
from fisherlab.data import Split
from fisherlab.experiments.config import RunConfig


# ---------------------------------------------------------------------------- building
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


def make_optimizer(
    cfg: RunConfig, model: nn.Module, steps_per_epoch: int, loss_fn: nn.Module
) -> torch.optim.Optimizer:
    """The optimizer of a resolved config for ``model``."""
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
        model, lr=cfg.lr, damping=cfg.damping, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, fisher_type=cfg.fisher_type, loss_fn=loss_fn, **opts,
    )  # fmt: skip
