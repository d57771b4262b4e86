"""Reference models and the one registry of models that fisherlab's commands know by name.

:data:`MODELS` maps a name to a :class:`ModelEntry`: the builder with its own keyword arguments
(defaults sized for the embedded digits, 8×8 images and 10 classes) and how to size it for any
data set. :func:`create` builds a registered model, or a user's ``"path/to/file.py:factory"``,
for given input shape and class count; the experiment runner, the CLI and the analyses all call
it, so adding a model touches this file only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fisherlab.conventions import FisherlabError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (128, 64),
    out_features: int = 10,
    activation: str = "tanh",
    bias: bool = True,
) -> nn.Sequential:
    """A fully connected net ``in → hidden… → out`` with an activation after each hidden layer.

    The input is flattened first, so images ``[N, 1, 8, 8]`` and vectors ``[N, 64]`` both work.

    Example:
        >>> mlp(64, (128, 64), 10)[1]
        Linear(in_features=64, out_features=128, bias=True)
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h, bias=bias), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, out_features, bias=bias))
    return nn.Sequential(*layers)


def small_cnn(
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    channels: Sequence[int] = (8, 16),
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """A small CNN: 3×3 convolutions (padding 1, the second with stride 2), then a linear head.

    Example:
        >>> small_cnn()(__import__("torch").zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    c1, c2 = channels
    size = (image_size + 2 - 3) // 2 + 1  # after the stride-2 convolution
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1, bias=bias),
        _activation(activation),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=bias),
        _activation(activation),
        nn.Flatten(),
        nn.Linear(c2 * size * size, num_classes, bias=bias),
    )


def three_conv_one_fc(
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    channels: Sequence[int] = (16, 32, 64),
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """Three 3×3 convolutions, each followed by 2×2 max-pooling, then one linear layer ("3c1f").

    A network in the spirit of the TENGraD paper's 3C1F benchmark (three convolutional layers and
    one fully connected layer), sized by ``image_size``: 8×8 digits pool to 1×1, 28×28
    (Fashion-)MNIST to 3×3, 32×32 CIFAR-10 to 4×4.

    Example:
        >>> three_conv_one_fc(3, 32)(__import__("torch").zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    width, size = in_channels, image_size
    for c in channels:
        layers += [
            nn.Conv2d(width, c, 3, padding=1, bias=bias),
            _activation(activation),
            nn.MaxPool2d(2),
        ]
        width, size = c, size // 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} poolings")
    layers += [nn.Flatten(), nn.Linear(width * size * size, num_classes, bias=bias)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """A residual block (He et al. 2016), two 3×3 convolutions with BatchNorm.

    ``relu(bn₂(conv₂(relu(bn₁(conv₁ x)))) + shortcut(x))``, the shortcut a 1×1 convolution with
    BatchNorm when the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet(
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    widths: Sequence[int] = (8, 16),
) -> nn.Sequential:
    """A ResNet-style net: 3×3 stem with BatchNorm, residual blocks, pooling, linear head.

    One residual block per width (the first at stride 1, the others at stride 2), then global
    average pooling.

    Curvature is taken in eval mode (BatchNorm with its running statistics): the CLI and
    :func:`fisherlab.problem.Problem` refuse BatchNorm in training mode.

    Example:
        >>> resnet(3, 32)(__import__("torch").zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    del image_size  # global pooling: any size
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    width = widths[0]
    for i, c in enumerate(widths):
        layers.append(BasicBlock(width, c, stride=1 if i == 0 else 2))
        width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class TransformerClassifier(nn.Module):
    """A one-block transformer encoder over an image's rows (each row one token).

    ``[N, C, H, W]`` → tokens ``[N, H, C·W]`` → Linear token embedding plus an ``nn.Embedding``
    of the row position → ``x + MultiheadAttention(x)``, ``LayerNorm`` → ``x + ff(x)`` (two
    Linear layers, ReLU), ``LayerNorm`` → mean over tokens → Linear head. Dropout-free, so its
    curvature is defined in training mode too.

    Example:
        >>> TransformerClassifier(8, 8, 10)(__import__("torch").zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        token_features: int = 8,
        tokens: int = 8,
        num_classes: int = 10,
        width: int = 16,
        heads: int = 2,
    ):
        super().__init__()
        self.embed = nn.Linear(token_features, width)
        self.position = nn.Embedding(tokens, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, 2 * width)
        self.ff2 = nn.Linear(2 * width, width)
        self.norm2 = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        import torch

        tokens = x.transpose(1, 2).flatten(start_dim=2)  # [N, H, C·W]
        positions = torch.arange(tokens.shape[1], device=x.device).expand(tokens.shape[:2])
        h = self.embed(tokens) + self.position(positions)
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.ff2(torch.relu(self.ff1(h))))
        return self.head(h.mean(dim=1))


def _square_images(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise FisherlabError(f"model {name!r} needs square images [C, H, H], got {shape}")
    return shape[0], shape[1]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        build: The builder, called with its own keyword arguments (:func:`build`).
        for_data: ``(input_shape, num_classes) -> nn.Module``: the model sized for a data set.
        description: One line for help texts.
    """

    build: Callable[..., nn.Module]
    for_data: Callable[[tuple[int, ...], int], nn.Module]
    description: str


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(
        mlp,
        lambda shape, classes: mlp(math.prod(shape), (128, 64), classes),
        "fully connected, hidden widths 128 and 64, tanh",
    ),
    "cnn": ModelEntry(
        small_cnn,
        lambda shape, classes: small_cnn(*_square_images("cnn", shape), classes),
        "two 3×3 convolutions (8 and 16 channels, the second with stride 2), linear head",
    ),
    "3c1f": ModelEntry(
        three_conv_one_fc,
        lambda shape, classes: three_conv_one_fc(*_square_images("3c1f", shape), classes),
        "three 3×3 convolutions with 2×2 max-pooling, one linear layer (TENGraD's 3C1F)",
    ),
    "transformer": ModelEntry(
        TransformerClassifier,
        lambda shape, classes: TransformerClassifier(shape[0] * shape[2], shape[1], classes),
        "one transformer encoder block over image rows as tokens: Linear token embedding, "
        "position Embedding, MultiheadAttention, LayerNorm, feed-forward Linear layers",
    ),
    "resnet": ModelEntry(
        resnet,
        lambda shape, classes: resnet(shape[0], num_classes=classes),
        "ResNet-style: 3×3 stem, residual blocks of 8 and 16 channels with BatchNorm (eval "
        "mode), global pooling, linear head",
    ),
}
"""Every model known by name: the CLI's ``--model`` choices and the experiment runner's."""


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name with the builder's own keyword arguments.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name].build(**kwargs)


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` meanwhile (a model file's folder, as for a script).

    Modules imported from ``folder`` meanwhile are dropped from ``sys.modules`` afterwards, so
    that the next model file (another folder, or the same one edited) imports its own.
    """
    entry = str(folder)
    before = set(sys.modules)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and Path(file).resolve().is_relative_to(folder):
                del sys.modules[name]


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The model factory named by ``"path/to/file.py:factory"`` (a function or class in that file).

    The file is imported as a fresh module (its top-level code runs, so only load your own
    files), with its folder first on ``sys.path`` so that it can import its sibling modules.
    The factory is called by :func:`create` with the keyword arguments ``input_shape`` and
    ``num_classes`` that its signature accepts.

    Raises:
        ValueError: If the spec is malformed, the file is missing, does not import (a syntax
            error, an exception at import), or the name is not callable.
    """
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(f"model spec {spec!r} must look like 'path/to/file.py:factory'")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"model file {str(file)!r} (from {spec!r}) does not exist")
    module_name = f"fisherlab_user_model_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {str(file)!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    with _on_path(file.resolve().parent):  # its sibling modules import as in a script
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as err:
            raise ValueError(
                f"model file {str(file)!r} has a syntax error at line {err.lineno}: {err.msg}"
            ) from err
        except Exception as err:  # the user's code: one clear line instead of its traceback
            raise ValueError(
                f"importing the model file {str(file)!r} raised {type(err).__name__}: {err}"
            ) from err
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{str(file)!r} has no callable {name!r}")
    return factory


def create(spec: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A model for inputs of ``input_shape`` (e.g. ``[C, H, W]``) and ``num_classes`` outputs.

    Args:
        spec: A name of :data:`MODELS` or ``"path/to/file.py:factory"``, called with the keyword
            arguments ``input_shape`` and ``num_classes`` its signature accepts.
        input_shape: Shape of one input, e.g. ``(1, 8, 8)``.
        num_classes: Number of outputs.

    Raises:
        FisherlabError: For an unknown name, a bad file spec, a factory that raises or returns
            no ``nn.Module``, or a shape the model cannot take.

    Example:
        >>> create("3c1f", (1, 28, 28), 10)[-1]
        Linear(in_features=576, out_features=10, bias=True)
    """
    shape = tuple(int(s) for s in input_shape)
    if spec in MODELS:
        return MODELS[spec].for_data(shape, num_classes)
    if ":" not in spec:
        raise FisherlabError(
            f"unknown model {spec!r}; choose from {list(MODELS)} or give 'path/to/file.py:factory'"
        )
    try:
        factory = load_factory(spec)
    except ValueError as err:
        raise FisherlabError(str(err)) from err
    offered = {"input_shape": shape, "num_classes": num_classes}
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    except (TypeError, ValueError):  # no signature (some builtins): call without arguments
        kwargs = {}
    try:
        with _on_path(Path(spec.rpartition(":")[0]).resolve().parent):  # lazy sibling imports
            model = factory(**kwargs)
    except Exception as err:  # the user's code: one clear line instead of its traceback
        raise FisherlabError(
            f"the model factory {spec} raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise FisherlabError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model
