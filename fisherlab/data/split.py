"""A train/test split of a classification data set, and scikit-learn's embedded digits.

Digits: 1,797 grey-scale 8×8 images of the digits 0–9. :func:`load_digits` standardises every
pixel with the mean and standard deviation of the training split (constant pixels are left at
zero) and returns images ``[N, 1, 8, 8]`` with int64 labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


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
