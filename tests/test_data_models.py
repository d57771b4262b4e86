"""Embedded digits data and the reference models."""

import pytest
import torch

import fisherlab as fl


def test_digits_split_is_standardised_seeded_and_stratified():
    split = fl.data.load_digits(seed=0)
    assert split.input_shape == (1, 8, 8) and split.num_classes == 10
    assert split.x_train.shape[0] + split.x_test.shape[0] == 1797
    assert split.x_test.shape[0] == 360 and split.x_train.dtype == torch.float32
    flat = split.x_train.reshape(len(split.x_train), -1).double()
    varying = flat.std(0) > 0
    assert torch.allclose(flat.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        flat[:, varying].std(0, unbiased=False),
        torch.ones(int(varying.sum()), dtype=torch.float64),
        atol=1e-5,
    )
    assert torch.equal(fl.data.load_digits(seed=0).y_test, split.y_test)
    assert not torch.equal(fl.data.load_digits(seed=1).y_test, split.y_test)
    assert torch.bincount(split.y_test).min() >= 35  # stratified: ~36 per class


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        fl.data.load("imagenet")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        fl.models.build("vgg")
    with pytest.raises(ValueError, match="unknown activation"):
        fl.models.mlp(activation="gelu")


RESNET_LAYERS = ["0", "1"] + [
    f"{block}.{part}" for block in (3, 4) for part in ("conv1", "bn1", "conv2", "bn2")
]
RESNET_LAYERS += ["4.shortcut.0", "4.shortcut.1", "7"]


@pytest.mark.parametrize(
    "name, layers",
    [("mlp", ["1", "3", "5"]), ("cnn", ["0", "2", "5"]), ("resnet", RESNET_LAYERS)],
)
def test_reference_models_run_on_digits_and_are_fully_supported(name, layers):
    split = fl.data.load_digits(dtype=torch.float64)
    model = fl.models.build(name).double().eval()  # curvature of BatchNorm: eval mode
    assert model(split.x_train[:4]).shape == (4, 10)
    cap = fl.capture(model, torch.nn.CrossEntropyLoss(), split.x_train[:4], split.y_train[:4])
    assert list(cap) == layers
