"""The Fisher's scale (λ_max over all layers) and the optimizers' direction cosine, in float64."""

import pytest
import torch
from torch import nn

import fisherlab as fl
from fisherlab.conventions import FisherlabError
from fisherlab.scale import fisher_scale


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "true"])
def test_lambda_max_is_the_largest_eigenvalue_of_the_dense_fisher(fisher_type):
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(7, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # a data set of two batches
    problem = fl.Problem(model, nn.CrossEntropyLoss(), batches, fisher_type=fisher_type)
    scale = fisher_scale(problem)
    full = fl.exact_fisher(problem)
    assert scale.lambda_max == pytest.approx(
        float(torch.linalg.eigvalsh(full.matrix)[-1]), rel=1e-10
    )
    for name, sl in full.slices.items():  # each block's own largest eigenvalue
        block = full.matrix[sl, sl]
        assert scale.per_layer[name] == pytest.approx(
            float(torch.linalg.eigvalsh(block)[-1]), rel=1e-10
        )
    assert scale.samples == 7 and scale.fisher_type == fisher_type


def test_lambda_max_of_an_overflowed_model_is_refused():
    model = _cnn()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    problem = fl.Problem(model, nn.CrossEntropyLoss(), (x, y), fisher_type="empirical")
    with pytest.raises(FisherlabError, match="NaN or Inf"):
        fisher_scale(problem)


@pytest.mark.parametrize("name", ["KFAC", "TENGraD"])
def test_direction_cosine_is_the_cosine_of_the_preconditioned_gradient(name):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = getattr(fl.optim, name)(model, lr=0.1, damping=0.01, momentum=0.0)
    opt.track_direction_cosine = True
    cosines = []
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
        cosines.append(float(torch.nn.functional.cosine_similarity(step, grad, dim=0)))
    assert opt.direction_cosine() == pytest.approx(sum(cosines) / 3, rel=1e-10)
    assert opt.direction_cosine() is None  # read once, then reset
    assert all(c < 0.999 for c in cosines)  # small damping: the direction is not the gradient
