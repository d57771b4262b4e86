"""``nn.Embedding``: compact captures (token indices), rows scattered by index, the matrix view
``Wᵀ`` with its own parameter order, KFAC's diagonal input factor (token counts), and the
configurations refused or treated (``padding_idx``, ``max_norm``, ``scale_grad_by_freq``,
``sparse``). Float64 against per-sample ``torch.func`` gradients."""

import pytest
import torch
from helpers import EXACT, per_sample_grads, rel_err
from torch import nn

import fisherlab as fl
from fisherlab.layers import Layer, adapter_for
from fisherlab.verification import verify_problem

VOCAB, DIM, S, N = 6, 3, 4, 5


class Tokens(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.head = nn.Linear(S * DIM, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).flatten(1))


def _batch(padding_idx=None, n=N, seed=0):
    torch.manual_seed(seed)
    model = Tokens(padding_idx).double()
    with torch.no_grad():  # PyTorch zeroes the padding row at init: make it count if misused
        model.embed.weight.normal_()
    x = torch.randint(0, VOCAB, (n, S))
    x[0, :2] = 2  # a repeated token within a sample
    x[1, 3] = 2
    y = torch.randint(0, 3, (n,))
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no-padding", "padding"])
def test_rows_scattered_by_index_are_the_per_sample_gradients(padding_idx):
    model, loss_fn, x, y = _batch(padding_idx)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
    lc = cap["embed"]
    assert lc.A.dtype == torch.long and lc.A.shape == (N, S)  # compact: the indices
    reference = per_sample_grads(model, loss_fn, x, y, "embed")
    assert rel_err(lc.jacobian_rows()[0], reference) <= EXACT
    if padding_idx is not None:  # the padding row gets no gradient, exactly
        rows = lc.jacobian_rows()[0].reshape(N, VOCAB, DIM)
        assert not rows[:, padding_idx].any()


@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no-padding", "padding"])
@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_exact_block_from_capture_equals_torch_func(padding_idx, fisher_type):
    model, loss_fn, x, y = _batch(padding_idx)
    problem = fl.Problem(model, loss_fn, (x, y), fisher_type=fisher_type, mc_samples=2)
    by_func = fl.exact_blocks(problem)
    assert by_func.backend == "torch.func" and "Embedding" in by_func.backend_reason
    for method in ("exact", "woodbury"):
        block = fl.curvature(method, problem)["embed"]
        assert rel_err(block.to_dense(), by_func["embed"]) <= EXACT, method
    if fisher_type == "empirical":
        g = per_sample_grads(model, loss_fn, x, y, "embed")
        assert rel_err(by_func["embed"], g.T @ g / N) <= EXACT


def test_parameter_order_is_that_of_the_weight():
    """Parameter order ``vec_r(W)``; the matrix view is ``Wᵀ``: the permutation between them."""
    module = nn.Embedding(VOCAB, DIM)
    layer = Layer("e", module, adapter_for(module))
    assert (layer.d_out, layer.d_in, layer.has_bias) == (DIM, VOCAB, False)
    kron = torch.arange(DIM * VOCAB).reshape(DIM, VOCAB)  # entry (e, v) of Wᵀ
    assert torch.equal(layer.to_param_order(kron), kron.T.flatten())


@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no-padding", "padding"])
def test_kfac_input_factor_is_the_diagonal_of_token_counts(padding_idx):
    model, loss_fn, x, y = _batch(padding_idx)
    problem = fl.Problem(model, loss_fn, (x, y), fisher_type="true")
    block = fl.curvature("kfac", problem)["embed"]
    counts = torch.bincount(x.flatten(), minlength=VOCAB).double()
    if padding_idx is not None:
        counts[padding_idx] = 0  # a padding position counts in N·T, adds nothing
    assert rel_err(block.omega, torch.diag(counts / (N * S))) <= EXACT
    cap = fl.capture(problem)
    G = cap["embed"].G
    rows = G.reshape(-1, DIM)
    assert rel_err(block.gamma, rows.T @ rows / cap.normaliser) <= EXACT


@pytest.mark.parametrize("method", ["kfac", "ekfac", "skfac", "diag"])
@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no-padding", "padding"])
def test_every_method_in_parameter_order(method, padding_idx):
    model, loss_fn, x, y = _batch(padding_idx)
    block = fl.curvature(method, model, loss_fn, x, y)["embed"]
    dense = block.to_dense()
    v = torch.randn(block.size, 3, dtype=torch.float64)
    assert rel_err(block.matvec(v), dense @ v) <= EXACT
    eye = torch.eye(block.size, dtype=torch.float64)
    assert rel_err(block.solve(v, 0.1), torch.linalg.solve(dense + 0.1 * eye, v)) <= 1e-8


def test_kfac_is_exact_for_one_sample_with_one_token():
    """One position per sample: the rank-one Kronecker product ``g gᵀ ⊗ e_i e_iᵀ``."""
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Flatten(), nn.Tanh(), nn.Linear(DIM, 3))
    model = model.double()
    x, y = torch.tensor([[4]]), torch.tensor([1])
    kfac = fl.curvature("kfac", model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    exact = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    assert rel_err(kfac["0"].to_dense(), exact["0"]) <= EXACT


@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_ekfac_is_never_worse_than_kfac_and_verify_passes(fisher_type):
    model, loss_fn, x, y = _batch(2, n=7)
    problem = fl.Problem(model, loss_fn, (x, y), fisher_type=fisher_type, mc_samples=2)
    checks = verify_problem(problem)
    assert {c.layer for c in checks if c.check == "ekfac<=kfac"} == {"embed", "head"}
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_data_set_equals_the_concatenated_batch():
    model, loss_fn, x, y = _batch(2, n=7)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    for method in ("exact", "kfac", "diag"):
        whole = fl.curvature(method, fl.Problem(model, loss_fn, (x, y)))["embed"].to_dense()
        parts = fl.curvature(method, fl.Problem(model, loss_fn, batches))["embed"].to_dense()
        assert rel_err(parts, whole) <= EXACT, method


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"max_norm": 1.0}, r"max_norm=1\.0 \(the forward pass renormalises"),
        ({"scale_grad_by_freq": True}, r"scale_grad_by_freq=True"),
        ({"sparse": True}, r"sparse=True"),
    ],
    ids=["max_norm", "scale_grad_by_freq", "sparse"],
)
def test_configurations_that_are_not_functions_of_the_weights_are_refused(options, reason):
    model = nn.Sequential(nn.Embedding(VOCAB, DIM, **options), nn.Flatten(), nn.Linear(S * DIM, 3))
    model = model.double()
    x, y = torch.randint(0, VOCAB, (N, S)), torch.randint(0, 3, (N,))
    with pytest.raises(fl.UnsupportedLayerError, match=r"'0' \(Embedding\).*" + reason):
        fl.Problem(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.warns(UserWarning, match=r"skipping unsupported layers: module '0' \(Embedding\)"):
        problem = fl.Problem(model, nn.CrossEntropyLoss(), (x, y), skip_unsupported=True)
    assert list(problem.layers) == ["2"]
