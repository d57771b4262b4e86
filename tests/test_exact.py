"""exact_blocks / exact_fisher against brute force, across backends, reductions and Fisher types."""

import math

import pytest
import torch
from helpers import EXACT, brute_force_ggn, per_sample_grads, rel_err
from torch import nn

import fisherlab as fl
from fisherlab.linalg import symmetric_gram
from fisherlab.losses import LossSpec, keyed_draws

BACKENDS = ["backpack", "torch.func"]


def _blocks(case, backend, batch_size, **kw):
    if backend == "backpack" and not case.backpack:
        pytest.skip("BackPACK cannot take this model")
    model, loss_fn, x, y = case.build(batch_size)
    return model, loss_fn, x, y, fl.exact_blocks(model, loss_fn, x, y, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_true_fisher_equals_brute_force_ggn(case, batch_size, backend):
    model, loss_fn, x, y, blocks = _blocks(case, backend, batch_size, fisher_type="true")
    assert blocks.backend == backend and blocks.fisher_type == "true"
    for name, block in blocks.items():
        assert rel_err(block, brute_force_ggn(model, loss_fn, x, y, [name])) <= EXACT, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empirical_fisher_equals_mean_outer_product(case, batch_size, backend):
    model, loss_fn, x, y, blocks = _blocks(case, backend, batch_size, fisher_type="empirical")
    nu = blocks.normaliser
    for name, block in blocks.items():
        g = per_sample_grads(model, loss_fn, x, y, name)
        assert rel_err(block, g.T @ g / nu) <= EXACT, name


def test_backends_and_capture_agree_on_mc_with_the_same_seed(case):
    if not case.backpack:
        pytest.skip("BackPACK cannot take this model")
    model, loss_fn, x, y = case.build(5)
    results = []
    for backend in BACKENDS:
        torch.manual_seed(7)
        results.append(
            fl.exact_blocks(model, loss_fn, x, y, fisher_type="mc", mc_samples=3, backend=backend)
        )
    torch.manual_seed(7)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="mc", mc_samples=3)
    for name in cap:
        rows = cap[name].jacobian_rows().flatten(end_dim=1)
        assert rel_err(results[1][name], rows.T @ rows / cap.normaliser) <= EXACT
        assert rel_err(results[0][name], results[1][name]) <= EXACT


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss()], ids=["ce", "mse"])
def test_mc_fisher_approaches_true_fisher(loss_fn):
    """‖F_mc − F‖² has mean tr Var(X)/k for k i.i.d. one-draw estimates X; by Chebyshev,
    ‖F_mc − F‖ ≤ 5·sqrt(tr Var/k) fails with probability ≤ 1/25, and the fixed seed makes it
    deterministic. A wrong scaling (e.g. a missing 1/√k) would miss by a factor ≥ √k."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (8,))
        if isinstance(loss_fn, nn.CrossEntropyLoss)
        else torch.randn(8, 3, dtype=torch.float64)
    )
    k = 4000
    true = fl.exact_blocks(model, loss_fn, x, y, fisher_type="true")
    torch.manual_seed(1)
    mc = fl.exact_blocks(model, loss_fn, x, y, fisher_type="mc", mc_samples=k)
    torch.manual_seed(1)
    cap = fl.capture(
        model,
        loss_fn,
        x,
        y,
        fisher_type="mc",
        mc_samples=k,
    )
    for name in true:
        rows = cap[name].jacobian_rows() * math.sqrt(k)  # [k, N, P], one draw each
        draws = torch.einsum("knp,knq->kpq", rows, rows) / cap.normaliser  # X_s
        variance = ((draws - draws.mean(0)) ** 2).sum() / (k - 1)
        assert rel_err(mc[name], draws.mean(0)) <= EXACT
        error = torch.linalg.matrix_norm(mc[name] - true[name]).item()
        bound = 5 * math.sqrt(variance.item() / k)
        assert error <= bound, (name, error, bound)
        assert error > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_fisher_blocks_and_cross_terms(case, backend, fisher_type):
    if backend == "backpack" and not case.backpack:
        pytest.skip("BackPACK cannot take this model")
    model, loss_fn, x, y = case.build(3)
    torch.manual_seed(3)
    full = fl.exact_fisher(model, loss_fn, x, y, fisher_type=fisher_type, backend=backend)
    torch.manual_seed(3)
    blocks = fl.exact_blocks(model, loss_fn, x, y, fisher_type=fisher_type, backend=backend)
    assert full.backend == backend and full.fisher_type == fisher_type
    for name, block in blocks.items():
        assert rel_err(full.block(name), block) <= EXACT
    assert full.matrix.shape[0] == sum(p.numel() for p in model.parameters())
    if fisher_type == "true":
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        # brute force in model.parameters() order (modules are registered in forward order here)
        assert rel_err(full.matrix, brute_force_ggn(model, loss_fn, x, y, names)) <= EXACT


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_and_mean_reductions_scale_by_the_normaliser(case, fisher_type, backend):
    """F_sum = ν F_mean, with ν = N (cross-entropy) or N·C (MSE)."""
    if backend == "backpack" and not case.backpack:
        pytest.skip("BackPACK cannot take this model")
    model, loss_fn, x, y = case.build(4)
    results = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(11)
        results[reduction] = fl.exact_blocks(
            model,
            type(loss_fn)(reduction=reduction),
            x,
            y,
            fisher_type=fisher_type,
            backend=backend,
        )
    nu = 4 if isinstance(loss_fn, nn.CrossEntropyLoss) else 4 * case.out
    assert results["mean"].normaliser == nu and results["sum"].normaliser == 1
    for name in results["mean"]:
        assert rel_err(nu * results["mean"][name], results["sum"][name]) <= EXACT


def test_auto_backend_says_which_path_was_used():
    from cases import SequenceNet

    x, y = torch.randn(4, 12, dtype=torch.float64), torch.randint(0, 3, (4,))
    seq = fl.exact_blocks(SequenceNet().double(), nn.CrossEntropyLoss(), x, y)
    assert seq.backend == "torch.func" and "BackPACK cannot take the model" in seq.backend_reason
    mlp = nn.Sequential(nn.Linear(12, 3)).double()
    assert fl.exact_blocks(mlp, nn.CrossEntropyLoss(), x, y).backend == "backpack"
    with pytest.raises(fl.FisherlabError, match=r"backend='torch\.func'"):
        fl.exact_blocks(SequenceNet().double(), nn.CrossEntropyLoss(), x, y, backend="backpack")
    with pytest.raises(fl.FisherlabError, match=r"unknown backend 'jax'"):
        fl.exact_blocks(mlp, nn.CrossEntropyLoss(), x, y, backend="jax")


def test_string_padding_is_routed_away_from_backpack():
    """BackPACK 1.7 returns wrong blocks for Conv2d(padding='same'); auto must not use it."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    blocks = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y)
    assert blocks.backend == "torch.func" and "padding='same'" in blocks.backend_reason
    assert rel_err(blocks["0"], brute_force_ggn(model, nn.CrossEntropyLoss(), x, y, ["0"])) <= EXACT


def test_memory_budget_is_enforced_with_the_size_in_the_message():
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 3))
    x, y = torch.randn(4, 30), torch.randint(0, 3, (4,))
    with pytest.raises(fl.MemoryBudgetError, match=r"683×683.*1\.78 MiB.*max_bytes="):
        fl.exact_fisher(model, nn.CrossEntropyLoss(), x, y, max_bytes=2**20)
    with pytest.raises(fl.MemoryBudgetError, match=r"'0' \(620×620\).*max_bytes="):
        fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y, max_bytes=2**20)
    assert fl.exact_fisher(model, nn.CrossEntropyLoss(), x, y, max_bytes=2**21).matrix.shape == (
        683,
        683,
    )


@pytest.mark.parametrize("p", [5, 64, 130])
def test_symmetric_gram_equals_the_full_product(p):
    rows = torch.randn(7, p, dtype=torch.float64)
    assert rel_err(symmetric_gram(rows, tile=32), rows.T @ rows) <= 1e-14


def test_exact_fisher_follows_parameter_order_of_the_model():
    """A module registered after its use in forward: columns follow model.parameters()."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.body = nn.Linear(2, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 3, (5,))
    full = fl.exact_fisher(model, nn.CrossEntropyLoss(), x, y)
    assert full.slices == {"head": slice(0, 15), "body": slice(15, 27)}
    assert (
        rel_err(full.matrix, brute_force_ggn(model, nn.CrossEntropyLoss(), x, y, ["head", "body"]))
        <= EXACT
    )


# ------------------------------------------ MSE on sequence outputs [N, T, C]: not for BackPACK
def _sequence_mse():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(4, 4, 5, dtype=torch.float64)  # [N, T, d]: outputs [4, 4, 3]
    return model, nn.MSELoss(), x, torch.randn(4, 4, 3, dtype=torch.float64)


def _brute_force_blocks(model, loss_fn, x, y, fisher_type):
    """(1/ν) Σ_n J_nᵀ s_n s_nᵀ J_n per layer, J_n the per-sample Jacobian [T·C, P] (torch.func
    jacrev), s_n: √2·I (true), 2(f_n − y_n) (empirical), the keyed Monte-Carlo rows (mc)."""
    from torch.func import functional_call, jacrev, vmap

    out = model(x).detach()
    nu = out.numel()
    s = {
        "true": math.sqrt(2)
        * torch.eye(out[0].numel(), dtype=torch.float64).expand(len(x), -1, -1),
        "empirical": 2 * (out - y).flatten(start_dim=1).unsqueeze(1),
    }
    if fisher_type == "mc":
        with keyed_draws(0, torch.arange(len(x))):  # the problem's seed and global indices
            rows = LossSpec.from_module(loss_fn).output_rows(out, y, "mc", 2)  # [R, N, T, C]
        s["mc"] = rows.flatten(start_dim=2).transpose(0, 1)
    blocks = {}
    for name in ("0", "2"):
        params = {k: v.detach() for k, v in model.get_submodule(name).named_parameters()}

        def f(p, xn, name=name):
            prefixed = {f"{name}.{k}": v for k, v in p.items()}
            return functional_call(model, prefixed, (xn.unsqueeze(0),)).flatten()

        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {k: [N, T·C, *shape]}
        J = torch.cat([jac[k].flatten(start_dim=2) for k in params], dim=2)  # [N, T·C, P]
        rows = torch.einsum("nrc,ncp->nrp", s[fisher_type], J).flatten(end_dim=1)
        blocks[name] = rows.T @ rows / nu
    return blocks


def test_auto_sends_mse_on_sequence_outputs_to_torch_func_with_the_reason(fisher_type):
    model, loss_fn, x, y = _sequence_mse()
    blocks = fl.exact_blocks(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    assert blocks.backend == "torch.func"
    assert "MSELoss supports outputs [N, C] only" in blocks.backend_reason
    assert "[N, 4, 3]" in blocks.backend_reason
    expected = _brute_force_blocks(model, loss_fn, x, y, fisher_type)
    for name, block in expected.items():
        assert rel_err(blocks[name], block) <= EXACT, name
    if fisher_type == "true":
        ggn = brute_force_ggn(model, loss_fn, x, y, ["2"])
        assert rel_err(blocks["2"], ggn) <= EXACT


def test_backpack_refuses_mse_on_sequence_outputs_by_name():
    model, loss_fn, x, y = _sequence_mse()
    with pytest.raises(fl.FisherlabError, match=r"MSELoss supports outputs \[N, C\] only.*"
                       r"\[N, 4, 3\].*backend='torch\.func'"):  # fmt: skip
        fl.exact_fisher(model, loss_fn, x, y, backend="backpack")


# ---------------------------------------------- Monte-Carlo labels keyed by the global sample
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_labels_depend_on_the_sample_not_on_the_batching(backend, loss):
    """The same samples in other batches (and with the global RNG elsewhere): the same labels;
    another seed: other labels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,)) if loss == "ce" else torch.randn(9, 3, dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()

    def blocks(data, seed=0):
        problem = fl.Problem(model, loss_fn, data, "mc", mc_samples=2, seed=seed)
        return fl.exact_blocks(problem, backend=backend)

    whole = blocks((x, y))
    torch.manual_seed(123)
    split = blocks([(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])])
    other = blocks((x, y), seed=1)
    for name in whole:
        assert rel_err(split[name], whole[name]) <= EXACT, name
        assert rel_err(other[name], whole[name]) > 1e-3, name
