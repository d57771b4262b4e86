"""Bad input gets a clear error (or a warning where asked), and the model is never left changed."""

import pytest
import torch
from helpers import assert_unchanged, model_snapshot
from torch import nn

import fisherlab as fl

ENTRY_POINTS = {
    "capture": fl.capture,
    "exact_blocks": fl.exact_blocks,
    "exact_blocks-torch.func": lambda *a, **k: fl.exact_blocks(*a, backend="torch.func", **k),
    "exact_fisher": fl.exact_fisher,
}


@pytest.fixture(params=list(ENTRY_POINTS), ids=list(ENTRY_POINTS))
def entry(request):
    return ENTRY_POINTS[request.param]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(n=6):
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


class Counting(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize(
    "extra, kind",
    [(nn.BatchNorm1d(5), "BatchNorm1d"), (nn.LayerNorm(5), "LayerNorm")],
    ids=["batchnorm", "layernorm"],
)
def test_unsupported_layer_is_named_or_skipped_with_a_warning(entry, extra, kind):
    model = nn.Sequential(nn.Linear(4, 5), extra, nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = _batch()
    before = model_snapshot(model)
    with pytest.raises(fl.UnsupportedLayerError, match=rf"'1' \({kind}\).*skip_unsupported=True"):
        entry(model, nn.CrossEntropyLoss(), x, y)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match=rf"skipping unsupported layers: module '1' \({kind}\)"):
        result = entry(model, nn.CrossEntropyLoss(), x, y, skip_unsupported=True)
    names = set(result.slices) if isinstance(result, fl.ExactFisher) else set(result)
    assert names == {"0", "3"}
    assert_unchanged(model, before)


def test_lstm_is_named(entry):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 3, batch_first=True)
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.rnn(x.unsqueeze(1))[0][:, -1])

    x, y = _batch()
    with pytest.raises(fl.UnsupportedLayerError, match=r"'rnn' \(LSTM\)"):
        entry(Net().double(), nn.CrossEntropyLoss(), x, y)


def test_grouped_convolution_is_refused_with_the_reason(entry):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.raises(fl.UnsupportedLayerError, match=r"'0' \(Conv2d\).*groups=2"):
        entry(model, nn.CrossEntropyLoss(), x, y)


def test_batchnorm_in_training_mode_is_refused(entry):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = _batch()
    with pytest.raises(fl.FisherlabError, match=r"'1'.*training mode.*model.eval\(\)"):
        entry(model, nn.CrossEntropyLoss(), x, y, skip_unsupported=True)


def test_module_called_twice_is_refused(entry):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 5)
            self.shared = nn.Linear(5, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.shared(torch.tanh(self.shared(self.inp(x)))))

    model = Twice().double()
    x, y = _batch()
    before = model_snapshot(model)
    with pytest.raises(fl.FisherlabError, match=r"'shared'.*more than once"):
        entry(
            model,
            nn.CrossEntropyLoss(),
            x,
            y,
            **({"backend": "torch.func"} if entry is fl.exact_fisher else {}),
        )
    assert_unchanged(model, before)


def test_tied_parameters_are_refused(entry):
    model = _mlp()
    model.add_module("3", nn.Linear(3, 3))
    model[3].weight = (
        model[2].weight if model[2].weight.shape == (3, 3) else nn.Parameter(torch.ones(3, 3))
    )
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    tied[1].weight = tied[0].weight
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 4, (3,))
    with pytest.raises(fl.UnsupportedLayerError, match="shared by modules '0' and '1'"):
        entry(tied, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("where", ["inputs", "targets"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_batch_is_refused_before_any_forward(entry, where, value):
    model = Counting(_mlp())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    (x if where == "inputs" else y)[2, 1] = value
    with pytest.raises(fl.FisherlabError, match=rf"{where} contain 1 non-finite value"):
        entry(model, nn.MSELoss(), x, y)
    assert model.calls == 0


@pytest.mark.parametrize(
    "loss_fn, targets, message",
    [
        (nn.CrossEntropyLoss(), torch.zeros(6), "class indices: an int64 tensor of shape \\(N,\\)"),
        (nn.CrossEntropyLoss(), torch.zeros(6, 1, dtype=torch.long), "class indices"),
        (nn.CrossEntropyLoss(), torch.full((6,), 3), r"must lie in \[0, 3\)"),
        (nn.CrossEntropyLoss(), torch.zeros(5, dtype=torch.long), "do not match the batch of 6"),
        (
            nn.MSELoss(),
            torch.zeros(6, 2, dtype=torch.float64),
            r"\(6, 2\) do not match the network outputs of shape \(6, 3\)",
        ),
        (
            nn.MSELoss(),
            torch.zeros(6, 3, dtype=torch.long),
            "MSELoss targets must be floating point",
        ),
        (nn.MSELoss(), torch.zeros(6, 3, dtype=torch.float32), "targets have dtype torch.float32"),
    ],
    ids=["ce-float", "ce-2d", "ce-range", "ce-batch", "mse-shape", "mse-int", "mse-dtype"],
)
def test_wrong_targets_are_refused(entry, loss_fn, targets, message):
    model = _mlp()
    x, _ = _batch()
    before = model_snapshot(model)
    with pytest.raises(fl.FisherlabError, match=message):
        entry(model, loss_fn, x, targets)
    assert_unchanged(model, before)


def test_unknown_fisher_type_lists_the_valid_ones(entry):
    x, y = _batch()
    with pytest.raises(fl.FisherlabError, match="'true', 'mc', 'empirical'"):
        entry(_mlp(), nn.CrossEntropyLoss(), x, y, fisher_type="gauss-newton")
    with pytest.raises(fl.FisherlabError, match="mc_samples must be a positive integer"):
        entry(_mlp(), nn.CrossEntropyLoss(), x, y, fisher_type="mc", mc_samples=0)


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (nn.NLLLoss(), "NLLLoss is not supported; supported losses: CrossEntropyLoss, MSELoss"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing is not supported"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction 'none' is not supported"),
    ],
    ids=["nll", "smoothing", "none"],
)
def test_unsupported_losses_are_refused(entry, loss_fn, message):
    x, y = _batch()
    with pytest.raises(fl.FisherlabError, match=message):
        entry(_mlp(), loss_fn, x, y)


@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_model_is_unchanged_after_a_successful_call(entry, fisher_type):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    x, y = _batch()
    nn.CrossEntropyLoss()(model(x), y).backward()  # a .grad the calls must not touch
    model.train()
    before = model_snapshot(model)
    entry(model, nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type)
    assert_unchanged(model, before)


def test_not_a_model_is_refused():
    x, y = _batch()
    with pytest.raises(fl.FisherlabError, match=r"must be a torch\.nn\.Module"):
        fl.capture(lambda t: t, nn.CrossEntropyLoss(), x, y)


def test_model_without_supported_layers_is_refused(entry):
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(fl.FisherlabError, match="no supported layer"):
        entry(nn.Sequential(nn.Tanh()), nn.CrossEntropyLoss(), x, y)
