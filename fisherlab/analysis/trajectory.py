"""Training with checkpoints, and the fixed reference set every checkpoint is judged against.

:func:`train_trajectory` trains a model (plain SGD by default, or any optimizer of
:data:`fisherlab.optim.OPTIMIZERS`) on seeded mini-batches and keeps a copy of the parameters
at the requested steps; :meth:`Trajectory.model_at` gives the model of one checkpoint back.
:func:`reference_problem` is the :class:`~fisherlab.problem.Problem` of a fixed reference set
(by default the whole training set), streamed in batches: the Fisher every approximation is
compared with, whatever batch it was built from.

Example:
    >>> import fisherlab.analysis as an
    >>> p = an.figure_problem("mlp", quick=True, warmup_epochs=0)
    >>> t = an.train_trajectory(p.model, p.loss_fn, p.split.x_train, p.split.y_train,
    ...                         epochs=1, checkpoints=[0, 4], batch_size=32)
    >>> [c.step for c in t.checkpoints], t.checkpoints[1].loss < t.checkpoints[0].loss
    ([0, 4], True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.conventions import FisherlabError
from fisherlab.problem import Problem


def sample_gradient_norms_sq(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, chunk: int = 256
) -> Tensor:
    """``‖∇_θ ℓ(f(x_n), y_n)‖²`` of every sample, over all trainable parameters, ``[N]``.

    Per-sample gradients by ``torch.func`` (``vmap`` of ``grad`` of the loss of one sample),
    ``chunk`` samples at a time; any model without batch-coupled layers in its current mode.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    parts = []
    for i in range(0, len(x), chunk):
        grads = per_sample(params, x[i : i + chunk], y[i : i + chunk])
        parts.append(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    return torch.cat(parts)


def effective_samples(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> float:
    """``n_eff`` of the empirical Fisher of ``(x, y)``.

    :func:`fisherlab.metrics.effective_sample_count` of :func:`sample_gradient_norms_sq`.
    """
    from fisherlab.metrics import effective_sample_count

    return effective_sample_count(sample_gradient_norms_sq(model, loss_fn, x, y))


def training_state(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``(x, y)`` (no gradient), as a figure states them."""
    with torch.no_grad():
        out = model(x)
        return {
            "loss": float(loss_fn(out, y)),
            "accuracy": float((out.argmax(-1) == y).double().mean()),
        }


@dataclass
class Checkpoint:
    """The parameters after ``step`` updates, and the training state there.

    Attributes:
        step: Updates done.
        epoch: ``step`` in epochs (a float).
        state: A copy of the model's ``state_dict``.
        loss: Loss on the whole training set.
        accuracy: Accuracy on the whole training set.
    """

    step: int
    epoch: float
    state: dict[str, Tensor]
    loss: float
    accuracy: float

    def describe(self) -> str:
        """``"epoch 3.0, loss 0.21, acc. 95%"`` for titles."""
        return f"epoch {self.epoch:.1f}, loss {self.loss:.3g}, acc. {100 * self.accuracy:.0f}%"

    def as_row(self) -> dict[str, Any]:
        """The training state as a table row."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "accuracy": self.accuracy,
        }


@dataclass
class Trajectory:
    """Checkpoints of one training run.

    Attributes:
        model: The trained model (its final parameters; an optimizer's hooks stay on it).
        checkpoints: In order of ``step``.
        step_losses: The mini-batch loss of every update.
        batches: The training-set indices of every update's batch.
        settings: Optimizer, learning rate, batch size, seed, steps per epoch.
    """

    model: nn.Module
    checkpoints: list[Checkpoint]
    step_losses: list[float] = field(default_factory=list)
    batches: list[Tensor] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    template: nn.Module | None = field(default=None, repr=False)
    """A copy of the model taken before any optimizer touched it (no hooks)."""
    n_eff: dict[int, float] = field(default_factory=dict, repr=False)
    """``n_eff`` of the reference set per step, filled by :meth:`state_at`."""

    def at(self, step: int) -> Checkpoint:
        """The checkpoint after ``step`` updates."""
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise FisherlabError(f"no checkpoint at step {step}; there are {self.steps}")

    @property
    def steps(self) -> list[int]:
        """Steps of the checkpoints."""
        return [c.step for c in self.checkpoints]

    def state_at(self, step: int, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
        """The checkpoint's row (:meth:`Checkpoint.as_row`) with ``n_eff`` of ``(x, y)`` added.

        ``n_eff = (Σ‖j_n‖²)²/Σ‖j_n‖⁴`` of the per-sample gradients (the empirical Fisher's
        effective sample count, :func:`effective_samples`), computed once per step.
        """
        if step not in self.n_eff:
            self.n_eff[step] = effective_samples(self.model_at(step), loss_fn, x, y)
        return {**self.at(step).as_row(), "n_eff": self.n_eff[step]}

    def model_at(self, step: int) -> nn.Module:
        """A copy of the model with the parameters of the checkpoint at ``step`` (no hooks)."""
        model = copy.deepcopy(self.template if self.template is not None else self.model)
        model.load_state_dict(self.at(step).state)
        return model


def trajectory_optimizer(
    model: nn.Module, name: str, lr: float, options: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """``"sgd"`` (``torch.optim.SGD``) or a :data:`fisherlab.optim.OPTIMIZERS` name."""
    from fisherlab.optim import OPTIMIZERS

    options = dict(options or {})
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, **options)
    if name not in OPTIMIZERS:
        raise FisherlabError(
            f"unknown optimizer {name!r}; choose 'sgd' or one of {list(OPTIMIZERS)}"
        )
    return OPTIMIZERS[name](model, lr=lr, **options)


def train_trajectory(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    checkpoints: Sequence[int] | None = None,
    batch_size: int = 64,
    lr: float = 0.1,
    optimizer: str = "sgd",
    optimizer_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    on_step: Callable[[int, nn.Module, Tensor, Tensor], None] | None = None,
) -> Trajectory:
    """Train ``model`` in place on seeded mini-batches, keeping checkpoints.

    Each epoch draws a permutation from a generator seeded by ``seed`` (the last incomplete
    batch is dropped). ``on_step(step, model, xb, yb)`` runs before each update, on the
    parameters the update starts from.

    Args:
        model: The network (trained in place; :attr:`Trajectory.model` is it).
        loss_fn: The loss.
        x: Training inputs.
        y: Training targets.
        epochs: Epochs.
        checkpoints: Steps (updates done) to keep; ``0`` is the initial model. Steps beyond
            ``epochs`` are an error. ``None``: every step (small models: a copy of the
            parameters per step).
        batch_size: Mini-batch size.
        lr: Learning rate.
        optimizer: ``"sgd"`` or a fisherlab optimizer name.
        optimizer_options: Keyword arguments of the optimizer (``momentum=0.9``, ``damping=``).
        seed: Seed of the batch order.
        on_step: Callback before each update.
    """
    per_epoch = len(x) // batch_size
    total = epochs * per_epoch
    wanted = sorted(set(range(total + 1) if checkpoints is None else map(int, checkpoints)))
    if not wanted or wanted[0] < 0 or wanted[-1] > total:
        raise FisherlabError(f"checkpoints {wanted} must lie in 0…{total} ({epochs} epochs)")
    template = copy.deepcopy(model)  # before an optimizer registers hooks on the model
    opt = trajectory_optimizer(model, optimizer, lr, optimizer_options)
    generator = torch.Generator().manual_seed(seed)
    kept: list[Checkpoint] = []
    losses: list[float] = []
    used: list[Tensor] = []

    def keep(step: int) -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        kept.append(
            Checkpoint(step, step / per_epoch, state, **training_state(model, loss_fn, x, y))
        )

    step = 0
    if wanted[0] == 0:
        keep(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, per_epoch * batch_size, batch_size):
            if step >= wanted[-1]:
                break
            index = order[start : start + batch_size]
            xb, yb = x[index], y[index]
            used.append(index)
            if on_step is not None:
                on_step(step, model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step in wanted:
                keep(step)
    opt.zero_grad(set_to_none=True)
    settings = {
        "optimizer": optimizer,
        "optimizer_options": dict(optimizer_options or {}),
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "steps_per_epoch": per_epoch,
        "train_epochs": epochs,
    }
    return Trajectory(model, kept, losses, used, settings, template)


def reference_problem(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher_type: str = "empirical",
    batch_size: int = 512,
) -> Problem:
    """The :class:`~fisherlab.problem.Problem` of a fixed reference set, in batches."""
    data = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return Problem(model, loss_fn, data, fisher_type=fisher_type, progress=False)


__all__ = [
    "Checkpoint",
    "Trajectory",
    "effective_samples",
    "reference_problem",
    "sample_gradient_norms_sq",
    "train_trajectory",
    "training_state",
    "trajectory_optimizer",
]
