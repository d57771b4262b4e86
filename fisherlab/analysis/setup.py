"""Shared set-up of the figures: models, data, training, layer choice, exact references."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab import data as datasets
from fisherlab import models
from fisherlab.blocks import build_block
from fisherlab.blocks.base import CurvatureBlock
from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.capture import Capture, capture
from fisherlab.conventions import FisherlabError
from fisherlab.metrics import spectrum
from fisherlab.problem import Problem

APPROXIMATIONS = ("kfac", "ekfac", "skfac", "diag")
"""Approximations compared with the exact block by default."""

HEATMAP_METHODS = ("woodbury", "kfac", "ekfac", "skfac")
"""Methods shown next to the exact damped inverse (TENGraD Fig. 6 and its neighbours)."""

CONV_EXTRA = "woodbury:conv_gram=reduce_sum"
"""The Woodbury reduce-sum approximation, added for models with convolutions."""


@dataclass
class FigureProblem:
    """A model, its loss and data, as the figures use them.

    Attributes:
        name: Short name (``"mlp"``, ``"cnn"``).
        description: Architecture in words, for captions.
        model: The network (float64).
        loss_fn: The loss.
        split: The data.
        seed: Seed of the initialisation, the warm-up and the batches.
    """

    name: str
    description: str
    model: nn.Module
    loss_fn: nn.Module
    split: datasets.Split
    seed: int


def figure_model(name: str, quick: bool = False) -> tuple[nn.Module, str]:
    """The figures' model and its description.

    The library's default MLP (64-128-64-10) has 8320-parameter blocks, too big for dense
    heatmaps and eigendecompositions in the figures' time budget, so the figures use
    ``mlp(64, (32, 16), 10)`` and ``small_cnn(channels=(4, 8))``; ``quick`` (tests) uses tinier
    ones.
    """
    if name == "mlp":
        hidden = (8, 6) if quick else (32, 16)
        return models.mlp(64, hidden, 10), f"MLP 64-{'-'.join(map(str, hidden))}-10 (tanh)"
    if name == "cnn":
        channels = (2, 3) if quick else (4, 8)
        return (
            models.small_cnn(channels=channels),
            f"CNN conv3×3 1→{channels[0]}, conv3×3/2 {channels[0]}→{channels[1]}, linear→10 (ReLU)",
        )
    raise FisherlabError(f"unknown figure model {name!r}; choose 'mlp' or 'cnn'")


def train_sgd(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
) -> list[float]:
    """Plain mini-batch SGD (the model is trained in place); returns the loss of every step.

    Batches are drawn from a seeded permutation per epoch (the last incomplete batch is
    dropped). ``callback(step, epoch, xb, yb)`` runs before each update, on the parameters the
    update starts from.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            xb, yb = x[index], y[index]
            if callback is not None:
                callback(step, epoch, xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
    optimizer.zero_grad(set_to_none=True)
    return losses


def figure_problem(
    name: str = "mlp", seed: int = 0, quick: bool = False, warmup_epochs: int = 1
) -> FigureProblem:
    """The embedded default: a figure model on digits (float64), after ``warmup_epochs`` of SGD.

    The digits split is the library's (seed 0); ``seed`` sets the initialisation (through
    ``torch.manual_seed``, i.e. torch's global generator), the SGD batches and
    :func:`figure_batches`. ``quick`` uses a tinier model and 256 training images.
    """
    split = datasets.load_digits(dtype=torch.float64)
    if quick:
        split = datasets.Split(
            split.x_train[:256], split.y_train[:256], split.x_test, split.y_test, 10
        )
    torch.manual_seed(seed)
    model, description = figure_model(name, quick)
    model = model.double()
    loss_fn = nn.CrossEntropyLoss()
    if warmup_epochs:
        train_sgd(model, loss_fn, split.x_train, split.y_train, warmup_epochs, seed=seed)
    return FigureProblem(name, description, model, loss_fn, split, seed)


def figure_batches(
    problem: FigureProblem, batch_size: int = 128, count: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """``count`` disjoint training batches, from a permutation seeded by ``problem.seed``."""
    generator = torch.Generator().manual_seed(10_000 + problem.seed)
    order = torch.randperm(len(problem.split.x_train), generator=generator)
    if count * batch_size > len(order):
        raise FisherlabError(
            f"{count} batches of {batch_size} need {count * batch_size} training samples, "
            f"there are {len(order)}"
        )
    out = []
    for i in range(count):
        index = order[i * batch_size : (i + 1) * batch_size]
        out.append((problem.split.x_train[index], problem.split.y_train[index]))
    return out


def default_methods(model: nn.Module, base: Sequence[str] = APPROXIMATIONS) -> list[str]:
    """``base``, plus Woodbury reduce-sum when the model has convolutions (it is exact else)."""
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return [*base, CONV_EXTRA] if convs else list(base)


def choose_layer(cap: Capture, max_params: int = 200) -> str:
    """The largest layer with at most ``max_params`` parameters (else the smallest layer)."""
    sizes = {name: lc.layer.num_params for name, lc in cap.items()}
    fitting = [name for name, p in sizes.items() if p <= max_params]
    if fitting:
        return max(fitting, key=sizes.get)
    return min(sizes, key=sizes.get)


def exact_reference(cap: Capture, name: str) -> CurvatureBlock:
    """The exact block of a layer in its cheaper form for solves.

    ``ExactBlock`` (dense ``P×P``) when ``P`` is at most the number of rows ``M = R·N`` of ``J``,
    else ``woodbury`` (the same matrix through the ``M×M`` Gram).
    """
    lc = cap[name]
    rows = lc.G.shape[0] * lc.G.shape[1]
    return build_block("exact" if lc.layer.num_params <= rows else "woodbury", cap, name)


def exact_spectrum(cap: Capture, name: str) -> Tensor:
    """All ``P`` eigenvalues of the exact block, descending, from the smaller of ``F`` and ``K``.

    The non-zero eigenvalues of ``F = JᵀJ/ν`` are those of ``K/ν`` (``K = JJᵀ`` the Gram of the
    ``woodbury`` block); the rest are zero.
    """
    block = exact_reference(cap, name)
    if isinstance(block, WoodburyBlock):
        values = torch.linalg.eigvalsh(block.gram).clamp_min(0) / block.normaliser
        size = block.size
        values = (
            values[-size:]
            if len(values) >= size
            else torch.cat([values.new_zeros(size - len(values)), values])
        )
        return values.flip(0)
    return spectrum(block.matrix).clamp_min(0)  # PSD: rounding below zero is zero


def _capture(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None,
    x: Tensor | None,
    y: Tensor | None,
    fisher_type: str | None,
    force: bool = False,
) -> tuple[Capture, str]:
    """The capture of a problem's data (all its batches) or of one batch, and its Fisher type.

    With a :class:`~fisherlab.problem.Problem`, ``fisher_type`` overrides the problem's only
    with ``force`` (the empirical rows behind a loss gradient).
    """
    if isinstance(model, Problem):
        problem = model
        if force and fisher_type is not None:
            problem = problem.with_fisher_type(fisher_type)
        elif fisher_type is not None and fisher_type != problem.fisher_type:
            raise FisherlabError(
                f"fisher_type={fisher_type!r} given with a Problem of Fisher type "
                f"{problem.fisher_type!r}; leave it out"
            )
        return capture(problem), problem.fisher_type
    fisher_type = fisher_type or "true"
    return capture(model, loss_fn, x, y, fisher_type=fisher_type), fisher_type


def _layer_info(cap: Capture, name: str) -> dict[str, Any]:
    layer = cap[name].layer
    module = layer.module
    return {
        "layer": name,
        "type": type(module).__name__,
        "weight": "×".join(str(s) for s in module.weight.shape),
        "P": layer.num_params,
        "T": cap[name].positions,
    }
