"""The optimizers in the loops people write: the ``torch.optim`` contract, row by row.

Each test runs the loop of a user (AMP, clipping, accumulation, param groups, …) against the
textbook loop or a brute-force reference; float64 unless stated.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
from helpers import EXACT, per_sample_grads, rel_err
from syncs import counting_syncs
from torch import nn

import fisherlab as fl

LR, DAMPING = 0.1, 1e-2

BASE = {"lr": LR, "damping": DAMPING}
MAKE = {
    "kfac": lambda m, **kw: fl.optim.KFAC(m, **{**BASE, **kw}),
    "ekfac": lambda m, **kw: fl.optim.EKFAC(m, **{**BASE, **kw}),
    "ekfac-ra": lambda m, **kw: fl.optim.EKFACra(m, **{**BASE, **kw}),
    "tengrad": lambda m, **kw: fl.optim.TENGraD(m, **{**BASE, **kw}),
    "skfac": lambda m, **kw: fl.optim.SKFAC(m, **{**BASE, **kw}),
    "fngd": lambda m, **kw: fl.optim.FNGD(m, 2, **{**BASE, **kw}),
}
NAMES = list(MAKE)


def _model(kind="mlp", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
        )
    return model.to(dtype)


def _data(kind="mlp", n=8, seed=1, dtype=torch.float64, loss="ce"):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind == "mlp" else (n, 1, 4, 4)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    if loss == "ce":
        return x, torch.randint(0, 3, (n,), generator=g)
    return x, torch.randn(n, 3, generator=g, dtype=dtype)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _close(a, b, tol=EXACT):
    for n in a:
        assert rel_err(a[n], b[n]) <= tol, n


def _plain_steps(name, kind, batches, loss_fn, **kw):
    """The textbook loop: one batch per step."""
    model = _model(kind)
    opt = MAKE[name](model, loss_fn=loss_fn, **kw)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.close()
    return model


# ------------------------------------------------------------------ statistics follow p.grad
def _loop_equals_plain(name, kind, loss_fn, batches, backward):
    """Steps whose loop runs ``backward(model, x, y)`` end where the textbook loop ends."""
    reference = _plain_steps(name, kind, batches, loss_fn)
    model = _model(kind)
    opt = MAKE[name](model, loss_fn=loss_fn)
    for x, y in batches:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    _close(_params(model), _params(reference))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind, loss", [("mlp", "ce"), ("cnn", "ce"), ("mlp", "mse")])
def test_two_micro_batches_of_4_equal_one_batch_of_8(name, kind, loss):
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()

    def accumulate(model, x, y):  # the usual accumulation: loss / micro-batches
        for part in (slice(0, 4), slice(4, 8)):
            (loss_fn(model(x[part]), y[part]) / 2).backward()

    batches = [_data(kind, 8, seed, loss=loss) for seed in (1, 2, 3)]
    _loop_equals_plain(name, kind, loss_fn, batches, accumulate)


@pytest.mark.parametrize("name", NAMES)
def test_two_calls_of_the_model_in_one_step_are_two_sets_of_samples(name):
    """A Siamese-style loss over two calls equals one call on both halves (no mispairing)."""
    loss_fn = nn.CrossEntropyLoss()

    def siamese(model, x, y):
        first, second = model(x[:4]), model(x[4:])
        (0.5 * loss_fn(first, y[:4]) + 0.5 * loss_fn(second, y[4:])).backward()

    batches = [_data("mlp", 8, seed) for seed in (1, 2, 3)]
    _loop_equals_plain(name, "mlp", loss_fn, batches, siamese)


@pytest.mark.parametrize("name", NAMES)
def test_a_forward_between_backward_and_step_changes_nothing(name):
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed) for seed in (1, 2, 3)]
    reference = _plain_steps(name, "mlp", batches, loss_fn)
    model = _model()
    opt = MAKE[name](model, loss_fn=loss_fn)
    for x, y in batches:
        opt.zero_grad()
        out = model(x)
        loss_fn(out, y).backward()
        accuracy = (model(x).argmax(1) == y).float().mean()  # grad enabled, no backward
        loss_fn(model(x + 1), y)  # a second loss, never back-propagated
        assert 0 <= accuracy <= 1
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), dict(reference.named_parameters())[n].detach()), n


@pytest.mark.parametrize("name", NAMES)
def test_backward_twice_through_one_forward_adds_up(name):
    loss_fn = nn.CrossEntropyLoss()

    def twice(model, x, y):
        out = model(x)
        (0.25 * loss_fn(out, y)).backward(retain_graph=True)
        (0.75 * loss_fn(out, y)).backward()

    batches = [_data("mlp", 8, seed) for seed in (1, 2)]
    _loop_equals_plain(name, "mlp", loss_fn, batches, twice)


def test_zero_grad_drops_the_statistics_recorded_with_the_gradients():
    loss_fn = nn.CrossEntropyLoss()
    (x, y), (x2, y2) = _data("mlp", 8, 1), _data("mlp", 8, 2)
    reference = _plain_steps("tengrad", "mlp", [(x, y)], loss_fn)
    model = _model()
    opt = MAKE["tengrad"](model, loss_fn=loss_fn)
    loss_fn(model(x2), y2).backward()  # e.g. a step GradScaler skipped: gradients zeroed
    opt.zero_grad()
    out = model(x)
    opt.zero_grad()  # zero_grad between the forward and the backward keeps the forward
    loss_fn(out, y).backward()
    opt.step()
    _close(_params(model), _params(reference))


# ------------------------------------------------------------------ what is preconditioned
def _first_step(name, loop, kind="mlp"):
    """Parameter change of one step whose loop runs ``loop(model, opt, x, y)``."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(kind, 8, 1)
    model = _model(kind)
    opt = MAKE[name](model, loss_fn=loss_fn)
    before = _params(model)
    opt.zero_grad()
    loop(model, opt, x, y, loss_fn)
    opt.step()
    opt.close()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def _plain(model, opt, x, y, loss_fn):
    loss_fn(model(x), y).backward()


@pytest.mark.parametrize("name", NAMES)
def test_clipping_scales_the_step_as_preconditioning_the_clipped_gradient(name):
    factor = {}

    def clipped(model, opt, x, y, loss_fn):
        loss_fn(model(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        factor["s"] = 1e-3 / (norm + 1e-6)

    plain, clip = _first_step(name, _plain), _first_step(name, clipped)
    _close(clip, {n: factor["s"] * d for n, d in plain.items()})


@pytest.mark.parametrize("name", NAMES)
def test_an_l2_term_in_the_loss_is_preconditioned_with_the_gradient(name):
    """P(g + δ) = P(g) + P(δ): the penalty's gradient δ goes through the preconditioner."""

    def penalty(model):
        return 0.3 * sum((p**2).sum() for p in model.parameters())

    def with_l2(model, opt, x, y, loss_fn):
        (loss_fn(model(x), y) + penalty(model)).backward()

    def only_penalty_gradient(model, opt, x, y, loss_fn):  # statistics of the batch, p.grad = δ
        loss_fn(model(x), y).backward()
        for p in model.parameters():
            p.grad = 0.6 * p.detach().clone()

    plain, l2 = _first_step(name, _plain), _first_step(name, with_l2)
    delta = _first_step(name, only_penalty_gradient)
    _close(l2, {n: plain[n] + delta[n] for n in plain})


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tengrad_solves_with_p_grad_not_the_batch_gradient(kind):
    """The exact damped solve of the modified gradient, against dense per-sample gradients."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(kind, 8, 1)
    model = _model(kind)
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING)
    loss_fn(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    for p in model.parameters():
        p.grad += 0.01 * p.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = _params(model)
    opt.step()
    for name in ("0", "3" if kind == "cnn" else "2"):
        J = per_sample_grads(model_at(before, kind), loss_fn, x, y, name)
        F = J.T @ J / len(x)
        g = torch.cat([grads[f"{name}.weight"].flatten(), grads[f"{name}.bias"]])
        expected = -LR * torch.linalg.solve(F + DAMPING * torch.eye(len(F), dtype=F.dtype), g)
        after = dict(model.named_parameters())
        change = torch.cat(
            [
                (after[f"{name}.weight"] - before[f"{name}.weight"]).flatten(),
                after[f"{name}.bias"] - before[f"{name}.bias"],
            ]
        )
        assert rel_err(change.detach(), expected) <= 1e-9, name


def model_at(params, kind):
    model = _model(kind)
    model.load_state_dict(params)
    return model


def test_fngd_later_epochs_scale_with_clipping_and_solve_for_a_penalty():
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed) for seed in (1, 2, 3)]

    def run(modify):
        model = _model()
        opt = fl.optim.FNGD(model, 2, lr=LR, damping=DAMPING)
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if i == 2:
                before = _params(model)
                extra = modify(model)
            opt.step()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, extra, opt

    plain, _, _ = run(lambda m: None)
    clipped, norm, _ = run(lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3))
    _close(clipped, {n: 1e-3 / (norm + 1e-6) * d for n, d in plain.items()}, 1e-9)

    def l2(model):
        for p in model.parameters():
            p.grad += 0.1 * p.detach()

    with pytest.warns(RuntimeWarning, match="not a multiple of the batch gradient"):
        penalised, _, _ = run(l2)
    assert not all(torch.allclose(penalised[n], plain[n]) for n in plain)


def test_fngd_fallback_step_is_tengrad_s_solve():
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed) for seed in (1, 2, 3)]
    models = [_model(), _model()]
    fngd = fl.optim.FNGD(models[0], 2, lr=LR, damping=DAMPING)
    tengrad = fl.optim.TENGraD(models[1], lr=LR, damping=DAMPING)
    for i, (x, y) in enumerate(batches):
        for model, opt in zip(models, (fngd, tengrad)):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if i == 2:
                for p in model.parameters():
                    p.grad += 0.1 * p.detach()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
    _close(_params(models[0]), _params(models[1]))


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("name", NAMES)
def test_gradscaler_step_equals_the_unscaled_step(name):
    """float32: scaler.scale(loss).backward(); scaler.step(opt) is the unscaled step."""
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed, torch.float32) for seed in (1, 2, 3)]
    plain, scaled = _model(dtype=torch.float32), _model(dtype=torch.float32)
    opt_plain = MAKE[name](plain, loss_fn=loss_fn)
    opt = MAKE[name](scaled, loss_fn=loss_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    for x, y in batches:
        opt_plain.zero_grad()
        loss_fn(plain(x), y).backward()
        opt_plain.step()
        opt.zero_grad()
        scaler.scale(loss_fn(scaled(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() > 2.0**12  # every step was taken: the scale grew
    _close(_params(scaled), _params(plain), 1e-5)


@pytest.mark.parametrize("name", ["kfac", "tengrad"])
def test_gradscaler_with_unscale_and_clipping_needs_and_uses_grad_scaler(name):
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1, torch.float32)
    plain = _model(dtype=torch.float32)
    opt_plain = MAKE[name](plain, loss_fn=loss_fn)
    loss_fn(plain(x), y).backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
    opt_plain.step()

    def scaled_step(**kw):
        model = _model(dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt = MAKE[name](model, loss_fn=loss_fn, **({"grad_scaler": scaler} if kw else {}))
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
        return model

    with pytest.raises(fl.FisherlabError, match="pass grad_scaler=scaler"):
        scaled_step()
    _close(_params(scaled_step(grad_scaler=True)), _params(plain), 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradscaler_overflow_skips_the_step_and_its_statistics(name):
    loss_fn = nn.CrossEntropyLoss()
    (x, y), (x2, y2) = _data("mlp", 8, 1, torch.float32), _data("mlp", 8, 2, torch.float32)
    model = _model(dtype=torch.float32)
    opt = MAKE[name](model, loss_fn=loss_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_fn(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")  # an overflow
    before = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped quietly, as GradScaler does
        scaler.step(opt)
    scaler.update()
    _close(_params(model), before, 0.0)
    assert opt.skipped_steps == 1 and opt.steps == 0 and scaler.get_scale() == 2.0**9
    assert opt.state_dict()["fisherlab"]["skipped_steps"] == 1
    # the next step sees only its own statistics
    reference = _model(dtype=torch.float32)
    ref_opt = MAKE[name](reference, loss_fn=loss_fn)
    loss_fn(reference(x2), y2).backward()
    ref_opt.step()
    opt.zero_grad()
    scaler.scale(loss_fn(model(x2), y2)).backward()
    scaler.step(opt)
    _close(_params(model), _params(reference), 1e-5)


# ------------------------------------------------------------------ outputs and layers
class _TupleNet(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.body, self.as_dict = _model(), as_dict

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "aux": x.sum()} if self.as_dict else (logits, x.sum())


@pytest.mark.parametrize("as_dict, output", [(False, 0), (True, "logits")])
def test_tuple_and_dict_outputs_are_selected_with_output(as_dict, output):
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    reference = _plain_steps("kfac", "mlp", [(x, y)], loss_fn)
    net = _TupleNet(as_dict)
    opt = MAKE["kfac"](net, loss_fn=loss_fn, output=output)
    loss_fn(net(x)[output], y).backward()
    opt.step()
    _close({n.removeprefix("body."): p for n, p in _params(net).items()}, _params(reference))


def test_tuple_outputs_without_output_are_refused_at_the_first_step():
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    net = _TupleNet()
    opt = MAKE["tengrad"](net)
    loss_fn(net(x)[0], y).backward()
    before = _params(net)
    with pytest.raises(fl.FisherlabError, match=r"returns tuple.*pass output="):
        opt.step()
    _close(_params(net), before, 0.0)


class _Twice(nn.Module):
    """One Linear layer applied twice per forward (weights shared within the model)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_a_layer_called_twice_per_forward_gets_the_exact_block_of_both_calls():
    """TENGraD's block of ``inner`` from both calls is the exact one (torch.func reference)."""
    loss_fn = nn.CrossEntropyLoss()
    model = _Twice().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING)
    J = per_sample_grads(model, loss_fn, x, y, "inner")
    loss_fn(model(x), y).backward()
    g = torch.cat([model.inner.weight.grad.flatten(), model.inner.bias.grad])
    before = torch.cat([model.inner.weight.detach().flatten(), model.inner.bias.detach()])
    opt.step()
    F = J.T @ J / len(x)
    expected = before - LR * torch.linalg.solve(F + DAMPING * torch.eye(len(F), dtype=F.dtype), g)
    after = torch.cat([model.inner.weight.detach().flatten(), model.inner.bias.detach()])
    assert rel_err(after, expected) <= EXACT


def test_a_frozen_bias_leaves_the_weight_preconditioned_alone():
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    model = _model()
    model[0].bias.requires_grad_(False)
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING)
    J = per_sample_grads(model, loss_fn, x, y, "0")[:, : model[0].weight.numel()]
    loss_fn(model(x), y).backward()
    g = model[0].weight.grad.flatten().clone()
    before, bias = model[0].weight.detach().flatten().clone(), model[0].bias.detach().clone()
    opt.step()
    F = J.T @ J / len(x)
    expected = before - LR * torch.linalg.solve(F + DAMPING * torch.eye(len(F), dtype=F.dtype), g)
    assert rel_err(model[0].weight.detach().flatten(), expected) <= EXACT
    assert torch.equal(model[0].bias.detach(), bias)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_embedding_gradients_get_the_plain_step(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    model = model.double()
    with pytest.warns(UserWarning, match=r"'0' \(Embedding\)"):
        opt = MAKE[name](model, momentum=0.9, unsupported="sgd")
    tokens, y = torch.randint(0, 10, (6, 2)), torch.randint(0, 3, (6,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), y).backward()
        assert model[0].weight.grad.is_sparse
        before = model[0].weight.detach().clone()
        opt.step()
    assert opt.steps == 2 and not torch.equal(model[0].weight.detach(), before)


def test_cross_entropy_summed_without_loss_fn_is_warned_about_once():
    x, y = _data("mlp", 8, 1)
    model = _model()
    opt = fl.optim.KFAC(model, lr=LR, damping=DAMPING)
    nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    with pytest.warns(UserWarning, match=r"reduction='sum' \(pass loss_fn= with it\)"):
        opt.step()
    model = _model()
    for loss_fn, kw in [
        (nn.CrossEntropyLoss(reduction="sum"), {"loss_fn": nn.CrossEntropyLoss(reduction="sum")}),
        (nn.CrossEntropyLoss(), {}),
    ]:
        opt = fl.optim.KFAC(model, lr=LR, damping=DAMPING, **kw)
        loss_fn(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        opt.zero_grad()
        opt.close()


def test_micro_batches_not_divided_by_their_number_are_warned_about():
    x, y = _data("mlp", 8, 1)
    model = _model()
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING, loss_fn=nn.CrossEntropyLoss())
    for part in (slice(0, 4), slice(4, 8)):
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
    with pytest.warns(UserWarning, match="not divided by their number"):
        opt.step()


# ------------------------------------------------------------------ param groups
def _layer(model, name):
    return list(model.get_submodule(name).parameters())


@pytest.mark.parametrize("name", NAMES)
def test_two_param_groups_equal_two_separate_optimizers(name):
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed) for seed in (1, 2, 3)]
    apart, together = _model(), _model()
    first = MAKE[name](apart, loss_fn=loss_fn, params=_layer(apart, "0"))
    second = MAKE[name](apart, loss_fn=loss_fn, params=_layer(apart, "2"), lr=0.03, damping=0.1)
    groups = [
        {"params": _layer(together, "0")},
        {"params": _layer(together, "2"), "lr": 0.03, "damping": 0.1},
    ]
    opt = MAKE[name](together, loss_fn=loss_fn, params=groups)
    for x, y in batches:
        for o in (first, second, opt):
            o.zero_grad()
        loss_fn(apart(x), y).backward()
        first.step()
        second.step()
        loss_fn(together(x), y).backward()
        opt.step()
    _close(_params(together), _params(apart))


def test_add_param_group_preconditions_the_new_layers():
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    added, reference = _model(), _model()
    opt = fl.optim.TENGraD(added, lr=LR, damping=DAMPING, params=_layer(added, "0"))
    opt.add_param_group({"params": _layer(added, "2"), "lr": 0.05})
    assert set(opt.layers) == {"0", "2"}
    groups = [{"params": _layer(reference, "0")}, {"params": _layer(reference, "2"), "lr": 0.05}]
    ref_opt = fl.optim.TENGraD(reference, lr=LR, damping=DAMPING, params=groups)
    for model, o in ((added, opt), (reference, ref_opt)):
        loss_fn(model(x), y).backward()
        o.step()
    _close(_params(added), _params(reference))
    with pytest.raises(fl.FisherlabError, match="param group 2: damping must lie"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "damping": -1.0})
    assert len(opt.param_groups) == 2


def test_weight_and_bias_in_different_groups_are_refused():
    model = _model()
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias, *_layer(model, "2")]}]
    with pytest.raises(fl.FisherlabError, match=r"weight and bias of layer '0' are in param"):
        fl.optim.KFAC(model, params=groups)


def test_lr_schedulers_act_on_every_group():
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed) for seed in (1, 2)]
    scheduled, manual = _model(), _model()
    groups = lambda m: [{"params": _layer(m, "0")}, {"params": _layer(m, "2"), "lr": 0.05}]  # noqa: E731
    opt = fl.optim.TENGraD(scheduled, lr=LR, damping=DAMPING, params=groups(scheduled))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref = fl.optim.TENGraD(manual, lr=LR, damping=DAMPING, params=groups(manual))
    for x, y in batches:
        opt.zero_grad()
        loss_fn(scheduled(x), y).backward()
        opt.step()
        scheduler.step()
        ref.zero_grad()
        loss_fn(manual(x), y).backward()
        ref.step()
        for group in ref.param_groups:
            group["lr"] /= 2
    assert [g["lr"] for g in opt.param_groups] == [LR / 4, 0.05 / 4]
    _close(_params(scheduled), _params(manual))


@pytest.mark.parametrize("name", NAMES)
def test_hyper_parameters_changed_later_are_validated_at_the_step(name):
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    model = _model()
    opt = MAKE[name](model, loss_fn=loss_fn)
    opt.param_groups[0]["damping"] = 0.0
    loss_fn(model(x), y).backward()
    before = _params(model)
    with pytest.raises(fl.FisherlabError, match=r"param group 0: damping must lie in \(0.0"):
        opt.step()
    _close(_params(model), before, 0.0)


# ------------------------------------------------------------------ state and lifecycle
def test_load_state_dict_refuses_another_model_or_optimizer():
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    model = _model()
    opt = fl.optim.KFAC(model)
    loss_fn(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    wider = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with pytest.raises(fl.FisherlabError, match=r"layer '0' with weight shape \(6, 5\)"):
        fl.optim.KFAC(wider).load_state_dict(state)
    deeper = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3)).double()
    with pytest.raises(fl.FisherlabError, match=r"saved for layers \['0', '2'\]"):
        fl.optim.KFAC(deeper).load_state_dict(state)
    with pytest.raises(fl.FisherlabError, match="saved by KFAC, not by TENGraD"):
        fl.optim.TENGraD(_model()).load_state_dict(state)
    with pytest.raises(fl.FisherlabError, match="not the state of a fisherlab optimizer"):
        fl.optim.KFAC(_model()).load_state_dict(torch.optim.SGD(model.parameters()).state_dict())


def test_copies_and_pickles_of_the_model_are_not_tied_to_the_optimizer():
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    reference = _plain_steps("kfac", "mlp", [(x, y)], loss_fn)
    model = _model()
    opt = MAKE["kfac"](model, loss_fn=loss_fn)
    out = model(x)
    teacher = copy.deepcopy(model)  # an EMA / teacher copy, taken mid-step
    buffer = io.BytesIO()
    torch.save(model, buffer)
    pickled = pickle.loads(pickle.dumps(model))
    for other in (teacher, pickled):
        loss_fn(other(x + 1), y).backward()  # trains nothing of the optimizer's
    loss_fn(out, y).backward()
    opt.step()
    _close(_params(model), _params(reference))
    assert all(not m._forward_hooks for m in teacher.modules())


def test_step_after_close_is_refused():
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    model = _model()
    opt = fl.optim.TENGraD(model)
    opt.close()
    loss_fn(model(x), y).backward()
    with pytest.raises(fl.FisherlabError, match="closed optimizer"):
        opt.step()


def test_gradients_without_any_recorded_forward_are_refused():
    model = _model()
    opt = fl.optim.KFAC(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(fl.FisherlabError, match="refuses to take a plain gradient step"):
        opt.step()


# ------------------------------------------------------------------ devices
@pytest.mark.parametrize("name", NAMES)
def test_steps_on_every_device_match_the_cpu(name, device):
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("cnn", 8, seed) for seed in (1, 2, 3)]
    reference = _plain_steps(name, "cnn", batches, loss_fn)
    model = _model("cnn").to(device)
    opt = MAKE[name](model, loss_fn=loss_fn)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x.to(device)), y.to(device)).backward()
        opt.step()
    _close({n: p.cpu() for n, p in _params(model).items()}, _params(reference), 1e-9)


def test_a_failing_eigen_decomposition_is_retried_on_the_factors_device(device, monkeypatch):
    loss_fn = nn.CrossEntropyLoss()
    x, y = (t.to(device) for t in _data("mlp", 8, 1))
    model = _model().to(device)
    opt = fl.optim.KFAC(model, lr=LR, damping=DAMPING)
    eigh, calls = torch.linalg.eigh, []

    def flaky(matrix):
        calls.append(matrix.device)
        if len(calls) == 1:
            raise RuntimeError("linalg.eigh: the algorithm failed to converge")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    loss_fn(model(x), y).backward()
    opt.step()
    assert opt.steps == 1 and opt.skipped_steps == 0
    assert len(calls) > 2 and all(d.type == device.type for d in calls)


def test_fngd_shares_its_weights_under_bfloat16_autocast():
    """p.grad and ĝ differ by bfloat16 rounding there: still read as the batch gradient."""
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", 8, seed, torch.float32) for seed in (1, 2, 3)]
    models = [_model(dtype=torch.float32), _model(dtype=torch.float32)]
    fngd = fl.optim.FNGD(models[0], 2, lr=LR, damping=DAMPING)
    tengrad = fl.optim.TENGraD(models[1], lr=LR, damping=DAMPING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches:
            for model, opt in zip(models, (fngd, tengrad)):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(model(x).float(), y)
                loss.backward()
                opt.step()
    assert fngd._precision == torch.bfloat16
    assert not torch.allclose(models[0][0].weight, models[1][0].weight)  # epoch 2 shared


def test_a_bias_held_by_another_optimizer_is_left_to_it():
    """Weights with TENGraD, biases with SGD: TENGraD's block is the weight's alone."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data("mlp", 8, 1)
    model = _model()
    weights = [m.weight for m in (model[0], model[2])]
    biases = [m.bias for m in (model[0], model[2])]
    opt = fl.optim.TENGraD(model, lr=LR, damping=DAMPING, params=weights)
    sgd = torch.optim.SGD(biases, lr=LR)
    J = per_sample_grads(model, loss_fn, x, y, "0")[:, : model[0].weight.numel()]
    loss_fn(model(x), y).backward()
    g = model[0].weight.grad.flatten().clone()
    before = model[0].weight.detach().flatten().clone()
    bias_before, bias_grad = model[0].bias.detach().clone(), model[0].bias.grad.clone()
    opt.step()
    sgd.step()
    F = J.T @ J / len(x)
    expected = before - LR * torch.linalg.solve(F + DAMPING * torch.eye(len(F), dtype=F.dtype), g)
    assert rel_err(model[0].weight.detach().flatten(), expected) <= EXACT
    assert torch.equal(model[0].bias.detach(), bias_before - LR * bias_grad)


@pytest.mark.parametrize("name", [*NAMES, "kfac-factored"])
def test_a_step_waits_for_the_device_once(name):
    """One host synchronisation per step (FNGD after its first epoch: two).

    Counted on the calls that make the host wait; inverse-update steps included.
    """
    loss_fn = nn.CrossEntropyLoss()
    model = _model("cnn")
    if name == "kfac-factored":
        opt = MAKE["kfac"](model, damping_mode="factored", inv_update_freq=2)
    else:
        opt = MAKE[name](model)
    counts = []
    for seed in range(4):
        x, y = _data("cnn", 8, seed)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        with counting_syncs() as syncs:
            opt.step()
        counts.append(syncs[0])
    # the first step also checks once that the loss's output gradient fits ν (two more) and
    # that p.grad is the gradient the statistics decompose (one more)
    assert counts == ([4, 1, 2, 2] if name == "fngd" else [4, 1, 1, 1]), counts


# ------------------------------------------------------------------ sync-free steps
def _sync_free_run(name, sync_free, bad_step=None, kind="mlp"):
    loss_fn = nn.CrossEntropyLoss()
    model = _model(kind)
    opt = MAKE[name](model, momentum=0.9, weight_decay=1e-3, sync_free=sync_free)
    counts, snapshot = [], None
    for step in range(5):
        x, y = _data(kind, 8, step)
        if step == bad_step:
            x = x.clone()
            x[0, 0] = float("nan")
            snapshot = (_params(model), copy.deepcopy(opt.layer_state))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        with counting_syncs() as syncs:
            opt.step()
        counts.append(syncs[0])
        if step == bad_step:
            after = (_params(model), copy.deepcopy(opt.layer_state))
    return model, opt, counts, snapshot, (after if bad_step is not None else None)


@pytest.mark.parametrize("name", NAMES)
def test_sync_free_steps_equal_the_synchronised_ones_without_waiting(name):
    synced, _, _, _, _ = _sync_free_run(name, False, kind="cnn")
    free, opt, counts, _, _ = _sync_free_run(name, True, kind="cnn")
    _close(_params(free), _params(synced), 1e-12)
    # first steps: statistics without an old value (and FNGD's first epoch) synchronise once;
    # after that nothing waits, except FNGD's test of p.grad against its batch gradient (and
    # the check of p.grad against the statistics' gradient, every check_gradients_every steps)
    expected = {"fngd": [4, 1, 1, 1, 1]}.get(name, [4, 0, 0, 0, 0])
    assert counts == expected, counts
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_sync_free_step_changes_nothing_and_is_counted(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, _, (params, state), (after_params, after_state) = _sync_free_run(
            name, True, bad_step=3
        )
    if name in ("kfac", "ekfac", "ekfac-ra", "tengrad"):  # found on the device: no warning
        assert not caught, [str(w.message) for w in caught]
    # (SKFAC's eigh raises on NaN on the CPU, FNGD tests p.grad on the host: both warn)
    _close(after_params, params, 0.0)
    for layer, values in state.items():
        for key, value in values.items():
            for old, new in zip(_flat(value), _flat(after_state[layer][key])):
                assert torch.equal(old, new), (layer, key)
    # a sync-free step counts in `steps` even when skipped; SKFAC's raised on the host: it did not
    assert opt.skipped_steps == 1 and opt.steps == (4 if name == "skfac" else 5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _flat(value):
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flat(value[k])]
    if isinstance(value, tuple):
        return [t for v in value for t in _flat(v)]
    return []


def test_a_gradscaler_overflow_in_a_sync_free_step_is_skipped_on_the_device():
    loss_fn = nn.CrossEntropyLoss()
    model = _model(dtype=torch.float32)
    opt = MAKE["kfac"](model, momentum=0.9, sync_free=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = _data("mlp", 8, step, torch.float32)
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("inf")
            before = (_params(model), {k: dict(v) for k, v in opt.layer_state.items()})
        scaler.step(opt)
        scaler.update()
    _close(_params(model), before[0], 0.0)
    assert all(
        opt.layer_state[k][key] is not None and torch.equal(_flat(opt.layer_state[k][key])[0],
                                                            _flat(v)[0])
        for k, values in before[1].items() for key, v in values.items()
    )  # fmt: skip
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0**9
