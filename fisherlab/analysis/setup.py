"""Shared set-up of the figures: models, data, training, layer choice, exact references."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab import data as datasets
from fisherlab import models
from fisherlab.analysis.trajectory import train_trajectory
from fisherlab.blocks import build_block
from fisherlab.blocks.base import CurvatureBlock
from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.capture import Capture, capture
from fisherlab.conventions import FisherlabError, check_positive_int
from fisherlab.metrics import spectrum
from fisherlab.problem import Problem

APPROXIMATIONS = ("kfac", "ekfac", "skfac", "diag")
"""Approximations compared with the exact block by default."""

HEATMAP_METHODS = ("woodbury", "kfac", "ekfac", "skfac", "diag")
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


SIZES = {"small": {"mlp": (32, 16), "cnn": (4, 8)}, "large": {"mlp": (128, 64), "cnn": (8, 16)}}
"""Hidden widths (MLP) and channels (CNN) of the figure models; ``large`` is the library's default
size (on digits, MLP blocks of 8,320 parameters: 0.5 GB each as dense matrices)."""

_QUICK = {"mlp": (8, 6), "cnn": (2, 3)}


@dataclass(frozen=True)
class FigureSource:
    """Which data and model size the figures use; the default is the embedded digits, ``small``.

    Attributes:
        data: A data set of :data:`fisherlab.data.DATASETS` (others than digits are read from
            local files, nothing downloads).
        data_dir: Folder of its files (``None``: the data set's default place).
        samples: The first ``samples`` training images form the training and reference set
            (``None``: all of them).
        pool: Images are mean-pooled ``pool×pool`` (1: as stored); e.g. 2 turns Fashion-MNIST's
            28×28 into 14×14, so that the first layer's dense block stays a few thousand
            parameters.
        size: ``"small"`` or ``"large"`` (:data:`SIZES`).
    """

    data: str = "digits"
    data_dir: str | None = None
    samples: int | None = None
    pool: int = 1
    size: str = "small"

    def __post_init__(self) -> None:
        if self.data not in datasets.DATASETS:
            raise FisherlabError(
                f"unknown data set {self.data!r}; choose from {list(datasets.DATASETS)}"
            )
        if self.size not in SIZES:
            raise FisherlabError(f"unknown model size {self.size!r}; choose from {list(SIZES)}")
        object.__setattr__(self, "pool", check_positive_int("pool", self.pool))
        if self.samples is not None:
            object.__setattr__(self, "samples", check_positive_int("samples", self.samples))

    @property
    def is_default(self) -> bool:
        """Whether this is the embedded default (digits, all images, as stored, small)."""
        return self == FigureSource()

    @property
    def label(self) -> str:
        """File-name prefix: empty for the default, else e.g. ``fashion-mnist-n2000-pool2-``."""
        if self.is_default:
            return ""
        parts = [self.data]
        if self.samples is not None:
            parts.append(f"n{self.samples}")
        if self.pool > 1:
            parts.append(f"pool{self.pool}")
        if self.size != "small":
            parts.append(self.size)
        return "-".join(parts) + "-"

    def load(self, quick: bool = False) -> datasets.Split:
        """The split (float64): the first ``samples`` training images, mean-pooled.

        ``quick`` (tests) keeps at most 256 training images.
        """
        split = datasets.load(self.data, self.data_dir, dtype=torch.float64)
        if self.samples is not None and self.samples > len(split.x_train):
            raise FisherlabError(
                f"samples={self.samples} but {self.data} has {len(split.x_train)} training images"
            )
        count = self.samples or len(split.x_train)
        if quick:
            count = min(count, 256)
        x_train, x_test = split.x_train[:count], split.x_test
        if self.pool > 1:
            size = split.input_shape[-1]
            if len(split.input_shape) != 3 or size % self.pool:
                raise FisherlabError(
                    f"pool={self.pool} does not divide the {self.data} images {split.input_shape}"
                )
            x_train = nn.functional.avg_pool2d(x_train, self.pool)
            x_test = nn.functional.avg_pool2d(x_test, self.pool)
        y_train = split.y_train[:count]
        return datasets.Split(x_train, y_train, x_test, split.y_test, split.num_classes)

    def describe(self, split: datasets.Split) -> str:
        """The data in words (empty for the default, whose protocol the README states)."""
        if self.is_default:
            return ""
        shape = "×".join(map(str, split.input_shape))
        pooled = f", mean-pooled {self.pool}×{self.pool}" if self.pool > 1 else ""
        return f" on {self.data} ({len(split.x_train):,} training images {shape}{pooled})"


def figure_model(
    name: str,
    quick: bool = False,
    input_shape: Sequence[int] = (1, 8, 8),
    size: str = "small",
    num_classes: int = 10,
) -> tuple[nn.Module, str]:
    """The figures' model for images of ``input_shape``, and its description.

    The library's default MLP (64-128-64-10) has 8320-parameter blocks, too big for dense
    heatmaps and eigendecompositions in the figures' time budget, so the figures use
    ``mlp(64, (32, 16), 10)`` and ``small_cnn(channels=(4, 8))`` (``size="small"``); ``large``
    uses the library's default widths (:data:`SIZES`), ``quick`` (tests) tinier ones.
    """
    if size not in SIZES:
        raise FisherlabError(f"unknown model size {size!r}; choose from {list(SIZES)}")
    shape = tuple(input_shape)
    if name == "mlp":
        hidden = _QUICK["mlp"] if quick else SIZES[size]["mlp"]
        widths = "-".join(map(str, (math.prod(shape), *hidden, num_classes)))
        return models.mlp(math.prod(shape), hidden, num_classes), f"MLP {widths} (tanh)"
    if name == "cnn":
        c1, c2 = _QUICK["cnn"] if quick else SIZES[size]["cnn"]
        if len(shape) != 3 or shape[1] != shape[2]:
            raise FisherlabError(f"the figure CNN needs square images [C, H, H], got {shape}")
        channels, image = shape[0], shape[1]
        return (
            models.small_cnn(channels, image, num_classes, channels=(c1, c2)),
            f"CNN conv3×3 {channels}→{c1}, conv3×3/2 {c1}→{c2}, linear→{num_classes} (ReLU)",
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

    :func:`~fisherlab.analysis.trajectory.train_trajectory` keeping only the final state: batches
    from a seeded permutation per epoch (the last incomplete batch is dropped).
    ``callback(step, epoch, xb, yb)`` runs before each update, on the parameters the update
    starts from.
    """
    per_epoch = len(x) // batch_size
    on_step = None
    if callback is not None:

        def on_step(step: int, _: nn.Module, xb: Tensor, yb: Tensor) -> None:
            callback(step, step // per_epoch, xb, yb)

    run = train_trajectory(
        model, loss_fn, x, y, epochs, checkpoints=[epochs * per_epoch], batch_size=batch_size,
        lr=lr, seed=seed, on_step=on_step,
    )  # fmt: skip
    return run.step_losses


def figure_problem(
    name: str = "mlp",
    seed: int = 0,
    quick: bool = False,
    warmup_epochs: int = 1,
    source: FigureSource | None = None,
) -> FigureProblem:
    """A figure model on the figures' data (float64), after ``warmup_epochs`` of SGD.

    The default ``source`` is the embedded digits with the library's split (seed 0); ``seed``
    sets the initialisation (through ``torch.manual_seed``, i.e. torch's global generator), the
    SGD batches and :func:`figure_batches`. ``quick`` uses a tinier model and at most 256
    training images.
    """
    source = source or FigureSource()
    split = source.load(quick)
    torch.manual_seed(seed)
    model, description = figure_model(
        name, quick, split.input_shape, source.size, split.num_classes
    )
    description += source.describe(split)
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
        "weight": "×".join(str(s) for s in layer.weight.shape),
        "P": layer.num_params,
        "T": cap[name].positions,
    }
