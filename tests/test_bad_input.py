"""Bad input gets a clear error (or a warning where asked), and the model is never left changed."""

import numpy as np
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


class Scale(nn.Module):
    """A user's own module with a parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    "extra, kind",
    [(Scale(), "Scale"), (nn.RMSNorm(5), "RMSNorm")],
    ids=["own-module", "rmsnorm"],
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


# ------------------------------------------------------------------- problems over data sets
class TiedNet(nn.Module):
    """An Embedding (unsupported: max_norm, skipped) tied to the output Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 4, max_norm=10.0)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(self.emb(x).mean(dim=1))))


def test_a_weight_tied_to_a_skipped_module_is_refused():
    model = TiedNet().double()
    x, y = torch.randint(0, 3, (5, 2)), torch.randint(0, 3, (5,))
    before = model_snapshot(model)
    with pytest.raises(fl.UnsupportedLayerError, match=r"'out'.*skipped module 'emb'"):
        fl.Problem(model, nn.CrossEntropyLoss(), (x, y), skip_unsupported=True)
    assert_unchanged(model, before)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(nn.functional.dropout(x, 0.5, training=self.training))


def test_random_ops_in_training_mode_are_refused():
    x, y = _batch()
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    with pytest.raises(fl.FisherlabError, match=r"'1' \(Dropout\).*one random mask.*eval"):
        fl.Problem(model, nn.CrossEntropyLoss(), (x, y))
    fl.Problem(model.eval(), nn.CrossEntropyLoss(), (x, y))  # eval mode is fine
    functional = FunctionalDropout().double()
    before = model_snapshot(functional)
    state = torch.get_rng_state()
    with pytest.raises(fl.FisherlabError, match=r"two forward passes.*random op"):
        fl.curvature("kfac", functional, nn.CrossEntropyLoss(), x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert_unchanged(functional, before)


@pytest.mark.parametrize(
    "damping, ok",
    [(True, False), ("1e-3", False), (torch.ones(2), False), (np.float32(1e-3), True),
     (np.int64(1), True), (torch.tensor(1e-3), True), (0, False), (float("nan"), False)],
    ids=["bool", "str", "tensor2", "np.float32", "np.int64", "tensor0d", "zero", "nan"],
)  # fmt: skip
def test_damping_must_be_a_positive_number(damping, ok):
    block = fl.curvature("kfac", _mlp(), nn.CrossEntropyLoss(), *_batch())["0"]
    v = torch.ones(block.size, dtype=torch.float64)
    if ok:
        assert torch.isfinite(block.solve(v, damping)).all()
    else:
        with pytest.raises(fl.FisherlabError, match="damping must be a positive"):
            block.solve(v, damping)


@pytest.mark.parametrize(
    "max_bytes, ok",
    [(True, False), ("2GB", False), (-1, False), (np.int64(2**30), True), (2e9, True)],
    ids=["bool", "str", "negative", "np.int64", "float"],
)
def test_max_bytes_must_be_a_positive_number(max_bytes, ok):
    x, y = _batch()
    if ok:
        fl.curvature("exact", _mlp(), nn.CrossEntropyLoss(), x, y, max_bytes=max_bytes)
    else:
        with pytest.raises(fl.FisherlabError, match="max_bytes must be a positive number"):
            fl.curvature("exact", _mlp(), nn.CrossEntropyLoss(), x, y, max_bytes=max_bytes)


@pytest.mark.parametrize(
    "mc_samples, ok",
    [(np.int64(2), True), (2.0, False), (True, False)],
    ids=["np", "float", "bool"],
)
def test_mc_samples_accepts_integers_of_any_kind(mc_samples, ok):
    x, y = _batch()
    if ok:
        problem = fl.Problem(_mlp(), nn.CrossEntropyLoss(), (x, y), "mc", mc_samples)
        assert problem.mc_samples == 2 and type(problem.mc_samples) is int
        assert fl.capture(problem)["0"].G.shape[0] == 2
    else:
        with pytest.raises(fl.FisherlabError, match="mc_samples must be a positive integer"):
            fl.Problem(_mlp(), nn.CrossEntropyLoss(), (x, y), "mc", mc_samples)


def test_bad_data_is_named():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch()
    with pytest.raises(fl.FisherlabError, match=r"data must be an .inputs, targets. pair"):
        fl.Problem(model, loss_fn, x)
    with pytest.raises(fl.FisherlabError, match="the data yielded no batch"):
        fl.curvature("kfac", fl.Problem(model, loss_fn, []))
    with pytest.raises(fl.FisherlabError, match="batch 1 of the data is not an"):
        fl.curvature("kfac", fl.Problem(model, loss_fn, [(x, y), x]))
    mixed = [(x, y), (torch.randn(3, 5, dtype=torch.float64), y[:3])]
    with pytest.raises(fl.FisherlabError, match=r"batch 1 has inputs of shape \[N, 5\].*\[N, 4\]"):
        fl.curvature("kfac", fl.Problem(model, loss_fn, mixed))
    bad = [(x, y), (x.clone().fill_(float("nan")), y)]
    with pytest.raises(fl.FisherlabError, match="batch 1: inputs contain 24 non-finite"):
        fl.exact_blocks(fl.Problem(model, loss_fn, bad))
    with pytest.raises(fl.FisherlabError, match="pass either a Problem, or model"):
        fl.curvature("kfac", fl.Problem(model, loss_fn, (x, y)), loss_fn)


def test_a_generator_serves_one_pass_only():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch(12)
    problem = fl.Problem(model, loss_fn, ((x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)))
    assert problem.num_samples is None
    fl.curvature("kfac", problem)  # one pass
    assert problem.num_samples == 12
    generator = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4))
    with pytest.raises(fl.FisherlabError, match=r"iterator .* consumed.*list of batches"):
        fl.exact_blocks(problem)  # a second pass over the consumed generator
    problem = fl.Problem(model, loss_fn, generator)
    ekfac = fl.curvature("ekfac", problem)  # two passes: the first is kept in memory
    assert ekfac["0"].size == 25


def test_a_reshuffled_loader_is_refused_for_monte_carlo_passes():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch(16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True
    )
    problem = fl.Problem(model, loss_fn, loader, fisher_type="mc")
    fl.exact_blocks(problem)
    with pytest.raises(fl.FisherlabError, match=r"data changed between passes.*shuffle=False"):
        fl.exact_blocks(problem)


def test_dense_budgets_cover_the_peak():
    x, y = _batch()
    curv = fl.curvature("woodbury", _mlp(), nn.CrossEntropyLoss(), x, y)
    block = curv["0"]  # P = 25, 6 rows < P: its eigenvalues come from the Gram
    size = block.size**2 * 8
    with pytest.raises(fl.MemoryBudgetError, match="three such matrices at the peak"):
        block.to_dense(max_bytes=2 * size)
    assert block.to_dense(max_bytes=3 * size).shape == (25, 25)
    big = fl.curvature("woodbury", _mlp(), nn.CrossEntropyLoss(), *_batch(40))["0"]
    with pytest.raises(fl.MemoryBudgetError, match=r"eigenvalues of the woodbury block.*25×25"):
        big.eigvalsh(max_bytes=size)
    with pytest.raises(fl.MemoryBudgetError, match=r"eigenvalues of the woodbury block"):
        fl.metrics.spectrum(big, max_bytes=size)
    assert len(big.eigvalsh(max_bytes=2 * size)) == 25
    dense = big.to_dense()
    with pytest.raises(fl.MemoryBudgetError, match="spectrum of a"):
        fl.metrics.spectrum(dense, max_bytes=size - 1)
