"""Metrics: at-scale Frobenius formulas equal dense ones; spectra, directions, correlations."""

import math

import pytest
import torch
from cases import CASE_IDS, CASES
from helpers import EXACT, rel_err
from torch import nn

import fisherlab as fl
from fisherlab import metrics
from fisherlab.blocks import build, parse_method
from fisherlab.comparison import batch_gradients

AT_SCALE = [
    "kfac",
    "kfac:kfac_approx=reduce",
    "ekfac",
    "skfac",
    "skfac:conv_reduction=subsample,spatial_samples=2",
    "diag",
    "woodbury",
    "woodbury:conv_gram=reduce_sum",
]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("spec", AT_SCALE)
def test_frobenius_at_scale_equals_dense(case, spec, fisher_type):
    model, loss_fn, x, y = case.build(4)
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    method, options = parse_method(spec)
    approx, exact = build(method, cap, **options), build("exact", cap)
    for name, layer in cap.items():
        f = exact[name].to_dense()
        error, norm = metrics.frobenius_at_scale(approx[name], layer, cap.normaliser)
        assert norm == pytest.approx(torch.linalg.matrix_norm(f).item(), rel=1e-12)
        dense_error = torch.linalg.matrix_norm(f - approx[name].to_dense()).item()
        # squared errors agree to rounding of ‖F‖² (cancellation is in the squares)
        assert error**2 == pytest.approx(dense_error**2, abs=1e-11 * norm**2), name


def test_frobenius_error_relative_and_absolute():
    a, b = torch.eye(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    assert metrics.frobenius_error(a, b) == 1.0
    assert metrics.frobenius_error(a, b, relative=False) == pytest.approx(math.sqrt(3))


def test_spectrum_dense_structured_and_lanczos_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = torch.randn(16, 20, dtype=torch.float64), torch.randint(0, 3, (16,))
    exact = fl.curvature("exact", model, nn.CrossEntropyLoss(), x, y)["0"]
    woodbury = fl.curvature("woodbury", model, nn.CrossEntropyLoss(), x, y)["0"]
    dense = metrics.spectrum(exact.to_dense())
    assert rel_err(metrics.spectrum(woodbury), dense) <= 1e-9
    lanczos = metrics.spectrum(exact, k=5, dense_limit=10)
    assert rel_err(lanczos, dense[:5]) <= 1e-8
    assert metrics.spectrum_distance(dense, dense) == 0.0
    assert metrics.spectrum_distance(dense, 2 * dense) == pytest.approx(1.0)


def test_direction_quality_is_perfect_for_the_exact_block_and_sane_for_kfac():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y)
    exact, kfac = build("woodbury", cap), build("kfac", cap)
    g = batch_gradients(fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical"))
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    expected = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad])
    assert rel_err(g["0"], expected) <= EXACT
    same = metrics.direction_quality(exact["0"], exact["0"], g["0"], 1e-3)
    assert same.relative_error == 0.0 and same.cosine == pytest.approx(1.0)
    approx = metrics.direction_quality(kfac["0"], exact["0"], g["0"], 1e-3)
    assert -1.0 <= approx.cosine < 1.0 and approx.relative_error > 0


def test_sample_correlation_has_unit_diagonal_and_matches_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    for layer in cap.values():
        c = metrics.sample_correlation(layer)
        assert c.shape == (6, 6) and torch.allclose(
            c.diagonal(), torch.ones(6, dtype=torch.float64)
        )
        g = layer.jacobian_rows()[0]
        g = g / g.norm(dim=1, keepdim=True)
        assert rel_err(c, g @ g.T) <= EXACT


def test_kfe_correlation_decorrelates_and_has_unit_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y)
    exact, ekfac = build("exact", cap)["0"], build("ekfac", cap)["0"]
    corr = metrics.kfe_correlation(exact.matrix, ekfac)
    for c in (corr.parameter_basis, corr.kfe):
        assert torch.allclose(c.diagonal(), torch.ones(25, dtype=torch.float64))
    assert corr.off_diagonal(corr.kfe) < corr.off_diagonal(corr.parameter_basis)
    assert metrics.kfe_correlation(exact.matrix, ekfac, coordinates=7).kfe.shape == (7, 7)
