"""A zoo of tiny problems: the test suite's fixtures and ``fisherlab verify``'s default workload.

Every case is float64 and seeded: MLPs with/without bias, tanh/ReLU; CNNs with stride, padding
(numbers and ``"same"``) and dilation; a Linear layer on sequences; a residual graph;
cross-entropy and MSE, mean and sum reductions. :data:`LAYER_TYPE_CASES` adds the other layer
types: a tiny ResNet with BatchNorm (eval mode, random running statistics), a token model with
an Embedding (with ``padding_idx``) and LayerNorm, and a CNN with GroupNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisherlab.models import resnet

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
    tokens: int | None = None  # inputs are token indices below this (else Gaussian)

    def build(self, batch_size: int, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
        """Model, loss, inputs and targets of a batch, all float64, seeded."""
        torch.manual_seed(seed)
        model = self.model().double()
        if self.tokens is not None:
            x = torch.randint(0, self.tokens, (batch_size, *self.input_shape))
        else:
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


def randomise_norm_layers(model: nn.Module) -> nn.Module:
    """Random ``γ, β`` and running statistics for every norm layer; BatchNorm in eval mode.

    At initialisation ``γ = 1, β = 0`` and the running statistics are ``0, 1``: a Fisher test on
    such a model would not see a mix-up of ``γ`` with ``β`` or of the statistics.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.5)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.eval()
    return model


class TokenNet(nn.Module):
    """Tokens ``[N, S]`` → Embedding (``padding_idx=0``) → LayerNorm → tanh → mean → Linear."""

    def __init__(self, vocab: int = 6, dim: int = 3, out: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.embed(x))).mean(dim=1))


def _tiny_resnet() -> nn.Module:
    return randomise_norm_layers(resnet(1, num_classes=3, widths=(2, 3)))


def _token_net() -> nn.Module:
    return randomise_norm_layers(TokenNet())


def _groupnorm_cnn() -> nn.Module:
    return randomise_norm_layers(
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.LayerNorm([4, 3, 3], bias=False),
            nn.Flatten(),
            nn.Linear(36, 3),
        )
    )


#: Problems with the other layer types (scale-and-shift, Embedding), kept apart from
#: :data:`CASES` (the Linear/Conv2d zoo of the default ``verify`` workload and the peer tests).
LAYER_TYPE_CASES: list[Case] = [
    Case("resnet-bn-ce", _tiny_resnet, nn.CrossEntropyLoss, (1, 5, 5), 3, backpack=False),
    Case("tokens-embedding-ce", _token_net, nn.CrossEntropyLoss, (4,), 3, False, tokens=6),
    Case("cnn-groupnorm-mse", _groupnorm_cnn, nn.MSELoss, (1, 5, 5), 3, backpack=False),
]
