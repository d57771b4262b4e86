"""Optimizers: numeric step equivalence with the blocks, resumption, fallback, safety."""

import gc
import io
import warnings

import pytest
import torch
from helpers import EXACT, PooledAttention, rel_err
from torch import nn

import fisherlab as fl
from fisherlab.blocks import build
from fisherlab.blocks.woodbury import WoodburyBlock
from fisherlab.layers import find_layers
from fisherlab.losses import LossSpec

LR, DAMPING = 0.1, 1e-2


def _problem(kind="mlp", n=12, seed=0, loss="ce"):
    torch.manual_seed(seed)
    if kind == "attn":
        model = PooledAttention()
        x = torch.randn(n, 3, 4, dtype=torch.float64)
    elif kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(n, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
        )
        x = torch.randn(n, 1, 4, 4, dtype=torch.float64)
    if loss == "ce":
        return model.double(), nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,))
    return model.double(), nn.MSELoss(), x, torch.randn(n, 3, dtype=torch.float64)


def _step(opt, model, loss_fn, x, y, mc=False):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    if mc:
        opt.mc_backward()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return before, grads


def _check_step(model, before, grads, direction_of):
    after = dict(model.named_parameters())
    for name, layer in find_layers(model).items():
        keys = [f"{name}.{p}" for p in layer.parameter_names()]

        def vector(tensors, keys=keys):
            return torch.cat([tensors[k].detach().flatten() for k in keys])

        expected = vector(before) - LR * direction_of(name, vector(grads))
        assert rel_err(vector(after), expected) <= EXACT, name


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_tengrad_step_is_the_exact_damped_natural_gradient(kind, loss):
    model, loss_fn, x, y = _problem(kind, loss=loss)
    blocks = fl.exact_blocks(model, loss_fn, x, y, fisher_type="empirical")
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING, loss_fn=loss_fn)
    before, grads = _step(opt, model, loss_fn, x, y)
    eye = {n: torch.eye(len(b), dtype=torch.float64) for n, b in blocks.items()}
    _check_step(
        model, before, grads, lambda n, g: torch.linalg.solve(blocks[n] + DAMPING * eye[n], g)
    )


def test_tengrad_with_the_mc_fisher_uses_the_sampled_block():
    """The optimizer draws its labels from torch's RNG: the reference draws the same rows s
    (the same RNG state) and builds F = (1/ν) Σ_n J_nᵀ s_n s_nᵀ J_n by per-sample autograd."""
    model, loss_fn, x, y = _problem("mlp")
    torch.manual_seed(5)
    rows = LossSpec.from_module(loss_fn).output_rows(model(x).detach(), y, "mc")[0]  # [N, C]
    jacobian_rows = {}
    for name in ("0", "2"):
        params = list(model.get_submodule(name).parameters())
        per_sample = [
            torch.autograd.grad((model(x[n : n + 1])[0] * rows[n]).sum(), params)
            for n in range(len(x))
        ]
        jacobian_rows[name] = torch.stack([torch.cat([g.flatten() for g in r]) for r in per_sample])
    blocks = {n: j.T @ j / len(x) for n, j in jacobian_rows.items()}
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING, fisher_type="mc", loss_fn=loss_fn)
    torch.manual_seed(5)
    before, grads = _step(opt, model, loss_fn, x, y, mc=True)
    eye = {n: torch.eye(len(b), dtype=torch.float64) for n, b in blocks.items()}
    _check_step(
        model, before, grads, lambda n, g: torch.linalg.solve(blocks[n] + DAMPING * eye[n], g)
    )


@pytest.mark.parametrize(
    "make, method, options",
    [
        (
            lambda m: fl.optim.KFAC(m, lr=LR, damping=DAMPING, stat_decay=0.0, inv_update_freq=1),
            "kfac",
            {},
        ),
        (
            lambda m: fl.optim.KFAC(
                m, lr=LR, damping=DAMPING, stat_decay=0.0, damping_mode="factored"
            ),
            "kfac",
            {"damping_mode": "factored"},
        ),
        (lambda m: fl.optim.EKFAC(m, lr=LR, damping=DAMPING, stat_decay=0.0), "ekfac", {}),
        (lambda m: fl.optim.EKFACra(m, lr=LR, damping=DAMPING, stat_decay=0.5), "ekfac", {}),
        (lambda m: fl.optim.SKFAC(m, lr=LR, damping=DAMPING, stat_decay=0.0), "skfac", {}),
    ],
    ids=["kfac", "kfac-factored", "ekfac", "ekfac-ra", "skfac"],
)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
def test_first_step_equals_the_blocks_damped_solve(make, method, options, kind):
    model, loss_fn, x, y = _problem(kind)
    blocks = build(method, fl.capture(model, loss_fn, x, y, fisher_type="empirical"), **options)
    opt = make(model)
    before, grads = _step(opt, model, loss_fn, x, y)
    _check_step(model, before, grads, lambda n, g: blocks[n].solve(g, DAMPING))


def test_fngd_first_epoch_is_tengrad_and_later_epochs_reuse_the_weights():
    model, loss_fn, x, y = _problem("mlp", n=24)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    twin = _problem("mlp", n=24)[0]
    fngd = fl.optim.FNGD(model, steps_per_epoch=2, lr=LR, damping=DAMPING)
    tengrad = fl.optim.TENGraD(twin, lr=LR, damping=DAMPING)
    for xb, yb in batches[:2]:  # first epoch: identical steps
        _step(fngd, model, loss_fn, xb, yb)
        _step(tengrad, twin, loss_fn, xb, yb)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert rel_err(p.detach(), q.detach()) <= EXACT
    stored = fngd.layer_state["0"]["weights"][0]
    cap = fl.capture(model, loss_fn, *batches[2], fisher_type="empirical")
    expected = {
        n: WoodburyBlock(lc.layer, lc.A, lc.G, cap.normaliser, "empirical", {}).weighted_gradient(
            fngd.layer_state[n]["weights"][0]
        )
        for n, lc in cap.items()
    }
    fresh = fl.curvature("woodbury", model, loss_fn, *batches[2], fisher_type="empirical")
    before, grads = _step(fngd, model, loss_fn, *batches[2])  # epoch 2, index 0
    _check_step(model, before, grads, lambda n, g: expected[n])
    assert not torch.allclose(expected["0"], fresh["0"].natural_gradient(DAMPING))
    assert torch.equal(fngd.layer_state["0"]["weights"][0], stored)


OPTIMIZERS = {
    "kfac": lambda m: fl.optim.KFAC(
        m, lr=0.05, damping=0.1, momentum=0.9, inv_update_freq=3, kl_clip=1e-2
    ),
    "ekfac": lambda m: fl.optim.EKFAC(m, lr=0.05, damping=0.1, momentum=0.9, basis_update_freq=3),
    "ekfac-ra": lambda m: fl.optim.EKFACra(
        m, lr=0.05, damping=0.1, momentum=0.9, basis_update_freq=3
    ),
    "tengrad": lambda m: fl.optim.TENGraD(m, lr=0.05, damping=0.1, momentum=0.9, weight_decay=1e-3),
    "skfac": lambda m: fl.optim.SKFAC(m, lr=0.05, damping=0.1, momentum=0.9),
    "fngd": lambda m: fl.optim.FNGD(m, steps_per_epoch=2, lr=0.05, damping=0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_resumes_bit_identically(name):
    _, loss_fn, x, y = _problem("cnn", n=24)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in (0, 8, 16, 0, 8, 16, 0)]
    reference = _problem("cnn", n=24)[0]
    opt = OPTIMIZERS[name](reference)
    for xb, yb in batches:
        _step(opt, reference, loss_fn, xb, yb)
    first = _problem("cnn", n=24)[0]
    opt = OPTIMIZERS[name](first)
    for xb, yb in batches[:4]:
        _step(opt, first, loss_fn, xb, yb)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    opt.close()
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _problem("cnn", n=24, seed=99)[0]
    resumed.load_state_dict(saved["model"])
    opt = OPTIMIZERS[name](resumed)
    opt.load_state_dict(saved["opt"])
    for xb, yb in batches[4:]:
        _step(opt, resumed, loss_fn, xb, yb)
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameters_without_a_block_are_refused_at_construction(name):
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(
        fl.FisherlabError, match=r"has no block for.*'1' \(LayerNorm\).*unsupported='sgd'"
    ):
        OPTIMIZERS[name](model)
    assert not [h for h in model._forward_hooks.values()]


def test_parameters_without_a_block_left_out_of_params_are_accepted():
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = fl.optim.KFAC(model, lr=LR, damping=DAMPING, params=params)
    assert set(opt.layers) == {"0", "3"}


def test_unsupported_sgd_gives_the_plain_step_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning, match=r"plain gradient step.*'1' \(LayerNorm\)") as record:
        opt = fl.optim.KFAC(model, lr=LR, damping=DAMPING, unsupported="sgd")
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before, grads = _step(opt, model, nn.CrossEntropyLoss(), x, y)
    for p in ("1.weight", "1.bias"):
        assert torch.equal(dict(model.named_parameters())[p].detach(), before[p] - LR * grads[p])
    assert not torch.equal(
        dict(model.named_parameters())["0.weight"].detach(),
        before["0.weight"] - LR * grads["0.weight"],
    )


def test_batchnorm_in_training_mode_is_trained_by_the_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.warns(UserWarning, match=r"'1' \(BatchNorm1d\)"):
        opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING, unsupported="sgd")
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    before, _ = _step(opt, model, nn.CrossEntropyLoss(), x, y)
    assert not torch.equal(model[1].weight.detach(), before["1.weight"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_finite_step_is_skipped_without_polluting_anything(name):
    model, loss_fn, x, y = _problem("mlp")
    opt = OPTIMIZERS[name](model)
    _step(opt, model, loss_fn, x, y)
    state = {
        k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
        for k, v in opt.layer_state.items()
    }
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.warns(
        RuntimeWarning, match=r"step 1 skipped: non-finite statistics in layers \['0', '2'\]"
    ):
        before, _ = _step(opt, model, loss_fn, bad, y)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    assert opt.steps == 1
    for layer, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                assert torch.equal(opt.layer_state[layer][key], value)
    _step(opt, model, loss_fn, x, y)  # and training goes on
    assert opt.steps == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: fl.optim.KFAC(m, lr=-1.0), r"lr must lie in \[0.0"),
        (lambda m: fl.optim.TENGraD(m, damping=0.0), r"damping must lie in \(0.0"),
        (lambda m: fl.optim.KFAC(m, stat_decay=1.0), r"stat_decay must lie in \[0.0, 1.0\)"),
        (
            lambda m: fl.optim.KFAC(m, inv_update_freq=0),
            "inv_update_freq must be a positive integer",
        ),
        (
            lambda m: fl.optim.EKFAC(m, basis_update_freq=1.5),
            "basis_update_freq must be a positive integer",
        ),
        (
            lambda m: fl.optim.FNGD(m, steps_per_epoch=0),
            "steps_per_epoch must be a positive integer",
        ),
        (lambda m: fl.optim.SKFAC(m, momentum=1.0), r"momentum must lie in \[0.0, 1.0\)"),
        (lambda m: fl.optim.TENGraD(m, fisher_type="true"), "not available in optimizers"),
        (lambda m: fl.optim.TENGraD(m, fisher_type="mc"), "needs loss_fn="),
        (
            lambda m: fl.optim.FNGD(m, 3, fisher_type="mc", loss_fn=nn.CrossEntropyLoss()),
            "FNGD needs fisher_type='empirical'",
        ),
        (lambda m: fl.optim.KFAC(m.parameters()), "take the model"),
    ],
)
def test_invalid_hyper_parameters_are_refused_at_construction(make, message):
    model = _problem("mlp")[0]
    hooks = _global_hooks()
    with pytest.raises(fl.FisherlabError, match=message):
        make(model)
    gc.collect()
    assert all(not m._forward_hooks for m in model.modules()) and _global_hooks() == hooks


def test_mc_without_the_extra_backward_is_a_clear_error():
    model, loss_fn, x, y = _problem("mlp")
    opt = fl.optim.KFAC(model, fisher_type="mc", loss_fn=loss_fn)
    with pytest.raises(fl.FisherlabError, match=r"mc_backward\(\)"):
        _step(opt, model, loss_fn, x, y)


def _global_hooks():
    from torch.nn.modules import module

    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


def test_hooks_are_removed_by_close_and_by_garbage_collection():
    model, loss_fn, x, y = _problem("mlp")
    before = _global_hooks()
    opt = fl.optim.KFAC(model)
    assert _global_hooks() > before
    assert all(not m._forward_hooks for m in model.modules())  # the model carries none
    opt.close()
    assert _global_hooks() == before
    opt = fl.optim.TENGraD(model)
    _step(opt, model, loss_fn, x, y)
    del opt
    gc.collect()
    assert _global_hooks() == before
    with torch.no_grad():  # evaluation afterwards records nothing and fails nothing
        model(x)


def test_evaluation_under_no_grad_records_nothing():
    model, _, x, _ = _problem("mlp")
    opt = fl.optim.KFAC(model)
    with torch.no_grad():
        model(x)
    assert opt._recorder.num_passes == 0
    opt.close()


TRAINING = {  # lr 0.003, momentum 0.9, batch 64, 4 epochs on digits (seeded)
    "kfac": lambda m, spe: fl.optim.KFAC(m, lr=0.003, damping=0.01, momentum=0.9),
    "ekfac": lambda m, spe: fl.optim.EKFAC(m, lr=0.003, damping=0.01, momentum=0.9),
    "ekfac-ra": lambda m, spe: fl.optim.EKFACra(m, lr=0.003, damping=0.01, momentum=0.9),
    "tengrad": lambda m, spe: fl.optim.TENGraD(m, lr=0.003, damping=0.01, momentum=0.9),
    "skfac": lambda m, spe: fl.optim.SKFAC(m, lr=0.003, damping=0.1, momentum=0.9),
    "fngd": lambda m, spe: fl.optim.FNGD(m, spe, lr=0.003, damping=0.01, momentum=0.9),
}


@pytest.mark.parametrize("name", list(TRAINING))
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_trains_digits_to_90_percent_in_four_epochs(name, model_name):
    split = fl.data.load_digits()
    torch.manual_seed(0)
    model = fl.models.build(model_name)
    n, batch = len(split.x_train), 64
    opt = TRAINING[name](model, -(-n // batch))
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(model(split.x_train[idx]), split.y_train[idx]).backward()
            opt.step()
    opt.close()
    with torch.no_grad():
        accuracy = (model(split.x_test).argmax(1) == split.y_test).float().mean().item()
    assert accuracy >= 0.90, accuracy


def test_overflowing_factors_skip_the_step_instead_of_crashing():
    """Finite inputs of 1e20 make ÃᵀÃ overflow float32: the step is skipped and rolled back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = fl.optim.KFAC(model, lr=LR, damping=DAMPING)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    _step(opt, model, nn.CrossEntropyLoss(), x, y)
    state = {k: dict(v) for k, v in opt.layer_state.items()}
    with pytest.warns(
        RuntimeWarning, match=r"step 1 skipped: the curvature of layers \['0'\] overflowed"
    ):
        before, _ = _step(opt, model, nn.CrossEntropyLoss(), x * 1e20, y)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    assert all(
        opt.layer_state[k][key] is value for k, v in state.items() for key, value in v.items()
    )
    opt.close()


def test_damped_inverse_and_factored_inverses_against_dense_solves():
    torch.manual_seed(0)
    rows = torch.randn(7, 5, dtype=torch.float64)
    matrix = rows.T @ rows  # rank 5 of 5, PSD
    from fisherlab.blocks.kfac import factored_inverses, factored_pi
    from fisherlab.linalg import damped_inverse

    inverse = damped_inverse(matrix, 0.3)
    shifted = matrix + 0.3 * torch.eye(5, dtype=torch.float64)
    assert rel_err(inverse @ shifted, torch.eye(5, dtype=torch.float64)) < 1e-12
    bad = matrix.clone()
    bad[0, 0] = float("inf")
    assert torch.isnan(damped_inverse(bad, 0.3)).all()  # no error, no host sync
    gamma, omega = matrix[:3, :3], matrix
    pi = factored_pi(gamma.diagonal().mean(), omega.diagonal().mean())
    gi, oi = factored_inverses(gamma, omega, 0.01)
    eye3, eye5 = torch.eye(3, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    assert rel_err(gi, torch.linalg.inv(gamma + 0.1 / pi * eye3)) < 1e-10
    assert rel_err(oi, torch.linalg.inv(omega + pi * 0.1 * eye5)) < 1e-10


def test_kfac_eigen_decompositions_in_float32_are_close_to_float64():
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    models = [nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        fl.optim.KFAC(models[0], lr=LR, damping=DAMPING),
        fl.optim.KFAC(models[1], lr=LR, damping=DAMPING, eigen_dtype=torch.float32),
    ]
    for model, opt in zip(models, opts):
        loss_fn(model(x), y).backward()
        opt.step()
    assert opts[1].layer_state["0"]["eig_omega"][1].dtype == torch.float32
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert rel_err(q.detach(), p.detach()) < 1e-5
    with pytest.raises(fl.FisherlabError, match=r"eigen_dtype must be a floating torch\.dtype"):
        fl.optim.KFAC(models[0], eigen_dtype="float32")


def test_work_is_shared_out_greedily_and_runs_here_without_distributed():
    from fisherlab.optim.distributed import assign_owners, computed_once

    owners = assign_owners({"a": 8.0, "b": 5.0, "c": 4.0, "d": 1.0}, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}  # loads 9 and 9
    out = computed_once({"a": lambda: (torch.ones(2),)}, {"a": (torch.empty(2),)}, {"a": 1.0})
    assert torch.equal(out["a"][0], torch.ones(2))
