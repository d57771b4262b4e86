"""Applying the directions (``optim/update.py``) and ``GradScaler`` handling (``optim/amp.py``)."""

import copy
from collections import defaultdict

import pytest
import torch

import fisherlab as fl
from fisherlab.optim import amp
from fisherlab.optim.update import (
    apply_updates,
    kl_clip_factors,
    parameter_updates,
    sgd_step,
    sgd_step_where,
    steps_on_device,
)


def _t(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["no-decay", "decay"])
def test_sgd_step_is_torch_sgd_after_decoupled_weight_decay(momentum, weight_decay):
    lr, ours, state = 0.1, _t(3, 2), {}
    theirs = torch.nn.Parameter(ours.clone())
    sgd = torch.optim.SGD([theirs], lr=lr, momentum=momentum, foreach=False)
    for seed in range(3):
        u = _t(3, 2, seed=seed + 1)
        sgd_step(ours, u, lr, momentum, weight_decay, state)
        with torch.no_grad():
            theirs.mul_(1 - lr * weight_decay)
        theirs.grad = u.clone()
        sgd.step()
        assert torch.equal(ours, theirs.detach())
    assert ("momentum_buffer" in state) == bool(momentum)


@pytest.mark.parametrize("ok", [True, False], ids=["applies", "skipped"])
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_sgd_step_where_applies_the_step_only_where_ok(ok, momentum):
    lr, wd = 0.1, 0.05
    start, u = _t(4), _t(4, seed=1)
    buffer = {"momentum_buffer": _t(4, seed=2)} if momentum else {}
    expected, expected_state = start.clone(), {k: v.clone() for k, v in buffer.items()}
    if ok:
        sgd_step(expected, u, lr, momentum, wd, expected_state)
    p, state = start.clone(), {k: v.clone() for k, v in buffer.items()}
    sgd_step_where(torch.tensor(ok), p, u, lr, momentum, wd, state)
    torch.testing.assert_close(p, expected, rtol=1e-15, atol=0)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kl_clip", [None, 1e3, 1e-6], ids=["off", "not-reached", "clips"])
def test_kl_clip_keeps_the_kl_estimate_of_a_group_within_the_bound(kl_clip):
    group = {"lr": 0.3, "kl_clip": kl_clip}
    other = {"lr": 0.1, "kl_clip": None}
    directions = {"a": _t(5), "b": _t(3, seed=1), "c": _t(2, seed=2)}
    grads = {"a": _t(5, seed=3), "b": _t(3, seed=4), "c": _t(2, seed=5)}
    groups = {"a": group, "b": group, "c": other}
    factors = kl_clip_factors(directions, grads, groups)
    assert factors["c"] == 1.0
    if kl_clip is None:
        assert factors["a"] == factors["b"] == 1.0
        return
    vg = sum(float(directions[n] @ grads[n]) for n in "ab") * group["lr"] ** 2
    expected = min(1.0, (kl_clip / abs(vg)) ** 0.5)
    assert float(factors["a"]) == pytest.approx(expected, rel=1e-14)
    assert float(factors["b"]) == float(factors["a"])
    # the KL estimate lr²·(cd)ᵀF(cd) = c²·lr²·dᵀg (Fd = g): at the bound when clipping
    kl = float(factors["a"]) ** 2 * abs(vg)
    assert kl == pytest.approx(kl_clip, rel=1e-12) if expected < 1 else kl <= kl_clip


@pytest.mark.parametrize("factor", [1.0, torch.tensor(0.25, dtype=torch.float64)], ids=["1", "c"])
def test_parameter_updates_cut_the_direction_into_the_parameters(factor):
    weight = torch.zeros(2, 3, dtype=torch.float32)
    bias = torch.zeros(2, dtype=torch.float32)
    d = _t(8)
    updates = parameter_updates({"l": d}, {"l": factor}, {"l": [weight, bias]})
    assert updates[id(weight)].shape == (2, 3) and updates[id(weight)].dtype == torch.float32
    expected = (d * factor).float()
    assert torch.equal(updates[id(weight)].reshape(-1), expected[:6])
    assert torch.equal(updates[id(bias)], expected[6:])


def _group(momentum, grad):
    p = torch.nn.Parameter(_t(4))
    p.grad = grad
    return [{"params": [p], "lr": 0.1, "momentum": momentum, "weight_decay": 0.0}]


@pytest.mark.parametrize(
    "case, expected",
    [("dense", True), ("sparse", False), ("first-momentum", False), ("momentum", True)],
)
def test_steps_on_device_only_with_dense_gradients_and_momentum_buffers(case, expected):
    grad = _t(4, seed=1)
    if case == "sparse":
        grad = grad.to_sparse()
    groups = _group(0.9 if "momentum" in case else 0.0, grad)
    state = defaultdict(dict)
    if case == "momentum":
        state[groups[0]["params"][0]]["momentum_buffer"] = _t(4, seed=2)
    assert steps_on_device(groups, state) == expected


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_apply_updates_steps_by_p_grad_without_a_direction_and_keeps_torch_state_lean(momentum):
    groups = _group(momentum, _t(4, seed=1))
    p = groups[0]["params"][0]
    before, state = p.detach().clone(), defaultdict(dict)
    with torch.no_grad():  # as in step()
        apply_updates(groups, state, {})
    assert torch.equal(p.detach(), before - 0.1 * p.grad)
    assert (p in state) == bool(momentum)  # no empty entries in torch.optim's state


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_unscale_multiplies_by_the_float32_reciprocal(sparse):
    grad = _t(5, dtype=torch.float32)
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = grad.to_sparse() if sparse else grad.clone()
    scale = torch.tensor(3.0)
    amp.unscale([{"params": [p]}], scale)
    inverse = torch.tensor(1 / 3.0, dtype=torch.float64).float()
    got = p.grad.to_dense() if sparse else p.grad
    assert torch.equal(got, grad * inverse)


class _Handed:
    """An optimizer as ``GradScaler.step`` leaves it (attributes only)."""


@pytest.mark.parametrize(
    "grad_scale, scaler, expected",
    [
        (None, None, "outside"),
        (torch.tensor(8.0), None, "scaled"),
        ("unscaled", "scaler", "from-scaler"),
        ("unscaled", None, "error"),
    ],
    ids=["outside-scaler-step", "scaled-gradients", "after-unscale", "after-unscale-no-scaler"],
)
def test_loss_scale_reads_what_the_grad_scaler_handed_over(grad_scale, scaler, expected):
    opt = _Handed()
    if expected != "outside":
        opt.found_inf = torch.tensor(0.0)
        opt.grad_scale = None if grad_scale == "unscaled" else grad_scale
    given = torch.amp.GradScaler("cpu", init_scale=4.0) if scaler else None
    if expected == "error":
        with pytest.raises(fl.FisherlabError, match="pass grad_scaler=scaler"):
            amp.loss_scale(opt, given)
        return
    grads, stats, found_inf = amp.loss_scale(opt, given)
    if expected == "outside":
        assert (grads, stats, found_inf) == (None, None, None)
    elif expected == "scaled":
        assert grads is stats is opt.grad_scale and found_inf is opt.found_inf
    else:
        assert grads is None and float(stats) == 4.0


class _Plain(fl.optim.CurvatureOptimizer):
    """The identity preconditioner: what ``step()`` applies is ``p.grad`` itself."""

    def _direction(self, name, layer, A, G, normaliser, grad, group):
        return grad


@pytest.mark.parametrize("sync_free", [False, True], ids=["synchronised", "sync-free"])
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["no-decay", "decay"])
def test_step_applies_directions_as_torch_sgd_with_decoupled_weight_decay(
    sync_free, momentum, weight_decay
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    reference = copy.deepcopy(model)
    lr = 0.1
    opt = _Plain(model, lr, 1e-3, momentum, weight_decay, sync_free=sync_free)
    sgd = torch.optim.SGD(reference.parameters(), lr=lr, momentum=momentum, foreach=False)
    for seed in range(4):
        x, y = _t(6, 4, seed=seed), torch.tensor([0, 1, 2, 0, 1, 2])
        for net, step in ((model, opt), (reference, sgd)):
            step.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p in reference.parameters():
                p.mul_(1 - lr * weight_decay)
        sgd.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            if sync_free:  # where(ok, u, 0)·lr subtracted instead of add_(u, alpha=−lr)
                torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)
            else:
                assert torch.equal(p, q)
    assert opt.skipped_steps == 0
    opt.close()
