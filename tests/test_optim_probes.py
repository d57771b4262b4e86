"""Loops that probing found silently wrong: each now gives the right step or a clear refusal.

float64 unless stated; each test uses the probe's setting in small.
"""

import pytest
import torch
from test_optim_loops import MAKE, NAMES, _close, _data, _model, _params
from torch import nn


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
