"""A user's model and checkpoints as a :class:`~fisherlab.analysis.trajectory.Trajectory`.

The figure families take a trajectory (a model and its parameters at several steps); the
built-in trainings produce one (:func:`~fisherlab.analysis.trajectory.train_trajectory`), and
:func:`load_trajectory` makes one from a user's model (an instance, or a factory named
``package.module:factory``) and checkpoints (state dicts, or files saved by ``torch.save``),
each with its step:

* a file holding a state dict: the step is the last integer in its file name
  (``ckpt-0400.pt`` → 400);
* a file holding ``{"state_dict" | "model" | "model_state_dict": …, "step": …, "epoch": …}``:
  the step (and epoch) are read from it.

Bad input is refused before anything is computed, in one line: a factory that does not import
or returns no ``nn.Module``; a checkpoint that does not fit the model (the first missing,
unexpected or mis-shaped entry is named); steps that repeat or are out of order.

Example:
    >>> import torch, fisherlab.analysis as an
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    >>> states = {0: model.state_dict(), 5: {k: 2 * v for k, v in model.state_dict().items()}}
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> run = an.load_trajectory(model, states, torch.nn.CrossEntropyLoss(), x, y)
    >>> run.steps
    [0, 5]
"""

from __future__ import annotations

import copy
import glob
import importlib
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.analysis.trajectory import Checkpoint, Trajectory, training_state
from fisherlab.conventions import FisherlabError

STATE_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which a checkpoint file may hold the model's state dict."""


def load_factory(path: str) -> Callable[[], nn.Module]:
    """The factory named ``package.module:factory`` (called without arguments)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise FisherlabError(f"a model factory is 'package.module:factory', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any import error is theirs to see, one line
        raise FisherlabError(
            f"model factory {path!r}: module {module_name!r} does not import "
            f"({type(err).__name__}: {err})"
        ) from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise FisherlabError(f"model factory {path!r}: {module_name} has no callable {attribute!r}")
    return factory


def build_model(model: nn.Module | Callable[[], nn.Module] | str) -> nn.Module:
    """An ``nn.Module`` from an instance, a factory, or a factory path.

    A path is ``package.module:factory`` (:func:`load_factory`) or ``path/to/file.py:factory``
    (:func:`fisherlab.models.load_factory`); the factory is called without arguments.
    """
    name = model if isinstance(model, str) else getattr(model, "__name__", type(model).__name__)
    if isinstance(model, str) and model.partition(":")[0].endswith(".py"):
        from fisherlab import models

        try:
            model = models.load_factory(model)
        except ValueError as err:
            raise FisherlabError(str(err)) from None
    elif isinstance(model, str):
        model = load_factory(model)
    if not isinstance(model, nn.Module):
        model = model()
    if not isinstance(model, nn.Module):
        raise FisherlabError(
            f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _state_of(obj: Any, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict in a loaded checkpoint, and its other entries (step, epoch, …)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), {}
    if not isinstance(obj, Mapping):
        raise FisherlabError(f"checkpoint {source}: holds a {type(obj).__name__}, not a state dict")
    for key in STATE_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), {k: v for k, v in obj.items() if k != key}
    return dict(obj), {}


def check_fits(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Refuse a state dict whose names or shapes differ from the model's (the first named)."""
    own = model.state_dict()
    for name, value in own.items():
        if name not in state:
            raise FisherlabError(f"checkpoint {source} does not fit the model: {name!r} is missing")
        if not isinstance(state[name], Tensor) or state[name].shape != value.shape:
            shape = tuple(getattr(state[name], "shape", ()))
            raise FisherlabError(
                f"checkpoint {source} does not fit the model: {name!r} has shape {shape}, the "
                f"model's is {tuple(value.shape)}"
            )
    for name in state:
        if name not in own:
            raise FisherlabError(
                f"checkpoint {source} does not fit the model: unexpected entry {name!r}"
            )


def _step_from_name(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise FisherlabError(
            f"checkpoint {path}: no step in the file name and none saved in the file "
            "(save {'state_dict': …, 'step': …} or name it like ckpt-400.pt)"
        )
    return int(numbers[-1])


def read_checkpoints(
    sources: Sequence[str | Path] | Mapping[int, Mapping[str, Tensor]] | str,
) -> list[tuple[int, float | None, dict[str, Tensor], str]]:
    """``(step, epoch or None, state, source)`` per checkpoint, in the order given.

    ``sources``: ``{step: state_dict}``, a list of files, or a glob pattern (sorted by step).
    """
    if isinstance(sources, Mapping):
        return [(int(s), None, dict(v), f"at step {s}") for s, v in sources.items()]
    if isinstance(sources, str | Path):
        pattern = str(sources)
        paths = [Path(p) for p in glob.glob(pattern)]
        if not paths:
            raise FisherlabError(f"no checkpoint file matches {pattern!r}")
        found = [_read(p) for p in paths]
        return sorted(found, key=lambda c: c[0])
    return [_read(Path(p)) for p in sources]


def _read(path: Path) -> tuple[int, float | None, dict[str, Tensor], str]:
    if not path.is_file():
        raise FisherlabError(f"checkpoint file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file torch cannot read: one line naming it
        raise FisherlabError(
            f"checkpoint {path}: torch.load failed ({type(err).__name__})"
        ) from None
    state, extra = _state_of(obj, str(path))
    step = int(extra["step"]) if "step" in extra else _step_from_name(path)
    epoch = float(extra["epoch"]) if "epoch" in extra else None
    return step, epoch, state, str(path)


def load_trajectory(
    model: nn.Module | Callable[[], nn.Module] | str,
    checkpoints: Sequence[str | Path] | Mapping[int, Mapping[str, Tensor]] | str,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    steps_per_epoch: int | None = None,
) -> Trajectory:
    """A :class:`Trajectory` of a user's model at its checkpoints, judged on ``(x, y)``.

    Args:
        model: An ``nn.Module``, a factory, or ``"package.module:factory"``.
        checkpoints: ``{step: state_dict}``, checkpoint files, or a glob pattern.
        loss_fn: The loss (the training state of each checkpoint: loss, accuracy on ``(x, y)``).
        x: Inputs of the reference set (e.g. the training set).
        y: Targets.
        steps_per_epoch: Turns steps into epochs where a checkpoint holds no epoch (default:
            epoch = step).

    Raises:
        FisherlabError: a factory that does not import or build a module; a checkpoint that
            does not fit the model; steps that repeat or are not increasing.
    """
    template = build_model(model)
    found = read_checkpoints(checkpoints)
    steps = [c[0] for c in found]
    for a, b in itertools.pairwise(steps):
        if b == a:
            raise FisherlabError(f"checkpoint step {a} appears twice; each step once, please")
        if b < a:
            raise FisherlabError(f"checkpoint steps are not increasing: {a} before {b}")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    template = template.to(dtype)
    kept = []
    for step, epoch, state, source in found:
        check_fits(template, state, source)
        model_at = copy.deepcopy(template)
        model_at.load_state_dict(state)
        state = {k: v.detach().clone() for k, v in model_at.state_dict().items()}
        if epoch is None:
            epoch = step / steps_per_epoch if steps_per_epoch else float(step)
        kept.append(Checkpoint(step, epoch, state, **training_state(model_at, loss_fn, x, y)))
    final = copy.deepcopy(template)
    final.load_state_dict(kept[-1].state)
    settings = {"optimizer": "user", "source": "checkpoints", "lr": None, "batch_size": None}
    if steps_per_epoch:
        settings["steps_per_epoch"] = steps_per_epoch
    return Trajectory(final, kept, [], [], settings, template)


__all__ = [
    "STATE_KEYS",
    "build_model",
    "check_fits",
    "load_factory",
    "load_trajectory",
    "read_checkpoints",
]
