"""benchmarks/reference_steps.py does fisherlab's arithmetic: the same parameter change (float64).

The benchmark's "÷ plain reference" ratio times fisherlab against these plain-PyTorch steps;
this test is the guard that both compute the same thing: several steps (statistics, running
averages, decompositions at their intervals, momentum) from the same initialisation on the
same batches give the same parameters to 1e-10.
"""

import pytest
import torch
from helpers import rel_err
from reference_steps import REFERENCES  # benchmarks/, on the path through conftest.py
from torch import nn

import fisherlab as fl

LR, DAMPING, MOMENTUM, DECAY = 0.1, 0.1, 0.9, 0.8
STEPS, INTERVAL = 5, 2


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
            nn.Tanh(), nn.Flatten(), nn.Linear(8, 4),
        )  # fmt: skip
    return model.double()


def _batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n, shape = (16, (6,)) if kind == "mlp" else (10, (2, 6, 6))
    inputs = [torch.randn(n, *shape, generator=g, dtype=torch.float64) for _ in range(INTERVAL)]
    return [(x, torch.randint(0, 4, (n,), generator=g)) for x in inputs]


def _fisherlab(method: str, model: nn.Module, stat_every: int):
    common = dict(lr=LR, damping=DAMPING, momentum=MOMENTUM, loss_fn=nn.CrossEntropyLoss())
    kfac = dict(stat_decay=DECAY, stat_every=stat_every)
    if method in ("kfac", "kfac-factored"):
        mode = "factored" if method == "kfac-factored" else "eigen"
        return fl.optim.KFAC(model, inv_update_freq=INTERVAL, damping_mode=mode, **kfac, **common)
    if method == "ekfac":
        return fl.optim.EKFAC(model, basis_update_freq=INTERVAL, **kfac, **common)
    if method in ("tengrad", "tengrad-paper"):  # the paper's route: p.grad is Jᵀ1/ν here
        return fl.optim.TENGraD(model, **common)
    if method == "fngd":
        return fl.optim.FNGD(model, steps_per_epoch=INTERVAL, **common)
    return fl.optim.SKFAC(model, stat_decay=DECAY, **common)


def _reference(method: str, model: nn.Module, stat_every: int):
    common = dict(lr=LR, damping=DAMPING, momentum=MOMENTUM)
    if method in ("kfac", "kfac-factored", "ekfac"):
        common.update(stat_decay=DECAY, stat_every=stat_every, inv_every=INTERVAL)
    elif method == "fngd":
        common.update(steps_per_epoch=INTERVAL)
    elif method == "skfac":
        common.update(stat_decay=DECAY)
    return REFERENCES[method](model, **common)


def _change(kind: str, make) -> torch.Tensor:
    model = _model(kind)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    opt = make(model)
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(kind)
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    getattr(opt, "close", lambda: None)()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach() - start


CASES = [(m, 1) for m in REFERENCES] + [(m, INTERVAL) for m in ("kfac", "kfac-factored", "ekfac")]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(("method", "stat_every"), CASES, ids=[f"{m}-stat{k}" for m, k in CASES])
def test_reference_gives_fisherlabs_parameter_change(kind, method, stat_every):
    ours = _change(kind, lambda m: _fisherlab(method, m, stat_every))
    plain = _change(kind, lambda m: _reference(method, m, stat_every))
    assert ours.norm() > 0
    assert rel_err(plain, ours) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_reference_differs_from_sgd(kind):
    """A control: the references' changes are not the plain gradient step's."""
    sgd = _change(kind, lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM))
    plain = _change(kind, lambda m: _reference("kfac", m, 1))
    assert rel_err(plain, sgd) > 1e-2
