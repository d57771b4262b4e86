"""Small reference models for the embedded digits data (8×8 images, 10 classes)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

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


MODELS = {"mlp": mlp, "cnn": small_cnn}


def build(name: str, **kwargs) -> nn.Sequential:
    """Build a reference model by name (``"mlp"`` or ``"cnn"``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**kwargs)
