"""capture(): per-sample gradients and Fisher rows against BackPACK and brute force."""

import copy

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from helpers import EXACT, brute_force_ggn, per_sample_grads, rel_err
from torch import nn

import fisherlab as fl


def test_per_sample_gradients_equal_torch_func(case, batch_size):
    model, loss_fn, x, y = case.build(batch_size)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
    for name, layer in cap.items():
        grad_w, grad_b = layer.per_sample_gradients()
        ours = torch.cat(
            [grad_w[0].flatten(start_dim=1)] + ([grad_b[0]] if grad_b is not None else []), dim=1
        )
        assert rel_err(ours, per_sample_grads(model, loss_fn, x, y, name)) <= EXACT, name


def test_per_sample_gradients_equal_backpack_batchgrad(case, batch_size):
    if not case.backpack:
        pytest.skip("BackPACK cannot take this model")
    model, loss_fn, x, y = case.build(batch_size)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
    net = extend(copy.deepcopy(model), use_converter=not isinstance(model, nn.Sequential))
    with backpack(BatchGrad()):
        extend(copy.deepcopy(loss_fn))(net(x), y).backward()
    reference = dict(net.named_parameters())
    for name, layer in cap.items():
        grad_w, grad_b = layer.per_sample_gradients()
        prefix = f"{name}." if name else ""
        # BatchGrad differentiates the reduced loss: rows carry 1/ν
        assert rel_err(grad_w[0] / cap.normaliser, reference[prefix + "weight"].grad_batch) <= EXACT
        if grad_b is not None:
            assert (
                rel_err(grad_b[0] / cap.normaliser, reference[prefix + "bias"].grad_batch) <= EXACT
            )


def test_true_fisher_rows_give_brute_force_ggn(case, batch_size):
    model, loss_fn, x, y = case.build(batch_size)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="true")
    for name, layer in cap.items():
        rows = layer.jacobian_rows().flatten(end_dim=1)
        fisher = rows.T @ rows / cap.normaliser
        assert rel_err(fisher, brute_force_ggn(model, loss_fn, x, y, [name])) <= EXACT, name


@pytest.mark.parametrize("mc_samples", [1, 4])
def test_shapes_per_fisher_type(case, fisher_type, mc_samples):
    model, loss_fn, x, y = case.build(3)
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=mc_samples)
    rows = {"true": case.out, "mc": mc_samples, "empirical": 1}[fisher_type]
    assert cap.fisher_type == fisher_type and cap.batch_size == 3
    for name, layer in cap.items():
        module = model.get_submodule(name)
        d_in = module.weight[0].numel() + (module.bias is not None)
        seen = []
        handle = module.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
        with torch.no_grad():
            model(x)
        handle.remove()
        positions = (
            seen[0][0, 0].numel()
            if isinstance(module, nn.Conv2d)
            else seen[0][0].numel() // module.out_features
        )
        assert layer.A.shape == (3, positions, d_in)
        assert layer.G.shape == (rows, 3, positions, module.weight.shape[0])
        if module.bias is not None:
            assert torch.all(layer.A[..., -1] == 1)


def test_mc_rows_are_scaled_gradients_of_sampled_labels():
    """One MC draw per input: the row is the gradient of the loss at a sampled label."""
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    torch.manual_seed(3)
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="mc", mc_samples=2)
    g = cap["0"].G[:, :, 0, :] * 2**0.5  # undo 1/sqrt(k): p - onehot(label)
    p = torch.softmax(model(x), dim=1).detach()
    onehot = p.unsqueeze(0) - g
    assert torch.allclose(onehot.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    assert torch.allclose(onehot, onehot.round(), atol=1e-12)
    assert set(onehot.round().unique().tolist()) <= {0.0, 1.0}


def test_kronecker_and_parameter_order_are_pinned():
    """vec_r(g ãᵀ) = g ⊗ ã; parameter order = weight row-major, then bias."""
    layer = nn.Linear(2, 2).double()
    info = fl.layers.Layer("", layer, fl.layers.ADAPTERS[nn.Linear])
    assert info.kron_to_param_index().tolist() == [0, 1, 3, 4, 2, 5]
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    a, g = cap["0"].A[0, 0], cap["0"].G[0, 0, 0]
    flat = cap["0"].jacobian_rows()[0, 0]
    assert torch.equal(flat, torch.kron(g, a)[cap["0"].layer.kron_to_param_index()])
    model.zero_grad()
    nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    expected = torch.nn.utils.parameters_to_vector(p.grad for p in model[0].parameters())
    assert rel_err(flat, expected) <= EXACT


def test_capture_under_no_grad_and_frozen_first_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with torch.no_grad():
        cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="true")
    rows = cap["0"].jacobian_rows().flatten(end_dim=1)
    assert (
        rel_err(
            rows.T @ rows / cap.normaliser,
            brute_force_ggn(model, nn.CrossEntropyLoss(), x, y, ["0"]),
        )
        <= EXACT
    )
    assert not model[0].weight.requires_grad
