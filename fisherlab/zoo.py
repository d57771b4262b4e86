"""A zoo of tiny problems: the test suite's fixtures and ``fisherlab verify``'s default workload.

Every case is float64 and seeded: MLPs with/without bias, tanh/ReLU; CNNs with stride, padding
(numbers and ``"same"``) and dilation; a Linear layer on sequences; a residual graph;
cross-entropy and MSE, mean and sum reductions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BATCH_SIZES = (1, 3, 17)


class SequenceNet(nn.Module):
    """A Linear layer on sequences [N, S, D], mean over positions, then a head (not Sequential)."""

    def __init__(self, d: int = 4, s: int = 3, hidden: int = 5, out: int = 3):
        super().__init__()
        self.s, self.d = s, d
        self.embed = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x.view(x.shape[0], self.s, self.d)))
        return self.head(h.mean(dim=1))


class ResidualNet(nn.Module):
    """x + f(x) in the middle: BackPACK's converter turns the sum into a SumModule."""

    def __init__(self, d: int = 4, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, 5)
        self.act = nn.Tanh()
        self.block = nn.Linear(5, 5)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(5, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        h = h + self.act2(self.block(h))
        return self.head(h)


@dataclass(frozen=True)
class Case:
    """A model, a loss and a way to make a batch."""

    name: str
    model: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    out: int
    backpack: bool = True  # whether BackPACK can take the model (else the torch.func path)

    def build(self, batch_size: int, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
        """Model, loss, inputs and targets of a batch, all float64, seeded."""
        torch.manual_seed(seed)
        model = self.model().double()
        x = torch.randn(batch_size, *self.input_shape, dtype=torch.float64)
        loss_fn = self.loss()
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            y = torch.randint(0, self.out, (batch_size,))
        else:
            y = torch.randn(batch_size, self.out, dtype=torch.float64)
        return model, loss_fn, x, y


def _mlp(act: type[nn.Module], bias: bool) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(
        nn.Linear(5, 4, bias=bias),
        act(),
        nn.Linear(4, 4, bias=bias),
        act(),
        nn.Linear(4, 3, bias=bias),
    )


def _cnn_stride_pad() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def _cnn_dilation() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, dilation=2, padding=2),
        nn.Tanh(),
        nn.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
        nn.Flatten(),
        nn.Linear(2 * 5 * 2, 3),
    )


def _cnn_same() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 4, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)
    )


CASES: list[Case] = [
    Case("mlp-tanh-bias-ce", _mlp(nn.Tanh, True), nn.CrossEntropyLoss, (5,), 3),
    Case("mlp-relu-nobias-ce", _mlp(nn.ReLU, False), nn.CrossEntropyLoss, (5,), 3),
    Case("mlp-tanh-mse", _mlp(nn.Tanh, True), nn.MSELoss, (5,), 3),
    Case(
        "mlp-relu-sum-ce",
        _mlp(nn.ReLU, True),
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        (5,),
        3,
    ),
    Case("mlp-tanh-sum-mse", _mlp(nn.Tanh, False), lambda: nn.MSELoss(reduction="sum"), (5,), 3),
    Case("cnn-stride-pad-ce", _cnn_stride_pad, nn.CrossEntropyLoss, (2, 6, 6), 3),
    Case("cnn-dilation-mse", _cnn_dilation, nn.MSELoss, (1, 5, 5), 3),
    Case("cnn-same-ce", _cnn_same, nn.CrossEntropyLoss, (1, 5, 5), 3, backpack=False),
    Case("seq-linear-ce", SequenceNet, nn.CrossEntropyLoss, (12,), 3, backpack=False),
    Case("residual-mse", ResidualNet, nn.MSELoss, (4,), 3),
]
