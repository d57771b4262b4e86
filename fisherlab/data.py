"""The one registry of data sets (:data:`DATASETS`, :func:`load`); nothing downloads.

scikit-learn's digits is embedded; Fashion-MNIST, MNIST and CIFAR-10 are read from local files by
:mod:`fisherlab.datasets`. Every command and the experiment runner load data through
:func:`load`, so adding a data set touches this file (and a reader) only.

Digits: 1,797 grey-scale 8×8 images of the digits 0–9. :func:`load_digits` standardises every
pixel with the mean and standard deviation of the training split (constant pixels are left at
zero) and returns images ``[N, 1, 8, 8]`` with int64 labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fisherlab.conventions import FisherlabError


@dataclass(frozen=True)
class Split:
    """A train/test split of a classification data set."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])


def load_digits(
    test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Split:
    """scikit-learn's digits, standardised, with a seeded stratified train/test split.

    Args:
        test_fraction: Share of samples held out for testing.
        seed: Seed of the split.
        dtype: Floating dtype of the images.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0

    def images(a: np.ndarray) -> Tensor:
        return torch.as_tensor((a - mean) / std, dtype=dtype).reshape(-1, 1, 8, 8)

    return Split(images(x_tr), torch.as_tensor(y_tr), images(x_te), torch.as_tensor(y_te), 10)


Loader = Callable[["str | os.PathLike | None", int, torch.dtype], Split]


@dataclass(frozen=True)
class DataSet:
    """One registered data set.

    Attributes:
        loader: ``(data_dir, seed, dtype) -> Split``.
        description: One line for help texts.
        target_accuracy: Test accuracy of the optimizer comparisons' time-to-target table.
        local_files: Whether it is read from local files (``--data-dir``).
    """

    loader: Loader
    description: str
    target_accuracy: float
    local_files: bool = True


def _digits(data_dir: str | os.PathLike | None, seed: int, dtype: torch.dtype) -> Split:
    return load_digits(seed=seed, dtype=dtype)


def _idx(name: str) -> Loader:
    def loader(data_dir: str | os.PathLike | None, seed: int, dtype: torch.dtype) -> Split:
        from fisherlab.datasets import load_idx_dataset

        return load_idx_dataset(name, data_dir, dtype)

    return loader


def _cifar10(data_dir: str | os.PathLike | None, seed: int, dtype: torch.dtype) -> Split:
    from fisherlab.datasets import load_cifar10

    return load_cifar10(data_dir, dtype)


DATASETS: dict[str, DataSet] = {
    "digits": DataSet(
        _digits, "scikit-learn's 8×8 digits, embedded (1,437 train / 360 test)", 0.95, False
    ),
    "fashion-mnist": DataSet(
        _idx("fashion-mnist"), "Fashion-MNIST IDX files (60,000 / 10,000)", 0.85
    ),
    "mnist": DataSet(_idx("mnist"), "MNIST IDX files (60,000 / 10,000)", 0.97),
    "cifar10": DataSet(_cifar10, "CIFAR-10 python batches (50,000 / 10,000)", 0.6),
}
"""Every data set known by name (the ``--data`` choices); their files: :mod:`fisherlab.datasets`."""


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Load a data set of :data:`DATASETS` by name.

    Args:
        name: ``"digits"``, ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.
        data_dir: Folder of the local files (not used by digits).
        seed: Seed of the train/test split (digits only; the others ship their own split).
        dtype: Floating dtype of the images.

    Raises:
        FisherlabError: For an unknown name; :class:`fisherlab.datasets.DataFilesError` for
            missing files.
    """
    if name not in DATASETS:
        raise FisherlabError(f"unknown data set {name!r}; choose from {list(DATASETS)}")
    return DATASETS[name].loader(data_dir, seed, dtype)
