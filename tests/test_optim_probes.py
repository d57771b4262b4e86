"""Loops that probing found silently wrong: each now gives the right step or a clear refusal.

float64 unless stated; each test uses the probe's setting in small.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import per_sample_grads, rel_err
from test_optim_loops import MAKE, NAMES, _close, _data, _model, _params
from torch import nn

import fisherlab as fl
from fisherlab.blocks.ekfac import kfe_scalings, pool_null_spaces


# ------------------------------------------------------- passes that never touch p.grad
def _pgd(model, loss_fn, x, y, steps=3, size=0.1):
    """Three steps of a PGD attack: ``torch.autograd.grad`` w.r.t. the input only."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        (g,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = (delta + size * g.sign()).clamp(-0.3, 0.3).detach().requires_grad_(True)
    return (x + delta).detach()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind, loss", [("mlp", "ce"), ("mlp", "mse"), ("cnn", "ce")])
def test_adversarial_training_steps_as_the_clean_loop_on_the_adversarial_batch(name, kind, loss):
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    batches = [_data(kind, 8, seed, loss=loss) for seed in (1, 2, 3)]
    model = _model(kind)
    opt = MAKE[name](model, loss_fn=loss_fn)
    adversarial = []
    for x, y in batches:
        opt.zero_grad()
        x_adv = _pgd(model, loss_fn, x, y)
        adversarial.append((x_adv, y))
        loss_fn(model(x_adv), y).backward()
        opt.step()
    reference = _model(kind)
    ref_opt = MAKE[name](reference, loss_fn=loss_fn)
    for x_adv, y in adversarial:
        ref_opt.zero_grad()
        loss_fn(reference(x_adv), y).backward()
        ref_opt.step()
    _close(_params(model), _params(reference))


@pytest.mark.parametrize("name", ["kfac", "tengrad"])
def test_autograd_grad_wrt_the_parameters_adds_no_samples(name):
    """A gradient penalty's ``autograd.grad(loss, params)`` writes no p.grad: not counted."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    models = [_model(), _model()]
    opts = [MAKE[name](m, loss_fn=loss_fn) for m in models]
    for i, (model, opt) in enumerate(zip(models, opts)):
        opt.zero_grad()
        if i:
            torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        loss_fn(model(x), y).backward()
        opt.step()
    _close(_params(models[0]), _params(models[1]))


# ------------------------------------------------- weights used outside their module's call
class TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())


def _tied(name):
    torch.manual_seed(0)
    model = TiedAutoencoder().double()
    x = torch.randn(8, 5, dtype=torch.float64)
    opt = MAKE[name](model, loss_fn=nn.MSELoss())
    nn.MSELoss()(model(x), x).backward()
    return model, opt


def _auxiliary(name):
    model = _model()
    x, y = _data("mlp", 8, 1)
    opt = MAKE[name](model, loss_fn=nn.CrossEntropyLoss())
    h = torch.randn(8, 6, dtype=torch.float64)
    (nn.CrossEntropyLoss()(model(x), y) + 0.5 * model[2](h).pow(2).mean()).backward()
    return model, opt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case, layer", [(_tied, "enc.weight"), (_auxiliary, "2.weight")])
def test_a_weight_used_outside_its_module_call_is_refused_by_name(name, case, layer):
    model, opt = case(name)
    before = _params(model)
    with pytest.raises(fl.FisherlabError, match=f"'{layer}'.*outside their module's call"):
        opt.step()
    _close(_params(model), before, 0.0)


@pytest.mark.parametrize("name", ["kfac", "tengrad"])
def test_the_check_can_be_switched_off(name):
    model, opt = _auxiliary(name)
    before = _params(model)
    opt.check_gradients_every = 0
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in _params(model).items())


@pytest.mark.parametrize("name", NAMES)
def test_value_clipping_passes_the_check(name):
    model = _model()
    x, y = _data("mlp", 8, 1)
    opt = MAKE[name](model, loss_fn=nn.CrossEntropyLoss())
    nn.CrossEntropyLoss()(model(x), y).backward()
    clip = 0.3 * max(float(p.grad.abs().max()) for p in model.parameters())
    torch.nn.utils.clip_grad_value_(model.parameters(), clip)
    assert sum(int((p.grad.abs() == clip).sum()) for p in model.parameters()) > 1
    opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_clipping_and_weight_decay_on_weights_only_pass_the_check(name):
    model = _model()
    x, y = _data("mlp", 8, 1)
    opt = MAKE[name](model, loss_fn=nn.CrossEntropyLoss())
    nn.CrossEntropyLoss()(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2)
    for n, p in model.named_parameters():
        if n.endswith("weight"):
            p.grad += 1e-2 * p.detach()
    opt.step()


# ------------------------------------------------------------ state loaded at another dtype
def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cast(v, dtype) for v in value)
    return value


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "source, target",
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
    ids=["float32-to-float64", "float64-to-float32"],
)
def test_a_state_saved_at_another_dtype_is_cast_on_load(name, source, target):
    """Steps after loading equal those of a run started in the target dtype from the cast state."""
    loss_fn = nn.CrossEntropyLoss()
    model = _model(dtype=source)
    opt = MAKE[name](model, loss_fn=loss_fn, momentum=0.9)
    for seed in (1, 2):
        x, y = _data(n=8, seed=seed, dtype=source)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    state, params = opt.state_dict(), model.state_dict()
    runs = []
    for cast_first in (False, True):
        m = _model(dtype=target)
        m.load_state_dict({k: v.to(target) for k, v in params.items()})
        o = MAKE[name](m, loss_fn=loss_fn, momentum=0.9)
        o.load_state_dict(_cast(state, target) if cast_first else state)
        for seed in (3, 4):
            x, y = _data(n=8, seed=seed, dtype=target)
            o.zero_grad()
            loss_fn(m(x), y).backward()
            o.step()
        assert o.skipped_steps == 0
        runs.append(_params(m))
    _close(runs[0], runs[1], 0.0)
    moved = {k: v.to(target) for k, v in params.items()}
    assert all(not torch.equal(runs[0][k], moved[k]) for k in moved)


# ------------------------------------------------------------- damping below the dtype's reach
def _damping_run(name, dtype, damping):
    loss_fn = nn.CrossEntropyLoss()
    model = _model(dtype=dtype)
    opt = MAKE[name](model, loss_fn=loss_fn, damping=damping)
    x, y = _data(n=4, dtype=dtype)  # batch 4 < layer sizes: singular blocks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return opt, [str(w.message) for w in caught if "below what" in str(w.message)]


@pytest.mark.parametrize("name", NAMES)
def test_a_damping_float32_cannot_resolve_is_warned_about_once(name):
    _, caught = _damping_run(name, torch.float32, 1e-8)
    assert len(caught) == 1, caught
    assert "torch.float32" in caught[0] and "'0'" in caught[0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_damping_the_dtype_resolves_is_not_warned_about(name, dtype):
    _, caught = _damping_run(name, dtype, 1e-8 if dtype == torch.float64 else 1e-3)
    assert not caught, caught


def test_the_curvature_scale_bounds_the_largest_eigenvalue():
    """``τ ≥ tr F̂ ≥ λ_max`` against the dense block of per-sample gradients (float64)."""
    loss_fn = nn.CrossEntropyLoss()
    model = _model()
    opt = MAKE["tengrad"](model, loss_fn=loss_fn)
    x, y = _data(n=4)
    J = per_sample_grads(_model(), loss_fn, x, y, "0")
    loss_fn(model(x), y).backward()
    opt.step()
    trace = float(torch.trace(J.T @ J).detach() / len(x))
    assert trace <= opt.curvature_scale["0"] * (1 + 1e-12)
    assert opt.curvature_scale["0"] == pytest.approx(trace, rel=1e-10)  # T = 1: equal


def _tengrad_float32_direction(monkeypatch, refine, name="tengrad"):
    """The first direction of layer '0' at λ = 1e-8 in float32: its distance to the exact one."""
    seen = {}
    cls = {"tengrad": fl.optim.TENGraD, "fngd": fl.optim.FNGD}[name]
    original = cls._direction

    def spy(self, name, layer, A, G, normaliser, grad, group):
        d = original(self, name, layer, A, G, normaliser, grad, group)
        if name == "0":
            seen.update(layer=layer, A=A, G=G, normaliser=normaliser, grad=grad, d=d)
        return d

    monkeypatch.setattr(cls, "_direction", spy)
    if not refine:
        monkeypatch.setattr(cls, "_needs_refinement", lambda *a: False)
    loss_fn = nn.CrossEntropyLoss()
    model = _model(dtype=torch.float32)
    opt = MAKE[name](model, loss_fn=loss_fn, damping=1e-8)
    x, y = _data(n=4, dtype=torch.float32)
    loss_fn(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    # the exact solve of the float32 statistics, in float64 with dense per-sample gradients
    layer, A, G = seen["layer"], seen["A"].double(), seen["G"].double()
    J = layer.gradients_from_rows(A, G).reshape(-1, layer.num_params)
    F = J.T @ J / seen["normaliser"]
    exact = torch.linalg.solve(F + 1e-8 * torch.eye(len(F), dtype=F.dtype), seen["grad"].double())
    return rel_err(seen["d"].double(), exact)


@pytest.mark.parametrize("name", ["tengrad", "fngd"])
def test_tengrad_refines_a_float32_solve_that_cannot_resolve_the_damping(monkeypatch, name):
    """FNGD's first epoch solves as TENGraD does."""
    assert _tengrad_float32_direction(monkeypatch, refine=True, name=name) <= 1e-6


def test_tengrad_without_refinement_is_far_from_the_exact_solve(monkeypatch):
    """The probe's failure, kept as the reason for the refinement."""
    assert _tengrad_float32_direction(monkeypatch, refine=False) > 1e-2


# ------------------------------------------------- EKFAC with singular factors: any null basis
@pytest.mark.parametrize("name", ["ekfac", "ekfac-ra"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_steps_do_not_depend_on_the_null_space_basis(name, kind):
    """Batch 4 below the layers' input sizes: inputs scaled by 1 + 1e-14 change nothing."""
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for factor in (1.0, 1 + 1e-14):
        model = _model(kind)
        opt = MAKE[name](model, loss_fn=loss_fn, damping=1e-3)
        for seed in (1, 2, 3):
            x, y = _data(kind, 4, seed)
            opt.zero_grad()
            loss_fn(model(x * factor), y).backward()
            opt.step()
        runs.append(_params(model))
    _close(runs[0], runs[1], 1e-9)


def _rotated_null_basis(factor, seed):
    values, vectors = torch.linalg.eigh(factor)
    null = values <= len(values) * torch.finfo(values.dtype).eps * values.max()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(int(null.sum()), int(null.sum()), generator=g).double())
    vectors = vectors.clone()
    vectors[:, null] = vectors[:, null] @ q
    return values, vectors


def test_pooled_null_space_scalings_give_one_damped_inverse_for_every_basis():
    """Dense ``Q diag(1/(s̄ + λ)) Qᵀ`` with two null-space bases of singular factors."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(2, 5, generator=g).double(), torch.randn(2, 3, generator=g).double()
    omega, gamma = X.T @ X, Y.T @ Y  # ranks 2 of 5 and 2 of 3
    A = torch.randn(6, 1, 5, generator=g).double()  # new samples, outside the factors' ranges
    G = torch.randn(1, 6, 1, 3, generator=g).double()
    inverses = []
    for seed in (1, 2):
        (lg, ug), (lo, uo) = _rotated_null_basis(gamma, seed), _rotated_null_basis(omega, seed)
        s = pool_null_spaces(kfe_scalings(A, G, ug, uo, 6.0), lg, lo)
        Q = torch.kron(ug, uo)
        inverses.append(Q @ torch.diag(1 / (s.flatten() + 1e-3)) @ Q.T)
    assert rel_err(inverses[0], inverses[1]) <= 1e-10
    # unpooled, the two bases disagree (the probe's failure)
    s1, s2 = (
        kfe_scalings(A, G, _rotated_null_basis(gamma, k)[1], _rotated_null_basis(omega, k)[1], 6.0)
        for k in (1, 2)
    )
    assert not torch.allclose(s1, s2)
